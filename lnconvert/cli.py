"""Command line: ``lnconvert MODEL [options]`` converts; subcommands for the rest."""
from __future__ import annotations

import contextlib
import sys
import traceback
from pathlib import Path
from typing import Iterator, List, Optional

import click
import typer
from rich.console import Console
from rich.table import Table
from typer.core import TyperGroup

from .errors import EXIT_CODES, LnConvertError, ParityError, UsageError
from .report import DEFAULT_TOLERANCE

err = Console(stderr=True)
out = Console()


class DefaultToConvert(TyperGroup):
    """``lnconvert resnet18 ...`` means ``lnconvert convert resnet18 ...``."""

    def resolve_command(self, ctx: click.Context, args: list[str]):
        if args and args[0] not in self.commands and not args[0].startswith("-"):
            args.insert(0, "convert")
        return super().resolve_command(ctx, args)


app = typer.Typer(cls=DefaultToConvert, add_completion=False, no_args_is_help=True,
                  help="Convert trained PyTorch models to BatchNorm-free models with linked activations.\n\n"
                       "Usage: lnconvert MODEL [OPTIONS] (same as `lnconvert convert MODEL`).\n\n"
                       "Exit codes: " + "; ".join(f"{k} {v}" for k, v in sorted(EXIT_CODES.items())))


def _fail(exc: BaseException, debug: bool, where: str = "") -> None:
    """Print ``exc`` as one line (``where`` names the process of a multi-process run) and exit."""
    if debug:
        traceback.print_exc()
    if isinstance(exc, KeyboardInterrupt):
        err.print(f"interrupted{where}; no output was written")
        raise typer.Exit(130)
    if isinstance(exc, LnConvertError):
        err.print(f"[red]error:[/red] {exc}{where}", soft_wrap=True, highlight=False)
        raise typer.Exit(exc.exit_code)
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    err.print(f"[red]internal error:[/red] {type(exc).__name__}: {first}{where} (rerun with --debug for the "
              f"traceback)", soft_wrap=True, highlight=False)
    raise typer.Exit(1)


@contextlib.contextmanager
def _exit_codes(debug: bool, interrupted: str = "interrupted; no output was written") -> Iterator[None]:
    """Every failure inside becomes one line on stderr and the exit code of its error type
    (:data:`lnconvert.errors.EXIT_CODES`); typer's own exits pass through."""
    try:
        yield
    except (typer.Exit, click.exceptions.Exit):
        raise
    except KeyboardInterrupt:
        err.print(interrupted, soft_wrap=True, highlight=False)
        raise typer.Exit(130) from None
    except BaseException as exc:
        _fail(exc, debug)


def _parse_size(text: Optional[str]) -> Optional[tuple[int, ...]]:
    if text is None:
        return None
    try:
        size = tuple(int(v) for v in text.lower().replace("x", ",").split(",") if v.strip())
    except ValueError:
        raise UsageError(f"--input-size must look like 3,224,224 or 3x224x224, got {text!r}") from None
    if len(size) < 2 or any(v <= 0 for v in size):
        raise UsageError(f"--input-size needs positive sizes like 3,224,224, got {text!r}")
    return size


def _read_tensor_file(path: Path, flag: str):
    """One floating-point tensor (N, C, ...) from a ``torch.save`` or ``.npy`` file, loaded without unpickling."""
    import torch

    if not path.is_file():
        raise UsageError(f"{flag} file not found: {path}")
    try:
        if path.suffix == ".npy":
            import numpy

            tensor = torch.from_numpy(numpy.load(path, allow_pickle=False))
        else:
            tensor = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise UsageError(f"{flag} {path} is not a tensor file ({type(exc).__name__})") from None
    if not isinstance(tensor, torch.Tensor) or not tensor.is_floating_point():
        raise UsageError(f"{flag} {path} must hold one floating-point tensor (N, C, ...)")
    return tensor


