"""Export-time lowering of linked activations (lnconvert.passes.lower_linked): exact for any
twin weights, and the exported graph adds no layout op for conv/linear consumers."""
import copy
from collections import Counter

import numpy as np
import onnx
import pytest
import torch
from torch import nn
from torchvision.ops import SqueezeExcitation

import lnconvert
from lnconvert.compact import compact
from lnconvert.export import added_layout_ops, describe_layout_ops, export_onnx, layout_ops, layout_ops_why, session
from lnconvert.nn import LinkedActivation
from lnconvert.passes import lower_linked

from ..conftest import prepared

ACTIVATIONS = {
    "relu": nn.ReLU, "relu6": nn.ReLU6, "silu": nn.SiLU, "hardswish": nn.Hardswish, "gelu": nn.GELU,
    "leaky_relu": lambda: nn.LeakyReLU(0.1), "prelu": nn.PReLU, "elu": nn.ELU,
}


class DepthwiseBlock(nn.Module):
    """Inverted residual: expand 1x1 -> act -> depthwise 3x3 -> act -> project 1x1, then a head."""

    def __init__(self, act):
        super().__init__()
        self.expand = nn.Sequential(nn.Conv2d(3, 16, 1), nn.BatchNorm2d(16), act())
        self.depthwise = nn.Sequential(nn.Conv2d(16, 16, 3, padding=1, groups=16), nn.BatchNorm2d(16), act())
        self.project = nn.Sequential(nn.Conv2d(16, 8, 1), nn.BatchNorm2d(8))
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(8 * 8 * 8, 12), act(), nn.Linear(12, 5))

    def forward(self, x):
        return self.head(self.project(self.depthwise(self.expand(x))))


class SqueezeExciteBlock(nn.Module):
    """Expand -> depthwise -> squeeze-excitation (pool, fc, gate times the tensor) -> project,
    then a pooled, flattened classifier: the linked tensors reach their convs and the
    linear through pooling, a gate multiply and a flatten."""

    def __init__(self):
        super().__init__()
        self.expand = nn.Sequential(nn.Conv2d(3, 16, 1), nn.BatchNorm2d(16), nn.Hardswish())
        self.depthwise = nn.Sequential(nn.Conv2d(16, 16, 3, padding=1, groups=16), nn.BatchNorm2d(16), nn.ReLU6())
        self.excite = SqueezeExcitation(16, 8, scale_activation=nn.Hardsigmoid)
        self.project = nn.Sequential(nn.Conv2d(16, 8, 1), nn.BatchNorm2d(8), nn.ReLU())
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(0.2), nn.Linear(8, 5))

    def forward(self, x):
        return self.head(self.project(self.excite(self.depthwise(self.expand(x)))))


class PooledStem(nn.Module):
    """resnet's stem and a basic block: a linked activation read through a max pooling by a
    conv and by the residual add (a ``slice`` boundary selects its primaries); mnasnet's
    pooling by ``mean`` before the classifier."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2))
        self.body = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                                  nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8))
        self.act = nn.ReLU()
        self.classifier = nn.Linear(8, 5)

    def forward(self, x):
        x = self.stem(x)
        return self.classifier(self.act(self.body(x) + x).mean((2, 3)))


def _train_twins(gm: nn.Module, seed: int = 1) -> None:
    """Give every twin weight (zero at conversion) a random value, as fine-tuning would, so
    the lowering is checked on the twin half too (at conversion it multiplies zeros)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in gm.parameters():
            p.add_(0.2 * torch.randn(p.shape, generator=generator) * (p == 0))


def _converted(act: str, policy: str = "mirror"):
    model, x = prepared(DepthwiseBlock(ACTIVATIONS[act]), shape=(2, 3, 8, 8))
    result = lnconvert.convert(model, example_inputs=x, policy=policy)
    _train_twins(result.model)
    return model, result, x


# one per twin form by default (clamp, identity, leaky identity, own twin PReLU, minmax
# identity); the rest in the slow stage
DEFAULT = {("relu6", "mirror"), ("silu", "mirror"), ("leaky_relu", "mirror"), ("prelu", "mirror"), ("relu", "minmax")}
CASES = [pytest.param(a, p, marks=() if (a, p) in DEFAULT else pytest.mark.slow)
         for a in sorted(ACTIVATIONS) for p in ("mirror", "minmax")]


def _lowered_exactly(wide: nn.Module, x: torch.Tensor):
    """``wide`` lowered on ``x`` in float64, checked to compute what ``wide`` does (1e-10 relative);
    the lowered module and the number of consumers rewritten."""
    lowered, rewritten = lower_linked.run(wide, (x.double(),))
    with torch.no_grad():
        expected, got = wide(x.double()), lowered(x.double())
    assert (expected - got).abs().max() <= 1e-10 * max(1.0, float(expected.abs().max()))
    return lowered, rewritten


