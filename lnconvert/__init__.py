"""lnconvert: convert trained PyTorch models to BatchNorm-free models with linked activations."""
__version__ = "0.1.0"

from .calibrate import calibrate_batchnorm  # noqa: E402
from .compact import CompactResult, compact  # noqa: E402
from .convert import ConversionResult, convert, remaining_batchnorm  # noqa: E402
from .errors import LnConvertError  # noqa: E402
from .export import export_onnx, verify_onnx  # noqa: E402
from .finetune import merge_twins, param_groups, split_twins  # noqa: E402
from .io import load, load_model, load_result, save  # noqa: E402
from .report import ConversionReport  # noqa: E402
from .rules import register_rule  # noqa: E402

__all__ = ["CompactResult", "ConversionReport", "ConversionResult", "LnConvertError", "__version__",
           "calibrate_batchnorm", "compact", "convert", "export_onnx", "load", "load_model", "load_result",
           "merge_twins", "param_groups", "register_rule", "remaining_batchnorm",
           "save", "split_twins", "verify_onnx"]