def print_report(report, console: Console = out) -> None:
    from .report import summary_rows

    table = Table(title=f"lnconvert: {report.model}", show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column()
    for label, value in summary_rows(report):
        table.add_row(label, value)
    console.print(table)
    for warning in report.warnings:
        console.print(f"[yellow]warning:[/yellow] {warning}")


@app.command("convert", no_args_is_help=True)
def convert_cmd(
    model: str = typer.Argument(..., help="torchvision or timm name (resnet18, timm/resnet18d, "
                                          "resnet18.a1_in1k) or module:callable"),
    drop_bn: bool = typer.Option(True, "--drop-bn/--keep-bn", help="Remove BatchNorm (fold or affine)."),
    link: bool = typer.Option(True, "--link/--no-link", help="Link activations (Linked Neurons)."),
    policy: str = typer.Option("mirror", help="Linking policy: mirror = cat(g(x), g(-x)); "
                                              "minmax = cat(g(x), min(x, 0))."),
    activations: Optional[str] = typer.Option(None, help="Comma-separated activation types to link "
                                                         "(e.g. relu,silu); default all."),
    residual: str = typer.Option("slice", help="Residual boundary: slice (primaries) or gate "
                                               "(primary + a*twin, a=0)."),
    norm: str = typer.Option("fold", help="What replaces BatchNorm: fold (into the conv/linear, else an affine), "
                                          "normprop (NormProp layers + ReLU re-normalisation) or deep-control "
                                          "(DeepControl2d, alpha=0); all exact at conversion."),
    lcw: bool = typer.Option(False, "--lcw", help="Also project every conv/linear onto zero-sum weights per unit "
                                                  "(LCW). Changes the function by design: verified before the "
                                                  "projection, its deviation reported (status 'changed')."),
    weights: Optional[str] = typer.Option(None, help="Checkpoint PATH (.pt/.pth/.bin/.safetensors, a sharded "
                                                     "*.index.json or a Hugging Face-style directory), or DEFAULT "
                                                     "for official weights (needs network). "
                                                     "Default: the architecture's own initialisation."),
    weights_key: Optional[str] = typer.Option(None, "--weights-key", help="Where the state dict sits in the "
                                              "checkpoint, as a dotted path (e.g. state_dict_ema, state_dict.model); "
                                              "default: the one nested dict that matches the model."),
    input_size: Optional[str] = typer.Option(None, help="Example input C,H,W (default: the model's config, "
                                                        "else 3,224,224)."),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="Saved model path "
                                          "(default MODEL-linked.safetensors, .pt2 or .torchscript.pt)."),
    no_save: bool = typer.Option(False, "--no-save", help="Convert and verify only; write no model."),
    save_format: str = typer.Option("safetensors", "--format", help="safetensors (weights + spec, no pickle; "
                                    "reload with lnconvert.load), pt2 (torch.export) or torchscript (traced)."),
    report_json: Optional[Path] = typer.Option(None, help="Write the full report as JSON here."),
    onnx: Optional[Path] = typer.Option(None, "--onnx", help="Also export to ONNX here and check it in ONNX Runtime "
                                                             "against the original (batch 1 and 4)."),
    optimize: Optional[str] = typer.Option(None, help="With --onnx: also save ONNX Runtime's optimised graph "
                                           "(basic: standard ops; extended/all: ORT fused ops, this hardware) "
                                           "as ONNX-stem.opt.onnx and check it the same way."),
    force: bool = typer.Option(False, "--force", help="Overwrite existing output files."),
    verify: bool = typer.Option(True, "--verify/--no-verify", help="Check parity with the original."),
    tolerance: float = typer.Option(DEFAULT_TOLERANCE, help="Max relative error: max|delta| / max(1, max|y|)."),
    precision: str = typer.Option("float64", help="Verify in float64 (conversion error alone) or float32."),
    leaf: Optional[List[str]] = typer.Option(None, help="Submodule to keep opaque when tracing (repeatable)."),
    partial: bool = typer.Option(False, "--partial", help="If the whole model cannot be traced (detection, optical "
                                 "flow), convert each traceable submodule holding BatchNorm in place and verify "
                                 "the whole model's outputs (needs --no-save; automatic with --no-save)."),
    submodule: Optional[List[str]] = typer.Option(None, "--submodule", help="Convert only this submodule in place, "
                                                  "e.g. backbone (repeatable; needs --no-save); the whole model "
                                                  "is verified."),
    trust_pickle: bool = typer.Option(False, help="Allow checkpoints holding pickled objects (trusted files)."),
    trust_source: bool = typer.Option(False, "--trust-source", help="Let a saved model whose spec names a "
                                      "module:callable architecture import and run it (only for files you trust)."),
    calibrate: Optional[Path] = typer.Option(None, help="Inputs (a .pt or .npy file holding one tensor (N, C, ...)) "
                                             "to estimate running statistics for BatchNorm layers that have none "
                                             "(track_running_stats=False); without it such a model is refused "
                                             "under --drop-bn (exit 7)."),
    debug: bool = typer.Option(False, help="Show tracebacks."),
) -> None:
    """Convert MODEL, verify it against the original and save it (safetensors + spec)."""
    from .convert import convert
    from .files import atomic_path, check_output_path
    from .io import FORMATS, load_model, save
    from .options import ConvertOptions
    from .trace import default_example_inputs

    with _exit_codes(debug):
        size = _parse_size(input_size)
        acts = [a for a in activations.split(",")] if activations else None
        ConvertOptions(drop_bn=drop_bn, policy=policy, residual=residual, activations=acts, tolerance=tolerance,
                       precision=precision, norm=norm, lcw=lcw)  # validate before the (slow) model load
        target = None
        if (partial or submodule) and not no_save:
            raise UsageError("a partially converted model cannot be saved yet; add --no-save (from Python: "
                             "torch.save(result.model, PATH), a pickle of the whole model)")
        if not no_save:
            if save_format not in FORMATS:
                raise UsageError(f"unknown --format {save_format!r}; choose one of: {', '.join(FORMATS)}")
            default_name = model.replace("/", "_").replace(":", "_") + "-linked" + FORMATS[save_format]
            target = check_output_path(output or Path(default_name), force)
        optimized = _optimized_path(onnx, optimize)
        for extra in (report_json, onnx, optimized):
            if extra is not None:
                check_output_path(extra, force)
        calibration = _read_tensor_file(calibrate, "--calibrate") if calibrate is not None else None
        with err.status(f"loading {model}"):
            net = load_model(model, weights, trust_pickle=trust_pickle, trust_source=trust_source,
                             weights_key=weights_key)
        if weights is None:
            err.print(f"note: no --weights given; converting {model}'s own (random) initialisation")
        inputs = default_example_inputs(net, input_size=size)
        with err.status(f"converting {model}"):
            try:
                result = convert(net, drop_bn=drop_bn, link=link, policy=policy, activations=acts,
                                 residual=residual, example_inputs=inputs, verify=verify, leaf_modules=leaf or (),
                                 tolerance=tolerance, precision=precision, name=model, norm=norm, lcw=lcw,
                                 partial=partial or (None if no_save else False),  # a part-converted
                                 submodules=submodule or None,  # model cannot be saved: automatic under --no-save
                                 calibration_data=None if calibration is None else calibration.split(32))
            except ParityError as exc:
                if exc.report is not None:
                    print_report(exc.report, err)
                raise
        if result.report.calibrated:
            err.print(f"note: calibrated {len(result.report.calibrated)} BatchNorm without running statistics on "
                      f"{calibration.shape[0]} samples of {calibrate}")
        print_report(result.report)
        if target is not None:
            save(result, target, format=save_format, force=force)
            out.print(f"saved {target}")
        if onnx is not None:
            _export_and_check(result, net, inputs, onnx, optimized, optimize, tolerance, force)
        if report_json is not None:
            with atomic_path(report_json) as tmp:
                Path(tmp).write_text(result.report.to_json())
            out.print(f"report {report_json}")