def _assert_ort_matches(path, expected: torch.Tensor, x: torch.Tensor, rel: float = 1e-5) -> None:
    """ONNX Runtime's output of ``path`` on ``x`` is within ``rel`` of ``expected`` (relative to its
    largest magnitude, at least 1)."""
    sess = session(path)
    got = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
    assert np.abs(got - expected.numpy()).max() <= rel * max(1.0, float(expected.abs().max()))


@pytest.mark.parametrize("act,policy", CASES)
def test_lowering_is_exact_for_trained_twins(act, policy):
    _, result, x = _converted(act, policy)
    lowered, rewritten = _lowered_exactly(result.model.eval().double(), x)
    assert rewritten == 3  # the depthwise conv, the project conv, the last linear
    calls = [lowered.get_submodule(n.target) for n in lowered.graph.nodes if n.op == "call_module"]
    assert not any(isinstance(m, LinkedActivation) for m in calls)  # no concatenated tensor left
    assert any(m.lnc_twin_channels.numel() for m in result.model.modules() if hasattr(m, "lnc_twin_channels"))


def test_lowering_leaves_the_model_and_its_trainable_twins_alone():
    _, result, x = _converted("relu6")
    before = {k: v.clone() for k, v in result.model.state_dict().items()}
    lower_linked.run(result.model, (x,))
    after = result.model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert sum(isinstance(m, LinkedActivation) for m in result.model.modules()) == 3


@pytest.mark.parametrize("act", ["relu6", pytest.param("silu", marks=pytest.mark.slow),
                                 pytest.param("prelu", marks=pytest.mark.slow)])
def test_exported_depthwise_net_adds_no_layout_op_and_matches_in_ort(tmp_path, act):
    model, result, x = _converted(act)
    path = export_onnx(result, tmp_path / "m.onnx")
    assert not added_layout_ops(path, model, (x,)), describe_layout_ops(added_layout_ops(path, model, (x,)))
    assert layout_ops(path)["Concat"] == 0  # the unlowered export has one per linked activation
    if act == "relu6":
        _assert_every_clip_fuses_into_its_conv(path)
    with torch.no_grad():
        _assert_ort_matches(path, result.model.eval()(x), x)


def _assert_every_clip_fuses_into_its_conv(path):
    """ONNX Runtime keeps a Clip in its blocked layout only fused into the conv before it
    (whose output it alone reads); elsewhere the lowering writes ReLU6 as HardSigmoids,
    whose affine input the export folds into the op."""
    graph = onnx.load(str(path)).graph
    producer = {out: node for node in graph.node for out in node.output}
    readers = Counter(name for node in graph.node for name in node.input)
    clips = [n for n in graph.node if n.op_type == "Clip"]
    assert clips and all(producer[c.input[0]].op_type == "Conv" and readers[c.input[0]] == 1 for c in clips)
    constants = {i.name for i in graph.initializer}
    feeds = [producer.get(n.input[0]) for n in graph.node if n.op_type == "HardSigmoid"]
    assert feeds and not any(f is not None and f.op_type in ("Add", "Mul", "Neg", "Sub", "Div")
                             and (f.op_type == "Neg" or set(f.input) & constants) for f in feeds)


def test_fold_affine_into_hardsigmoid_matches_the_unfolded_graph(tmp_path):
    class Gates(nn.Module):
        def forward(self, x):
            return torch.nn.functional.hardsigmoid(-2.0 * x + 1.5) + torch.nn.functional.hardsigmoid(x / 4 - 3)

    x = torch.linspace(-9, 9, 2 * 3 * 5 * 5).reshape(2, 3, 5, 5)
    path = export_onnx(Gates(), tmp_path / "g.onnx", example_inputs=(x,))
    ops = Counter(n.op_type for n in onnx.load(str(path)).graph.node)
    assert ops["HardSigmoid"] == 2 and not ops["Mul"] + ops["Div"] + ops["Sub"] + ops["Neg"]
    sess = session(path)
    got = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
    assert np.abs(got - Gates()(x).numpy()).max() <= 1e-6


def test_squeeze_excitation_and_pooled_head_read_the_halves(tmp_path):
    model, x = prepared(SqueezeExciteBlock(), shape=(2, 3, 8, 8))
    result = lnconvert.convert(model, example_inputs=x)
    _train_twins(result.model)
    _, rewritten = _lowered_exactly(copy.deepcopy(result.model).eval().double(), x)
    assert rewritten == 5  # depthwise, SE fc1 (through the pool), SE fc2, project (through the gate), classifier
    path = export_onnx(result, tmp_path / "se.onnx")
    # the classifier reads the pooled halves as two 1x1 convs, summed before one flatten: no
    # Reshape per half, no Concat or Gather
    assert not added_layout_ops(path, model, (x,)), describe_layout_ops(added_layout_ops(path, model, (x,)))
    with torch.no_grad():
        _assert_ort_matches(path, result.model.eval()(x), x)


