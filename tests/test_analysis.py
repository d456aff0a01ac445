"""analysis: shape propagation runs the graph as the GraphModule runs it."""
import pytest
import torch
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp

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