def _export_and_check(result, net, inputs, onnx: Path, optimized: Optional[Path], optimize: Optional[str],
                      tolerance: float, force: bool) -> None:
    """Export ``result`` to ``onnx`` (and ORT's optimised graph to ``optimized``), each checked
    in ONNX Runtime against the original ``net``."""
    from .export import export_onnx, optimize_onnx, require_parity, verify_onnx

    with err.status(f"exporting {onnx}"):
        export_onnx(result, onnx, force=force)
        rows = verify_onnx(onnx, net, sample_shape=inputs[0].shape[1:], tolerance=tolerance)
    print_parity(rows, f"ONNX Runtime vs original: {onnx}")
    print_layout_ops(onnx, net, tuple(inputs[0].shape[1:]))
    require_parity(rows, onnx)
    if optimized is not None:
        optimize_onnx(onnx, optimized, level=optimize, force=force)
        rows = verify_onnx(optimized, net, sample_shape=inputs[0].shape[1:], tolerance=tolerance)
        print_parity(rows, f"ONNX Runtime ({optimize} optimisation) vs original: {optimized}")
        require_parity(rows, optimized)


def _optimized_path(onnx: Optional[Path], level: Optional[str]) -> Optional[Path]:
    """Where ``--optimize`` saves ORT's optimised graph: beside the export, ``.opt.onnx``."""
    from .export import OPTIMIZATION_LEVELS

    if level is None:
        return None
    if onnx is None:
        raise UsageError("--optimize needs --onnx PATH (it optimises the exported file)")
    if level not in OPTIMIZATION_LEVELS:
        raise UsageError(f"unknown --optimize level {level!r}; choose one of: {', '.join(OPTIMIZATION_LEVELS)}")
    return onnx.with_name(onnx.name.removesuffix(".onnx") + ".opt.onnx")


