"""Per-rule behaviour through `convert()` on small hand-built nets: structure (what changed), parity, and what
must not change. Each pass alone is tested in tests/passes/, the registry in tests/rules/."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lnconvert
from lnconvert.errors import UnsupportedModelError
from lnconvert.nn import ChannelAffine, ChannelSelect, GatedMerge, LinkedActivation
from lnconvert.testing import randomize_batchnorm

from .helpers import assert_exact, linked, modules_of

POLICIES = ["mirror", "minmax"]


def bn_net(*layers):
    net = nn.Sequential(*layers).eval()
    randomize_batchnorm(net, torch.randn(8, *IN_SHAPE[layers[0].__class__]))
    return net


IN_SHAPE = {nn.Conv1d: (3, 16), nn.Conv2d: (3, 12, 12), nn.Conv3d: (3, 6, 6, 6), nn.Linear: (5,),
            nn.ConvTranspose2d: (3, 6, 6)}


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("conv,bn", [(nn.Conv1d, nn.BatchNorm1d), (nn.Conv2d, nn.BatchNorm2d),
                                     (nn.Conv3d, nn.BatchNorm3d)])
@pytest.mark.parametrize("bias", [True, False])
def test_dense_conv_chain_folds_links_and_widens(policy, conv, bn, bias):
    net = bn_net(conv(3, 6, 3, padding=1, bias=bias), bn(6), nn.ReLU(), conv(6, 4, 3, bias=bias), bn(4))
    x = torch.randn(2, *IN_SHAPE[conv])
    result = assert_exact(net, x, policy=policy)
    assert result.report.count(result.report.batchnorm) == {"folded": 2}
    assert not lnconvert.remaining_batchnorm(result.model)
    widened = [m for m in result.model.modules() if type(m) is conv and m.in_channels == 12]
    assert len(widened) == 1 and torch.count_nonzero(widened[0].weight[:, 6:]) == 0  # twins start at zero
    assert [m.policy for m in modules_of(result.model, LinkedActivation)] == [policy]


@pytest.mark.parametrize("groups", [2, 6])
def test_grouped_and_depthwise_consumers_get_a_grouped_layout(groups):
    net = bn_net(nn.Conv2d(3, 6, 1), nn.BatchNorm2d(6), nn.ReLU6(), nn.Conv2d(6, 6, 3, padding=1, groups=groups),
                 nn.BatchNorm2d(6), nn.ReLU(), nn.Conv2d(6, 2, 1))
    result = assert_exact(net, torch.randn(2, 3, 12, 12))
    acts = modules_of(result.model, LinkedActivation)
    assert sorted(a.groups for a in acts) == [1, groups]
    grouped = [m for m in result.model.modules() if isinstance(m, nn.Conv2d) and m.groups == groups][0]
    assert grouped.in_channels == 12 and grouped.weight.shape[1] == 12 // groups
    assert not modules_of(result.model, ChannelSelect)


def test_transposed_conv_absorbs():
    net = bn_net(nn.ConvTranspose2d(3, 4, 3, stride=2), nn.BatchNorm2d(4), nn.ELU(),
                 nn.ConvTranspose2d(4, 2, 3, stride=2), nn.BatchNorm2d(2))
    result = assert_exact(net, torch.randn(2, 3, 6, 6))
    assert result.report.count(result.report.batchnorm) == {"folded": 2}
    assert [c["in_after"] for c in result.report.consumers] == [8]


class FlattenHead(nn.Module):
    def __init__(self, pool: bool, how: str):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)
        self.pool = nn.AdaptiveAvgPool2d(2) if pool else nn.Identity()
        self.fc = nn.Linear(4 * (4 if pool else 100), 3)
        self.how = how

    def forward(self, x):
        x = self.pool(F.relu(self.bn(self.conv(x))))
        if self.how == "flatten":
            x = torch.flatten(x, 1)
        elif self.how == "view":
            x = x.view(x.size(0), -1)
        else:
            x = x.reshape(-1, x.shape[1] * x.shape[2] * x.shape[3])
        return self.fc(x)


@pytest.mark.parametrize("pool", [True, False])
@pytest.mark.parametrize("how", ["flatten", "view", "reshape"])
def test_flatten_into_linear_maps_feature_indices(pool, how):
    net = FlattenHead(pool, how).eval()
    randomize_batchnorm(net, torch.randn(8, 3, 12, 12))
    result = assert_exact(net, torch.randn(2, 3, 12, 12))
    assert len(linked(result)) == 1
    fc = result.model.fc
    assert fc.in_features == 2 * net.fc.in_features
    assert torch.count_nonzero(fc.weight) == torch.count_nonzero(net.fc.weight)


def test_linear_on_tokens_links_the_last_axis():
    net = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 8)).eval()
    result = assert_exact(net, torch.randn(2, 5, 8))
    act = modules_of(result.model, LinkedActivation)[0]
    assert act.dim == 2 and result.model.get_submodule("2").in_features == 32


class Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.conv2, self.bn2 = nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.relu = nn.ReLU(inplace=True)  # shared across call sites, like torchvision's ResNet
        self.head = nn.Conv2d(4, 2, 1)

    def forward(self, x):
        x = self.relu(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += x
        return self.head(self.relu(out))


@pytest.mark.parametrize("residual", ["slice", "gate"])
def test_residual_boundary_and_shared_module(residual):
    net = Residual().eval()
    randomize_batchnorm(net, torch.randn(8, 4, 8, 8))
    result = assert_exact(net, torch.randn(2, 4, 8, 8), residual=residual)
    assert len(linked(result)) == 3  # the shared relu, linked per call site
    kinds = result.report.count(result.report.boundaries, "kind")
    assert kinds == {residual: 1}
    assert len(modules_of(result.model, GatedMerge)) == (1 if residual == "gate" else 0)


def test_gate_boundary_trains_twins_into_the_residual_stream():
    net = Residual().eval()
    result = lnconvert.convert(net, example_inputs=torch.randn(2, 4, 8, 8), residual="gate")
    gate = modules_of(result.model, GatedMerge)[0]
    gate.gate.data.fill_(0.5)
    with torch.no_grad():
        assert not torch.allclose(result.model(torch.randn(2, 4, 8, 8)), net(torch.randn(2, 4, 8, 8)))


class Concat(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Conv2d(3, 4, 1), nn.Conv2d(3, 2, 1), nn.Conv2d(3, 3, 1)
        self.bn = nn.BatchNorm2d(9)
        self.out = nn.Conv2d(9, 2, 1)

    def forward(self, x):
        y = torch.cat([F.relu(self.a(x)), self.b(x), torch.sigmoid(self.c(x))], dim=1)  # mixed cat
        return self.out(torch.relu(self.bn(y)))


def test_concatenation_with_mixed_inputs_and_pre_activation_bn():
    net = Concat().eval()
    randomize_batchnorm(net, torch.randn(8, 3, 6, 6))
    result = assert_exact(net, torch.randn(2, 3, 6, 6))
    assert result.report.count(result.report.batchnorm) == {"affine": 1}
    assert len(modules_of(result.model, ChannelAffine)) == 1


class SqueezeExcite(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.fc1, self.fc2, self.proj = (nn.Conv2d(3, 6, 3), nn.Conv2d(6, 2, 1), nn.Conv2d(2, 6, 1),
                                                    nn.Conv2d(6, 4, 1))

    def forward(self, x):
        x = F.silu(self.conv(x))
        s = x.mean((2, 3), keepdim=True)
        s = torch.sigmoid(self.fc2(F.relu(self.fc1(s))))
        return self.proj(x * s)


def test_squeeze_excitation_gate_skipped_and_expanded():
    result = assert_exact(SqueezeExcite().eval(), torch.randn(2, 3, 9, 9))
    acts = {a["type"]: a for a in result.report.activations}
    assert acts["sigmoid"]["action"] == "skipped" and "gate" in acts["sigmoid"]["detail"]
    assert acts["silu"]["action"] == "linked" and acts["relu"]["action"] == "linked"
    assert result.model.proj.in_channels == 12


class Functional(nn.Module):
    def __init__(self, act):
        super().__init__()
        self.conv1, self.conv2, self.act = nn.Conv2d(3, 4, 3), nn.Conv2d(4, 2, 3), act

    def forward(self, x):
        return self.conv2(self.act(self.conv1(x)))


ACTIVATIONS = [
    nn.ReLU(), nn.ReLU6(), nn.LeakyReLU(0.2), nn.PReLU(4), nn.ELU(0.7), nn.SELU(), nn.CELU(1.3), nn.SiLU(),
    nn.GELU(), nn.GELU(approximate="tanh"), nn.Hardswish(), nn.Hardtanh(-2, 3), nn.Mish(), nn.Tanh(), nn.Sigmoid(),
    F.relu, torch.relu, lambda x: x.relu(), lambda x: x.relu_(), lambda x: F.relu(x, inplace=True),
    lambda x: F.leaky_relu(x, 0.3), lambda x: F.gelu(x, approximate="tanh"), F.silu, F.hardswish,
    lambda x: F.hardtanh(x, -0.5, 0.5), torch.tanh, lambda x: x.sigmoid(), F.selu, F.elu, F.mish,
]


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("act", ACTIVATIONS, ids=lambda a: getattr(a, "__name__", type(a).__name__))
def test_every_activation_form_links(act, policy):
    if not isinstance(act, nn.Module):
        act = FunctionalModule(act)
    result = assert_exact(Functional(act).eval(), torch.randn(2, 3, 8, 8), policy=policy)
    assert len(linked(result)) == 1
    assert result.model.conv2.in_channels == 8


class FunctionalModule(nn.Module):
    """Wraps a function so fx traces the call itself (the function is not a submodule)."""

    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, x):
        return self.fn(x)


def test_in_place_activation_readers_see_its_output():
    class InPlace(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.head = nn.Conv2d(3, 4, 1), nn.Conv2d(4, 2, 1)

        def forward(self, x):
            y = self.conv(x)
            F.relu(y, inplace=True)  # result unused: y itself was overwritten
            return self.head(y) + y.sum()

    result = assert_exact(InPlace().eval(), torch.randn(2, 3, 5, 5))
    assert len(linked(result)) == 1


def test_activation_filter_and_unknown_names():
    net = nn.Sequential(nn.Conv2d(3, 4, 1), nn.ReLU(), nn.Conv2d(4, 4, 1), nn.SiLU(), nn.Conv2d(4, 2, 1)).eval()
    result = assert_exact(net, torch.randn(2, 3, 4, 4), activations=["swish"])
    assert [a["type"] for a in linked(result)] == ["silu"]
    skipped = [a for a in result.report.activations if a["action"] == "skipped"]
    assert skipped[0]["detail"] == "type relu not selected"
    with pytest.raises(lnconvert.LnConvertError, match="unknown activation"):
        lnconvert.convert(net, activations=["rleu"], example_inputs=torch.randn(1, 3, 4, 4))


def test_width_never_compounds_and_output_activation_is_not_linked():
    net = nn.Sequential(nn.Conv2d(3, 4, 1), nn.ReLU(), nn.MaxPool2d(2), nn.ReLU(), nn.Conv2d(4, 4, 1),
                        nn.Tanh()).eval()
    result = assert_exact(net, torch.randn(2, 3, 4, 4))
    acts = result.report.activations
    assert [a["action"] for a in acts] == ["skipped", "linked", "skipped"]
    assert "no absorbing consumer" in acts[0]["detail"] and "no absorbing consumer" in acts[2]["detail"]
    widths = [m.in_channels for m in result.model.modules() if isinstance(m, nn.Conv2d)]
    assert widths == [3, 8]  # 2C at most


def test_bn_without_running_stats_is_refused_or_calibrated():
    net = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4, track_running_stats=False), nn.ReLU(),
                        nn.Conv2d(4, 2, 1)).eval()
    x = torch.randn(4, 3, 4, 4)
    with pytest.raises(UnsupportedModelError, match="BatchNorm '1' has no running statistics.*calibration_data="):
        lnconvert.convert(net, example_inputs=x)
    kept = assert_exact(net, x, drop_bn=False)  # kept on request: the model still depends on the batch
    assert kept.report.batchnorm == [] and lnconvert.remaining_batchnorm(kept.model) == ["1"]
    result = lnconvert.convert(net, example_inputs=x, calibration_data=[torch.randn(8, 3, 4, 4)])
    assert result.report.status == "exact" and result.report.calibrated == ["1"]
    assert [b["action"] for b in result.report.batchnorm] == ["folded"]


def test_bn_after_activation_gets_duplicated_parameters_when_kept():
    net = bn_net(nn.Conv2d(3, 4, 1), nn.ReLU(), nn.BatchNorm2d(4), nn.Conv2d(4, 2, 1))
    result = assert_exact(net, torch.randn(2, 3, 4, 4), drop_bn=False)
    bn = [m for m in result.model.modules() if isinstance(m, nn.BatchNorm2d)][0]
    assert bn.num_features == 8
    result = assert_exact(net, torch.randn(2, 3, 4, 4))
    assert modules_of(result.model, ChannelAffine)[0].scale.numel() == 8


def test_no_link_only_drops_bn():
    net = bn_net(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 2, 1))
    result = assert_exact(net, torch.randn(2, 3, 4, 4), link=False)
    assert not modules_of(result.model, LinkedActivation) and not lnconvert.remaining_batchnorm(result.model)


def test_timm_batchnormact_is_decomposed_not_silently_folded():
    pytest.importorskip("timm")
    from timm.layers import BatchNormAct2d

    net = nn.Sequential(nn.Conv2d(3, 4, 3), BatchNormAct2d(4, act_layer=nn.SiLU), nn.Conv2d(4, 2, 1)).eval()
    randomize_batchnorm(net, torch.randn(8, 3, 8, 8))
    result = assert_exact(net, torch.randn(2, 3, 8, 8))
    assert [a["type"] for a in linked(result)] == ["silu"]
    assert result.report.count(result.report.batchnorm) == {"folded": 1}


def test_untraceable_model_names_the_module_and_suggests_leaf():
    class Branchy(nn.Module):
        def forward(self, x):
            return x if x.sum() > 0 else -x

    class Outer(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.branchy = nn.Conv2d(3, 3, 1), Branchy()

        def forward(self, x):
            return self.branchy(self.conv(x))

    with pytest.raises(lnconvert.LnConvertError, match=r"module 'branchy'.*control flow.*leaf_modules"):
        lnconvert.convert(Outer(), example_inputs=torch.randn(1, 3, 4, 4), partial=False)  # default: in parts
    result = assert_exact(Outer().eval(), torch.randn(1, 3, 4, 4), leaf_modules=["branchy"])
    assert result.report.status == "exact"


def test_nan_weights_refused_with_parameter_name():
    net = nn.Sequential(nn.Conv2d(3, 4, 1))
    net[0].weight.data[0, 0] = float("nan")
    with pytest.raises(lnconvert.LnConvertError, match="'0.weight' contains NaN"):
        lnconvert.convert(net, example_inputs=torch.randn(1, 3, 4, 4))


def test_training_mode_model_is_converted_in_eval_and_left_in_training():
    net = bn_net(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 2, 1)).train()
    result = lnconvert.convert(net, example_inputs=torch.randn(2, 3, 4, 4))
    assert net.training and result.report.warnings and "training mode" in result.report.warnings[0]


def test_converted_model_trains_at_batch_size_one():
    net = bn_net(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                 nn.Linear(4, 3))
    model = lnconvert.convert(net, example_inputs=torch.randn(2, 3, 8, 8)).model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.randn(1, 3, 8, 8), torch.tensor([1])
    first = F.cross_entropy(model(x), y)
    first.backward()
    twin_grad = model.get_submodule("5").weight.grad[:, 4:]
    assert torch.count_nonzero(twin_grad) > 0  # twins learn from the first step
    opt.step()
    assert F.cross_entropy(model(x), y) < first


class Shuffle(nn.Module):
    """ShuffleNetV2's block structure: chunk, branch, cat, channel shuffle."""

    def __init__(self):
        super().__init__()
        self.stem, self.branch = nn.Conv2d(3, 8, 1), nn.Conv2d(4, 4, 1)
        self.dw, self.head = nn.Conv2d(4, 4, 3, padding=1, groups=4), nn.Conv2d(4, 2, 1)

    @staticmethod
    def shuffle(x, groups=2):
        n, c, h, w = x.size()
        return x.view(n, groups, c // groups, h, w).transpose(1, 2).contiguous().view(n, c, h, w)

    def forward(self, x):
        x = F.relu(self.stem(x))
        a, b = x.chunk(2, dim=1)
        x = self.shuffle(torch.cat([a, F.relu(self.branch(b))], dim=1))
        a, b = torch.split(x, [4, 4], dim=1)
        return self.head(F.relu(self.dw(b))) + a.mean()


def test_channel_shuffle_becomes_a_layout_permutation_and_chunks_select():
    result = assert_exact(Shuffle().eval(), torch.randn(2, 3, 6, 6))
    assert len(linked(result)) == 3
    graph_ops = {n.target for n in result.model.graph.nodes}
    assert "transpose" not in {getattr(t, "__name__", t) for t in graph_ops}  # shuffle left no runtime op
    assert not {"view", "chunk", "split"} & graph_ops
    assert result.model.dw.in_channels == 8 and result.model.dw.groups == 4  # piece regrouped for depthwise


class Sliced(nn.Module):
    """GhostNet's `cat([x1, x2])[:, :C]`, and MixNet's split into depthwise pieces."""

    def __init__(self):
        super().__init__()
        self.primary, self.cheap = nn.Conv2d(3, 4, 1), nn.Conv2d(4, 4, 3, padding=1, groups=4)
        self.dw_a, self.dw_b = nn.Conv2d(2, 2, 3, padding=1, groups=2), nn.Conv2d(3, 3, 5, padding=2, groups=3)
        self.head = nn.Conv2d(5, 2, 1)

    def forward(self, x):
        x1 = F.relu(self.primary(x))
        x = torch.cat([x1, F.relu(self.cheap(x1))], dim=1)[:, :5]
        x = F.silu(x)
        a, b = torch.split(x, [2, 3], 1)
        return self.head(torch.cat([self.dw_a(a), self.dw_b(b)], 1))


def test_channel_slices_and_depthwise_pieces():
    result = assert_exact(Sliced().eval(), torch.randn(2, 3, 6, 6))
    acts = result.report.activations
    assert [(a["type"], a["action"]) for a in acts] == [("relu", "linked"), ("relu", "skipped"), ("silu", "linked")]
    assert "no absorbing consumer" in acts[1]["detail"]  # it only feeds the silu, which links afresh
    assert result.model.dw_a.in_channels == 4 and result.model.dw_b.in_channels == 6


def test_unsupported_index_is_an_exact_boundary():
    class Strided(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.head = nn.Conv2d(3, 4, 1), nn.Conv2d(4, 2, 1)

        def forward(self, x):
            y = F.relu(self.conv(x))
            return self.head(y), y[:, ::2]

    result = assert_exact(Strided().eval(), torch.randn(2, 3, 4, 4))
    reasons = {b["reason"] for b in result.report.boundaries}
    assert "strided channel slice or slicing several axes" in reasons


class MixedConv(nn.Module):
    def __init__(self, reuse: bool):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 2, 1), nn.Conv2d(3, 3, 3, padding=1)
        self.bn, self.head = nn.BatchNorm2d(5), nn.Conv2d(5, 2, 1)
        self.reuse = reuse

    def forward(self, x):
        a = self.a(x)
        y = self.head(F.relu(self.bn(torch.cat([a, self.b(x)], 1))))
        return y + a.mean() if self.reuse else y


@pytest.mark.parametrize("reuse", [False, True])
def test_bn_after_concatenated_convs_folds_into_each(reuse):
    net = MixedConv(reuse).eval()
    randomize_batchnorm(net, torch.randn(8, 3, 6, 6))
    result = assert_exact(net, torch.randn(2, 3, 6, 6))
    bn = result.report.batchnorm[0]
    if reuse:  # conv a's output is read elsewhere: folding would change that reader
        assert bn["action"] == "affine"
    else:
        assert bn["action"] == "folded" and bn["detail"] == "into a, b"


def test_bn_inside_an_opaque_leaf_module_is_reported_kept():
    """A BN the tracer cannot see (inside a --leaf / timm non-traceable module) stays; the
    conversion must say so (partial) instead of claiming every BN was removed."""
    net = bn_net(nn.Conv2d(3, 4, 3), nn.Sequential(nn.BatchNorm2d(4), nn.ReLU()), nn.Conv2d(4, 2, 1))
    result = assert_exact(net, torch.randn(2, 3, 12, 12), leaf_modules=["1"])
    assert lnconvert.remaining_batchnorm(result.model) == ["1.0"]
    assert result.report.status == "partial" and "1 BatchNorm kept (1.0)" in result.report.status_reasons[0]


@pytest.mark.parametrize("groups", [1, 2])
def test_widened_conv_reads_primaries_in_a_permuted_layout_and_zero_twins(groups):
    from lnconvert.layout import Layout
    from lnconvert.passes.widen import widen_input

    conv = nn.Conv2d(4, 6, 3, groups=groups)
    layout = Layout.linked(4, 2, 1, "act")  # grouped pairs: primaries at 0, 1, 4, 5
    wide = widen_input(conv, layout)
    assert wide.in_channels == 8 and wide.weight.shape == (6, 8 // groups, 3, 3)
    per = 4 // groups
    for c, (p, t) in enumerate(zip(layout.primary, layout.twin)):
        rows = slice(6 // groups * (c // per), 6 // groups * (c // per + 1))
        local = 8 // groups
        assert torch.equal(wide.weight[rows, p % local], conv.weight[rows, c % per])
        assert torch.count_nonzero(wide.weight[rows, t % local]) == 0


class _StandardisedConv(nn.Conv2d):
    """timm's StdConv2d: the weight is standardised with F.batch_norm (no activation statistics)."""

    def forward(self, x):
        weight = F.batch_norm(self.weight.reshape(1, self.out_channels, -1), None, None, training=True,
                              momentum=0.0, eps=1e-5).reshape_as(self.weight)
        return F.conv2d(x, weight, self.bias, self.stride, self.padding)


class _FunctionalBN(nn.Module):
    def __init__(self):
        super().__init__()
        self.register_buffer("mean", torch.randn(4) * 0.1)
        self.register_buffer("var", torch.rand(4) + 0.5)

    def forward(self, x):
        return F.batch_norm(x, self.mean, self.var)


@pytest.mark.parametrize("activation_bn", [False, True])
def test_weight_standardisation_is_not_a_kept_batchnorm(activation_bn):
    layers = [_StandardisedConv(3, 4, 3), *([_FunctionalBN()] if activation_bn else []), nn.ReLU(), nn.Conv2d(4, 2, 1)]
    result = assert_exact(nn.Sequential(*layers).eval(), torch.randn(2, 3, 8, 8))
    kept = lnconvert.remaining_batchnorm(result.model)
    if activation_bn:  # only the call on activations is a BatchNorm, kept and reported
        assert len(kept) == 1 and result.report.status == "partial"
        assert result.report.count(result.report.batchnorm) == {"kept": 1}
    else:
        assert kept == [] and result.report.status == "exact" and result.report.batchnorm == []
    assert linked(result)