def test_max_pooled_halves_feed_the_conv_and_the_residual(tmp_path):
    model, x = prepared(PooledStem(), shape=(2, 3, 8, 8))
    result = lnconvert.convert(model, example_inputs=x, residual="slice")
    _train_twins(result.model)
    _, rewritten = _lowered_exactly(copy.deepcopy(result.model).eval().double(), x)
    assert rewritten == 3  # body conv 1 (through the max pool), body conv 2, the linear
    path = export_onnx(result, tmp_path / "stem.onnx")
    assert not added_layout_ops(path, model, (x,)), describe_layout_ops(added_layout_ops(path, model, (x,)))


def test_compacted_model_lowers_exactly(tmp_path):
    model, x = prepared(DepthwiseBlock(nn.ReLU), shape=(2, 3, 8, 8))
    result = lnconvert.convert(model, example_inputs=x)
    _train_twins(result.model)  # trained twins survive the exact stage; the budget keeps some of them
    small = compact(result, target_macs="1.5x")
    assert any(getattr(m, "subset", False) for m in small.model.modules())
    _, rewritten = _lowered_exactly(small.model.eval().double(), x)
    assert rewritten >= 1


def test_describe_layout_ops_names_each_op():
    assert describe_layout_ops(Counter()) == "+0"
    assert describe_layout_ops(Counter({"Concat": 2, "Slice": 1})) == "+3 (Concat 2, Slice 1)"


class ShuffleBlock(nn.Module):
    """shufflenet_v2's unit: half the channels pass, the other half go through a branch ending
    in a ReLU, then concat, channel shuffle and chunk, and a conv reads one piece."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 1), nn.BatchNorm2d(8))
        self.branch = nn.Sequential(nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4), nn.ReLU())
        self.head = nn.Conv2d(4, 5, 1)

    def forward(self, x):
        from torchvision.models.shufflenetv2 import channel_shuffle

        kept, branched = self.stem(x).chunk(2, dim=1)
        mixed = channel_shuffle(torch.cat((kept, self.branch(branched)), dim=1), 2)
        return self.head(mixed.chunk(2, dim=1)[1])


def test_layout_ops_of_a_channel_shuffle_are_named(tmp_path):
    """A linked tensor through concat + shuffle + chunk is exported with a Concat of its halves
    and a Gather per piece (not split per half): the report names both."""
    model, x = prepared(ShuffleBlock(), shape=(2, 3, 8, 8))
    result = lnconvert.convert(model, example_inputs=x)
    _train_twins(result.model)
    path = export_onnx(result, tmp_path / "shuffle.onnx")
    added = added_layout_ops(path, model, (x,))
    why = layout_ops_why(path)
    assert added["Gather"] >= 1 and why["linked activation read by cat"] == 1, (added, why)
    assert any(reason.startswith("channel selection") for reason in why), why
    assert "kept: 1 linked activation read by cat" in describe_layout_ops(added, why)
    with torch.no_grad():
        _assert_ort_matches(path, result.model.eval()(x), x)


def test_describe_layout_ops_names_why_when_given():
    why = Counter({"linked activation read by cat": 2})
    assert describe_layout_ops(Counter(), why) == "+0"
    assert describe_layout_ops(Counter({"Concat": 2}), why) == "+2 (Concat 2); kept: 2 linked activation read by cat"


class GhostBlock(nn.Module):
    """timm's ghost module: a 1x1 conv and a cheap depthwise conv of its output, both with a
    ReLU, concatenated and cut to ``out`` channels (odd: one channel is dropped), read by a
    1x1 conv."""

    def __init__(self, out: int = 7):
        super().__init__()
        self.out = out
        self.primary = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nn.ReLU())
        self.cheap = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1, groups=4), nn.BatchNorm2d(4), nn.ReLU())
        self.head = nn.Conv2d(out, 5, 1)

    def forward(self, x):
        x1 = self.primary(x)
        return self.head(torch.cat([x1, self.cheap(x1)], dim=1)[:, :self.out])


def test_concat_of_linked_activations_is_lowered_like_one(tmp_path):
    """The ghost module's concat of two linked activations becomes one linked activation of the
    concatenated inputs, which the head reads as halves: no layout op beyond the original's but,
    for an odd cut, a second Slice (each half is cut), which the report names."""
    for out, added in ((8, Counter()), (7, Counter({"Slice": 1}))):
        model, x = prepared(GhostBlock(out), shape=(2, 3, 8, 8))
        result = lnconvert.convert(model, example_inputs=x)
        _train_twins(result.model)
        lowered, _ = _lowered_exactly(copy.deepcopy(result.model).eval().double(), x)
        why = lower_linked.kept_whole(lowered)
        assert not any(reason.startswith(("linked", "channel")) for reason in why), why
        path = export_onnx(result, tmp_path / f"ghost{out}.onnx")
        assert added_layout_ops(path, model, (x,)) == added
        assert sum(layout_ops_why(path).values()) == (2 if out == 7 else 0), layout_ops_why(path)
        with torch.no_grad():
            _assert_ort_matches(path, result.model.eval()(x), x)