def print_parity(rows, title: str, console: Console = out) -> None:
    table = Table(title=title, title_justify="left")
    for column in ("output", "inputs", "max abs", "max rel", "float32 floor", "ok"):
        table.add_column(column)
    for r in rows:
        table.add_row(r.output, r.inputs, f"{r.max_abs:.2e}", f"{r.max_rel:.2e}",
                      f"{r.native_noise:.2e}" if r.native_noise is not None else "-",
                      "[green]yes[/green]" if r.ok else "[red]NO[/red]")
    console.print(table)


def print_layout_ops(path: Path, reference, sample_shape) -> None:
    """One line: the layout ops (Reshape, Transpose, Gather, Split, Slice, Concat) the file has
    beyond the reference's own export."""
    import torch

    from .export import added_layout_ops, describe_layout_ops, input_shape, layout_ops_why, session

    shape = tuple(sample_shape) if sample_shape else input_shape(session(path))
    if shape is None:
        return
    added = added_layout_ops(path, reference, (torch.randn(1, *shape),))
    out.print(f"layout ops added vs the original's export: {describe_layout_ops(added, layout_ops_why(path))}")


@app.command("verify-onnx", no_args_is_help=True)
def verify_onnx_cmd(
    onnx_file: Path = typer.Argument(..., help="The .onnx file to check."),
    reference: str = typer.Option(..., help="The model it must match: a torchvision/timm name (with --weights) "
                                            "or a saved lnconvert model."),
    weights: Optional[str] = typer.Option(None, help="Checkpoint for --reference (as in convert)."),
    weights_key: Optional[str] = typer.Option(None, "--weights-key", help="Where the state dict sits in the "
                                              "checkpoint, as a dotted path (e.g. state_dict_ema, state_dict.model); "
                                              "default: the one nested dict that matches the model."),
    input_size: Optional[str] = typer.Option(None, help="C,H,W when the ONNX input has dynamic spatial dims."),
    batch: List[int] = typer.Option([1, 4], help="Batch sizes to check (repeatable)."),
    data: Optional[Path] = typer.Option(None, help="Also check on your inputs: a .pt file holding one tensor "
                                                   "(N, C, H, W), checked in batches of 32."),
    tolerance: float = typer.Option(DEFAULT_TOLERANCE,
                                    help="Max relative error (or 4x the reference's own float32 floor)."),
    trust_pickle: bool = typer.Option(False, help="Allow checkpoints holding pickled objects (trusted files)."),
    trust_source: bool = typer.Option(False, "--trust-source", help="Let a saved model whose spec names a "
                                      "module:callable architecture import and run it (only for files you trust)."),
    debug: bool = typer.Option(False, help="Show tracebacks."),
) -> None:
    """Check an existing ONNX file against a PyTorch reference in ONNX Runtime; exit 5 on mismatch."""
    from .export import require_parity, verify_onnx
    from .io import load_model

    with _exit_codes(debug):
        size = _parse_size(input_size)
        with err.status(f"loading {reference}"):
            ref = load_model(reference, weights, trust_pickle=trust_pickle, trust_source=trust_source,
                             weights_key=weights_key)
        user = [] if data is None else list(_read_tensor_file(data, "--data").split(32))
        if size is None and user:
            size = tuple(user[0].shape[1:])
        rows = verify_onnx(onnx_file, ref, data=user, data_label=data.name if data else "data", sample_shape=size,
                           batch_sizes=batch, tolerance=tolerance)
        print_parity(rows, f"ONNX Runtime vs {reference}: {onnx_file}", out)
        print_layout_ops(onnx_file, ref, size)
        require_parity(rows, onnx_file)


