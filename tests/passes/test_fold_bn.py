"""fold_bn on its own: what folds, what becomes an affine, what is kept (and never touched)."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lnconvert import passes
from lnconvert.errors import UnsupportedModelError

from .graphs import BnAfterAdd, module_types, outputs_match, traced, until


def fold(net, shape=(2, 3, 8, 8), **options):
    gm, ctx = traced(net, shape, **options)
    original = until(gm, ctx, "fold_bn")[0]
    before = copy.deepcopy(original)
    return passes.fold_bn.run(original, ctx), ctx, before


def actions(ctx) -> list[tuple[str, str]]:
    return [(b["name"], b["action"]) for b in ctx.report.batchnorm]


@pytest.mark.parametrize("conv", [nn.Conv1d(3, 4, 3), nn.Conv2d(3, 4, 3), nn.Conv3d(3, 4, 3),
                                  nn.ConvTranspose2d(3, 4, 3), nn.Conv2d(3, 4, 3, bias=False)])
def test_bn_after_a_single_use_conv_folds_into_it(conv):
    shape = {1: (2, 3, 9), 2: (2, 3, 8, 8), 3: (2, 3, 5, 5, 5)}[conv.weight.dim() - 2]
    bn = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}[conv.weight.dim() - 2](4)
    gm, ctx, before = fold(nn.Sequential(conv, bn, nn.ReLU()), shape)
    assert actions(ctx) == [("1", "folded")]
    assert module_types(gm) == {type(conv).__name__: 1, "ReLU": 1}  # BN gone, no affine in its place
    assert gm.get_submodule("0").bias is not None  # a bias-free conv gains the BN's shift
    assert outputs_match(before, gm, ctx.example_inputs[0])


def test_bn_after_linear_folds():
    gm, ctx, before = fold(nn.Sequential(nn.Linear(6, 5), nn.BatchNorm1d(5), nn.ReLU()), (4, 6))
    assert actions(ctx) == [("1", "folded")] and "BatchNorm1d" not in module_types(gm)
    assert outputs_match(before, gm, ctx.example_inputs[0])


def test_bn_after_timm_conv2dsame_folds_instead_of_becoming_an_affine():
    layers = pytest.importorskip("timm.layers")
    gm, ctx, before = fold(nn.Sequential(layers.Conv2dSame(3, 4, 3, stride=2), nn.BatchNorm2d(4), nn.ReLU()),
                           (2, 3, 9, 9))
    assert actions(ctx) == [("1", "folded")] and "ChannelAffine" not in module_types(gm)
    assert outputs_match(before, gm, ctx.example_inputs[0])


class _Conv3dWithAHelper(nn.Conv3d):
    """As torchvision's Conv3DSimple (r3d_18): a conv subclass that adds a static method only."""

    @staticmethod
    def stride_for(stride: int) -> tuple[int, int, int]:
        return stride, stride, stride


class _ConvThatComputesMore(nn.Conv2d):
    def forward(self, x):
        return super().forward(x) * 2.0  # overrides the computation: not a plain conv any more


def test_bn_after_a_conv_subclass_that_inherits_forward_folds_into_it():
    gm, ctx, before = fold(nn.Sequential(_Conv3dWithAHelper(3, 4, 3), nn.BatchNorm3d(4), nn.ReLU()), (2, 3, 5, 5, 5))
    assert actions(ctx) == [("1", "folded")] and "ChannelAffine" not in module_types(gm)
    assert outputs_match(before, gm, ctx.example_inputs[0])


