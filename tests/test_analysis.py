"""analysis: shape propagation runs the graph as the GraphModule runs it."""
import operator

import pytest
import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp

import lnconvert
from lnconvert import analysis
from lnconvert.analysis import propagate_shapes, shape_of


def _scale_by_first(x: torch.Tensor, sizes: list) -> torch.Tensor:
    sizes[0] = x.shape[-1]  # writes into its list argument, as torchvision's swin3d helper does
    return x * sizes[0]


torch.fx.wrap("_scale_by_first")


class WritesIntoAList(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)

    def forward(self, x):
        return _scale_by_first(self.conv(x), [1, 2])


def test_shape_propagation_passes_lists_a_wrapped_function_may_write_into():
    model = WritesIntoAList()
    gm = fx.symbolic_trace(model)
    x = torch.randn(2, 3, 5, 5)
    torch.testing.assert_close(gm(x), model(x), rtol=0, atol=0)  # the traced module itself runs
    with pytest.raises(RuntimeError) as failed:  # what torch.fx's own ShapeProp does
        ShapeProp(gm).propagate(x)
    assert "immutable_list" in str(failed.value.__cause__)
    propagate_shapes(gm, (x,))
    out = next(n for n in gm.graph.nodes if n.op == "call_function" and n.target is _scale_by_first)
    assert shape_of(out) == (2, 4, 5, 5)


class EveryShortcut(nn.Module):
    """One of each op whose meta shape propagation computes the result instead of running it, and
    a module that runs."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, stride=2, padding=2, dilation=2)
        self.reflect = nn.Conv2d(8, 8, 3, padding=1, padding_mode="reflect")  # runs on meta tensors
        self.grouped = nn.Conv2d(8, 8, 3, padding=1, groups=4, bias=False)
        self.bn, self.relu, self.drop = nn.BatchNorm2d(8), nn.ReLU6(), nn.Dropout(0.1)
        self.conv1d = nn.Conv1d(8, 4, 2)
        self.norm, self.linear = nn.LayerNorm(8), nn.Linear(8, 5)
        self.pool = nn.AdaptiveAvgPool2d((None, 1))

    def forward(self, x):
        y = self.drop(self.relu(self.bn(self.grouped(self.reflect(self.conv(x))))))
        y = torch.cat([y, F.relu(y) * torch.sigmoid(y.mean(1, keepdim=True))], 1)[:, :8] + 1.0
        z = self.norm(self.pool(y).flatten(2).transpose(1, 2))
        w = F.layer_norm(F.adaptive_avg_pool2d(y, 2), (2, 2)).sigmoid()
        return self.linear(z), self.conv1d(y.flatten(2)), w


def _real_shapes(gm: fx.GraphModule, *inputs) -> dict:
    ShapeProp(gm).propagate(*inputs)
    return {n.name: (shape_of(n), n.meta["tensor_meta"].dtype) for n in gm.graph.nodes if shape_of(n)}


def _meta_shapes(gm: fx.GraphModule, *inputs) -> dict:
    """What propagate_shapes records when it may not fall back to running the inputs."""
    for node in gm.graph.nodes:
        node.meta.pop("tensor_meta", None)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(analysis, "_PlainListShapeProp", None)  # the real run: now a TypeError
        propagate_shapes(gm, inputs)
    return {n.name: (shape_of(n), n.meta["tensor_meta"].dtype) for n in gm.graph.nodes if shape_of(n)}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_meta_shapes_are_those_of_a_real_run(dtype):
    gm = fx.symbolic_trace(EveryShortcut().eval().to(dtype))
    x = torch.randn(2, 3, 11, 9, dtype=dtype)
    assert _meta_shapes(gm, x) == _real_shapes(gm, x)


def test_meta_shapes_of_a_converted_model_are_those_of_a_real_run():
    """Linked activations (block, grouped and with a subset of twins), channel affines, selections."""
    net = nn.Sequential(nn.Conv2d(3, 6, 3), nn.BatchNorm2d(6), nn.ReLU(), nn.Conv2d(6, 6, 3, groups=6),
                        nn.ReLU(), nn.Conv2d(6, 4, 1), nn.ReLU(), nn.BatchNorm2d(4), nn.Conv2d(4, 2, 1)).eval()
    x = torch.randn(2, 3, 9, 9)
    for twins in (None, {"4": [0, 2]}):
        gm = lnconvert.convert(net, example_inputs=x, verify=False, twins=twins).model
        assert _meta_shapes(gm, x) == _real_shapes(gm, x)


class MasksByValue(nn.Module):
    def forward(self, x):
        return x[x > 0] * 2  # how many elements: known only from the values


def test_a_value_dependent_op_is_run_on_the_example_inputs():
    gm = fx.symbolic_trace(MasksByValue())
    x = torch.tensor([[1.0, -1.0, 2.0], [-3.0, 4.0, 0.5]])
    propagate_shapes(gm, (x,))
    out = next(n for n in gm.graph.nodes if n.op == "call_function" and n.target is operator.mul)
    assert shape_of(out) == (4,)


def test_a_wrong_input_width_is_the_real_runs_error():
    gm = fx.symbolic_trace(nn.Sequential(nn.Conv2d(4, 2, 3)))
    with pytest.raises(RuntimeError) as failed:  # ShapeProp's, wrapping the convolution's own
        propagate_shapes(gm, (torch.randn(1, 3, 5, 5),))
    assert "expected input" in str(failed.value.__cause__)


@pytest.mark.zoo
def test_meta_shapes_equal_a_real_run_on_the_torchvision_zoo():
    """Every classification model up to 400M parameters, as traced and as converted (64x64, or
    the input inception_v3, maxvit_t and the ViTs take)."""
    import torchvision

    from lnconvert.trace import trace

    for name in sorted(torchvision.models.list_models(module=torchvision.models)):
        if torchvision.models.get_model_weights(name).DEFAULT.meta["num_params"] > 400e6:
            continue
        model = lnconvert.load_model(name).eval()
        side = 224 if name.startswith(("vit_", "maxvit")) else 80 if name == "inception_v3" else 64
        x = torch.randn(1, 3, side, side)
        for gm in (trace(model), lnconvert.convert(model, example_inputs=x, verify=False).model):
            assert _meta_shapes(gm, x) == _real_shapes(gm, x), name