@app.command("compact", no_args_is_help=True)
def compact_cmd(
    saved_model: Path = typer.Argument(..., help="A converted model saved by lnconvert (.safetensors)."),
    data: Optional[Path] = typer.Option(None, help="Calibration inputs: a .pt file holding one tensor (N, C, ...); "
                                                   "enables dead-twin removal and activity-weighted saliency."),
    target_macs: Optional[str] = typer.Option(None, help="MAC budget relative to the original model, e.g. 1.2x."),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="Default: SAVED-compact.safetensors."),
    force: bool = typer.Option(False, "--force", help="Overwrite an existing output file."),
    trust_source: bool = typer.Option(False, "--trust-source", help="Let a saved model whose spec names a "
                                      "module:callable architecture import and run it (only for files you trust)."),
    debug: bool = typer.Option(False, help="Show tracebacks."),
) -> None:
    """Remove twins that cannot change the output (exact), then the least salient ones to meet --target-macs."""
    from .compact import compact
    from .io import check_output_path, load_result, read_spec, save_with_spec, spec_for

    with _exit_codes(debug):
        target = check_output_path(output or saved_model.with_name(saved_model.name.replace(
            ".safetensors", "") + "-compact.safetensors"), force)
        batches = None if data is None else list(_read_tensor_file(data, "--data").split(32))
        with err.status(f"compacting {saved_model}"):
            result = compact(load_result(saved_model, trust_source=trust_source), data=batches,
                             target_macs=target_macs)
        rep = result.report
        table = Table(title=f"lnconvert compact: {saved_model}", show_header=False, title_justify="left")
        for label, value in (
            ("twins removed", ", ".join(f"{v} {k}" for k, v in rep.removed.items()) or "none"),
            ("MACs / sample", f"original {rep.macs_original:,} | converted {rep.macs_before:,} | "
                              f"compacted {rep.macs_after:,} ({rep.macs_after / max(rep.macs_original, 1):.2f}x)"),
            ("params", f"{rep.params_before:,} -> {rep.params_after:,}"),
            ("max rel deviation", f"{rep.max_rel_deviation:.2e} (vs the uncompacted model)"),
        ):
            table.add_row(label, value)
        out.print(table)
        for note in rep.notes:
            out.print(f"note: {note}")
        spec = read_spec(saved_model)
        options = result.conversion.options.to_dict() | {"twins": result.twins}
        save_with_spec(result.model, target, spec_for(spec["source"], spec.get("weights"), options,
                                                      spec["input_shape"], spec["report"]), force=force)
        out.print(f"saved {target}")