def test_bn_after_a_conv_subclass_that_overrides_forward_is_not_folded_into_it():
    gm, ctx, before = fold(nn.Sequential(_ConvThatComputesMore(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU()))
    assert ("1", "folded") not in actions(ctx)
    assert outputs_match(before, gm, ctx.example_inputs[0])


class _ConvUsedTwice(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)

    def forward(self, x):
        y = self.conv(x)
        return self.bn(y) + y  # the conv's output is read elsewhere: folding would change that reader


class _SharedBn(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.bn = nn.Conv2d(3, 4, 3), nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)

    def forward(self, x):
        return self.bn(self.a(x)) + self.bn(self.b(x))


@pytest.mark.parametrize("net,detail", [
    (_ConvUsedTwice(), "producer is not a conv/linear used only here"),
    (BnAfterAdd(), "producer is not a conv/linear used only here"),
    (nn.Sequential(nn.BatchNorm2d(3), nn.Conv2d(3, 4, 3)), "producer is not a conv/linear used only here"),
])
def test_bn_that_cannot_fold_becomes_one_affine_and_no_conv_changes(net, detail):
    gm, ctx, before = fold(net)
    assert [(b["action"], b["detail"]) for b in ctx.report.batchnorm] == [("affine", detail)]
    assert module_types(gm)["ChannelAffine"] == 1 and "BatchNorm2d" not in module_types(gm)
    for name, module in before.named_modules():  # negative: no conv was folded into
        if isinstance(module, nn.Conv2d):
            assert torch.equal(gm.get_submodule(name).weight, module.weight)
    assert outputs_match(before, gm, ctx.example_inputs[0])


def test_shared_bn_module_folds_into_each_single_use_conv_per_call_site():
    gm, ctx, before = fold(_SharedBn())
    assert ctx.report.batchnorm == [{"name": "bn", "action": "folded", "detail": "into a"},
                                    {"name": "bn", "action": "folded", "detail": "into b"}]
    assert "ChannelAffine" not in module_types(gm) and "BatchNorm2d" not in module_types(gm)
    assert outputs_match(before, gm, ctx.example_inputs[0])


class _SharedPreActivationBn(nn.Module):
    def __init__(self):
        super().__init__()
        self.bn = nn.BatchNorm2d(3)

    def forward(self, x):
        return self.bn(x) + self.bn(x * 2)


def test_shared_bn_module_without_a_conv_becomes_an_affine_per_call_site():
    gm, ctx, before = fold(_SharedPreActivationBn())
    assert [b["detail"] for b in ctx.report.batchnorm] == ["shared BN module, per call site"] * 2
    assert module_types(gm)["ChannelAffine"] == 2
    assert outputs_match(before, gm, ctx.example_inputs[0])


class _CatOfConvs(nn.Module):
    def __init__(self, cat, reuse: bool = False):
        super().__init__()
        self.cat, self.reuse = cat, reuse
        self.a, self.b, self.bn = nn.Conv2d(3, 4, 3), nn.Conv2d(3, 2, 3), nn.BatchNorm2d(6)

    def forward(self, x):
        a = self.a(x)
        y = self.bn(self.cat([a, self.b(x)], 1))
        return y + a.sum() if self.reuse else y


@pytest.mark.parametrize("cat", [torch.cat, torch.concat, torch.concatenate])
def test_bn_after_a_cat_of_single_use_convs_folds_into_each(cat):
    gm, ctx, before = fold(_CatOfConvs(cat))
    assert ctx.report.batchnorm == [{"name": "bn", "action": "folded", "detail": "into a, b"}]
    assert "ChannelAffine" not in module_types(gm)
    assert outputs_match(before, gm, ctx.example_inputs[0])


def test_bn_after_a_cat_whose_conv_is_read_elsewhere_is_an_affine():
    gm, ctx, before = fold(_CatOfConvs(torch.cat, reuse=True))
    assert actions(ctx) == [("bn", "affine")]
    assert torch.equal(gm.get_submodule("a").weight, before.get_submodule("a").weight)


def test_bn_without_running_statistics_is_kept_and_reported():
    gm, ctx, _ = fold(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, track_running_stats=False)))
    assert actions(ctx) == [("1", "kept")] and module_types(gm)["BatchNorm2d"] == 1


class _FunctionalBn(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.register_buffer("mean", torch.zeros(4))
        self.register_buffer("var", torch.ones(4))

    def forward(self, x):
        return F.batch_norm(self.conv(x), self.mean, self.var)


class _WeightStandardised(nn.Conv2d):  # timm's StdConv2d idea: batch_norm over the weight, not activations
    def forward(self, x):
        flat = self.weight.reshape(1, self.out_channels, -1)
        w = F.batch_norm(flat, None, None, training=True).reshape_as(self.weight)
        return F.conv2d(x, w, self.bias)


def test_functional_batch_norm_on_activations_is_kept_and_reported():
    gm, ctx, _ = fold(_FunctionalBn())
    assert actions(ctx) == [("batch_norm", "kept")]
    assert sum(n.target is F.batch_norm for n in gm.graph.nodes) == 1


def test_functional_batch_norm_on_a_weight_is_no_batchnorm_of_activations():
    gm, ctx, _ = fold(nn.Sequential(_WeightStandardised(3, 4, 3), nn.ReLU()))
    assert ctx.report.batchnorm == []  # negative: neither folded nor reported
    assert sum(n.target is F.batch_norm for n in gm.graph.nodes) == 1


def test_a_fold_giving_non_finite_weights_is_refused():
    gm, ctx = traced(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)))
    bn = gm.get_submodule("1")
    bn.eps = 0.0
    bn.running_var.zero_()  # running_var + eps == 0: the scale is infinite
    with pytest.raises(UnsupportedModelError, match="non-finite"):
        passes.fold_bn.run(gm, ctx)


def test_graph_without_batchnorm_is_left_alone():
    gm, ctx, before = fold(nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 2, 1)))
    assert ctx.report.batchnorm == [] and module_types(gm) == module_types(before)
    assert all(torch.equal(p, q) for p, q in zip(gm.parameters(), before.parameters()))


@pytest.mark.parametrize("shape,axis", [((10, 3, 3, 3), 0), ((7, 5), 0), ((4, 6, 3, 3), 1)])
def test_folding_in_blocks_of_rows_rounds_as_one_float64_product(monkeypatch, shape, axis):
    """Rows of 27, 5 and 54 elements in blocks of 60: several blocks, a short last one; a
    transposed conv's scale runs along axis 1, so every block reads the whole factor."""
    monkeypatch.setattr(passes.fold_bn, "_BLOCK", 60)
    weight = torch.randn(shape)
    view = [1] * len(shape)
    view[axis] = -1
    factor = (torch.rand(shape[axis], dtype=torch.float64) * 3 + 0.1).view(view)
    expected = (weight.double() * factor).to(weight.dtype)
    assert torch.equal(passes.fold_bn._times_in_float64(weight, factor), expected)