@app.command("list")
def list_cmd(pattern: str = typer.Argument("*", help="Glob pattern, e.g. 'resnet*'.")) -> None:
    """List model names lnconvert can load from torchvision and timm."""
    from .models import list_models

    rows = list_models(pattern)
    for library, name in rows:
        out.print(f"{library}/{name}", highlight=False)
    if not rows:
        err.print(f"no model matches {pattern!r}")
        raise typer.Exit(3)


@app.command("zoo", no_args_is_help=True)
def zoo_cmd(
    models: Optional[List[str]] = typer.Argument(None, help="Model names (torchvision or timm, as for convert)."),
    torchvision: bool = typer.Option(False, "--torchvision", help="All torchvision classification models."),
    torchvision_all: bool = typer.Option(False, "--torchvision-all", help="All torchvision builders of every task "
                                         "(classification, segmentation, detection, video, optical_flow, "
                                         "quantization); untraceable ones converted in parts."),
    torchvision_task: Optional[List[str]] = typer.Option(None, "--torchvision-task", help="All torchvision "
                                                         "builders of this task, e.g. detection (repeatable)."),
    timm_patterns: Optional[List[str]] = typer.Option(None, "--timm", help="timm models matching this glob, "
                                                                          "e.g. 'resnet*' (repeatable)."),
    timm_families: bool = typer.Option(False, "--timm-families", help="The smallest model (by parameter count) "
                                       "of every timm family: timm module + name stem, e.g. efficientnet:mixnet "
                                       "(choosing them builds every timm model on the meta device: minutes)."),
    jobs: int = typer.Option(1, "--jobs", "-j", help="Models converted in parallel (one subprocess each)."),
    timeout: float = typer.Option(600.0, help="Seconds per model; a model over it is a failed row (Timeout)."),
    threads: int = typer.Option(1, help="torch threads per model subprocess (1 is fastest on a shared machine)."),
    memory_gb: float = typer.Option(12.0, help="Address-space cap per model subprocess in GiB (0: none); "
                                              "a model over it fails alone (MemoryError)."),
    rerun: bool = typer.Option(False, "--rerun", help="Convert models already in the CSV again (default: skip them)."),
    onnx: bool = typer.Option(False, "--onnx", help="Also export each model to ONNX and check it in ONNX Runtime."),
    input_size: Optional[int] = typer.Option(None, help="Square input side; default the first of 64, 96, 128, 160, "
                                                        "192, 224 the model runs at (recorded per row)."),
    drop_bn: bool = typer.Option(True, "--drop-bn/--keep-bn", help="Remove BatchNorm (fold or affine)."),
    policy: str = typer.Option("mirror", help="Linking policy: mirror or minmax."),
    residual: str = typer.Option("slice", help="Residual boundary: slice or gate."),
    out_prefix: str = typer.Option("zoo-report", "--out", help="Writes PREFIX.csv (resumed) and PREFIX.md."),
    debug: bool = typer.Option(False, help="Show tracebacks."),
) -> None:
    """Convert many models, each in its own subprocess with a time limit, into PREFIX.csv / PREFIX.md.

    One row per model: traced, BN before -> after (folded/affine/kept), activations linked/skipped,
    consumers widened, boundaries, params and MACs, parity, time and status (exact, partial with
    the reason, failed with the error class). BN statistics are randomised first (random init).
    A failed model is a row, not an error: the exit code is 0 once every model has a row.
    """
    from .options import ConvertOptions
    from .zoo import STATUSES, ZooOptions, run_zoo, select_models

    # finished rows are on disk and running children were ended
    interrupted = f"interrupted; the rows finished so far are in {out_prefix}.csv (run again to resume)"
    with _exit_codes(debug, interrupted):
        ConvertOptions(policy=policy, residual=residual)  # validate before any model runs
        if input_size is not None and input_size <= 0:
            raise UsageError(f"--input-size must be a positive side length, got {input_size}")
        if threads < 1:
            raise UsageError(f"--threads must be at least 1, got {threads}")
        names = select_models(models or (), torchvision=torchvision, timm_patterns=timm_patterns or (),
                              timm_smallest_per_family=timm_families,
                              torchvision_task_list=(["all"] if torchvision_all else []) + list(torchvision_task or ()))
        if not names:
            raise UsageError("no models selected: give names, --torchvision, --torchvision-all, --torchvision-task "
                             "TASK, --timm PATTERN or --timm-families")
        options = ZooOptions(drop_bn=drop_bn, policy=policy, residual=residual, input_size=input_size, onnx=onnx,
                             timeout=timeout, memory_gb=memory_gb, threads=threads)
        rows = run_zoo(names, options, out=out_prefix, jobs=jobs, rerun=rerun, console=err)
        chosen = set(names)
        mine = [r for r in rows if r["model"] in chosen]
        out.print(", ".join(f"{sum(r['status'] == s for r in mine)} {s}" for s in STATUSES)
                  + f" of {len(mine)}; report {out_prefix}.csv, {out_prefix}.md", highlight=False)


recipe_app = typer.Typer(no_args_is_help=True, help="Runnable recipes (recipes/*.yaml): train, convert, "
                                                     "fine-tune BN-free, plot.")
app.add_typer(recipe_app, name="recipe")


@recipe_app.command("run")
def recipe_run(
    path: Path = typer.Argument(..., help="Recipe YAML, e.g. recipes/digits-resnet.yaml"),
    out_dir: Optional[Path] = typer.Option(None, "--out", "-o", help="Run directory (default runs/NAME)."),
    overrides: Optional[List[str]] = typer.Option(None, "--set", help="KEY=VALUE override, repeatable "
                                                                      "(e.g. pretrain.epochs=2)."),
    weights: Optional[str] = typer.Option(None, help="Source model checkpoint PATH (model.weights)."),
    data: Optional[str] = typer.Option(None, help="ImageFolder directory, or CIFAR-10 root (data.path / "
                                                  "data.data_root)."),
    fresh: bool = typer.Option(False, "--fresh", help="Ignore existing checkpoints in the run directory."),
    jobs: Optional[int] = typer.Option(None, "--jobs", "-j", help="Parallel processes for recipes with "
                                                                   "independent runs (depth, transfer)."),
    debug: bool = typer.Option(False, help="Show tracebacks."),
) -> None:
    """Run a recipe: metrics JSON, PNG plots, checkpoints (resumed) and the final model in OUT."""
    try:  # not _exit_codes: under torchrun one rank reports the run's failure and every rank exits non-zero
        from .recipes import run_recipe

        run_recipe(path, out=out_dir, overrides=overrides or (), resume=not fresh, weights=weights, data=data,
                   jobs=jobs, console=out)
    except (typer.Exit, click.exceptions.Exit):
        raise
    except BaseException as exc:
        from .recipes import distributed  # under torchrun: one message for the run, every rank non-zero

        failure = distributed.explain(exc)
        distributed.report_once(lambda: _fail(failure, debug, distributed.where()))
        if debug:  # another rank reported the run's failure
            traceback.print_exc()
        raise typer.Exit(getattr(failure, "exit_code", 130 if isinstance(failure, KeyboardInterrupt) else 1))


def main() -> None:
    app()


if __name__ == "__main__":
    sys.exit(main())
