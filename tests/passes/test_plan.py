"""plan_links on its own: which activations are linked, what absorbs, where boundaries go (and where not)."""
import pytest
from torch import nn

from lnconvert.plan import plan_links

from .graphs import traced, until


def plan_of(net, shape=(2, 3, 8, 8), **options):
    gm, ctx = traced(net, shape, **options)
    gm, plan = until(gm, ctx, "link")
    return plan


class _Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1, self.r, self.c2 = nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, x):
        y = self.r(self.c1(x))
        return self.c2(y) + y


class _SqueezeExcite(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1, self.r, self.fc, self.sig = nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 1), nn.Sigmoid()
        self.c2 = nn.Conv2d(4, 2, 1)

    def forward(self, x):
        y = self.r(self.c1(x))
        return self.c2(y * self.sig(self.fc(y.mean((2, 3), keepdim=True))))


class _NoRule(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1, self.r, self.c2 = nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 2, 1)

    def forward(self, x):
        y = self.r(self.c1(x))
        return self.c2(y) + y.softmax(1).sum()


def test_activation_with_a_consumer_is_linked_and_the_consumer_absorbs():
    plan = plan_of(nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 2, 1)))
    assert list(plan.linked) == ["_1"] and list(plan.absorbers) == ["_2"]
    layout, groups = plan.linked["_1"]
    assert (layout.primary, layout.twin, groups) == ((0, 1, 2, 3), (4, 5, 6, 7), 1)  # block layout
    assert plan.boundaries == [] and plan.skipped == {}


def test_activation_whose_twins_reach_no_consumer_is_skipped():
    plan = plan_of(nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU()))
    assert plan.linked == {} and plan.absorbers == {}
    assert plan.skipped == {"_1": "no absorbing consumer: its output only reaches boundaries"}


def test_activation_filter_links_only_the_named_types():
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 1), nn.SiLU(), nn.Conv2d(4, 2, 1))
    plan = plan_of(net, activations=("relu",))
    assert list(plan.linked) == ["_1"] and plan.skipped == {"_3": "type silu not selected"}
    assert list(plan_of(net).linked) == ["_1", "_3"]  # without the filter both link


@pytest.mark.parametrize("residual", ["slice", "gate"])
def test_residual_add_is_one_boundary_of_the_chosen_kind(residual):
    plan = plan_of(_Residual(), residual=residual)
    assert plan.boundaries == [("add", "r", residual, "residual add with an ordinary tensor")]
    assert list(plan.absorbers) == ["c2"]


def test_op_without_a_rule_is_a_slice_boundary_naming_the_op():
    plan = plan_of(_NoRule())
    assert plan.boundaries == [("softmax", "r", "slice", "no rule for softmax")]


def test_squeeze_excite_gate_is_not_linked_and_is_expanded_into_the_layout():
    plan = plan_of(_SqueezeExcite())
    assert list(plan.linked) == ["r"] and plan.skipped == {"sig": "gate: its output multiplies another tensor"}
    assert list(plan.expands) == ["mul"] and plan.expands["mul"][0] == "sig"
    assert set(plan.absorbers) == {"fc", "c2"} and plan.boundaries == []


def test_depthwise_consumer_gets_a_grouped_layout():
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3, groups=4), nn.ReLU(), nn.Conv2d(4, 2, 1))
    layout, groups = plan_of(net).linked["_1"]
    assert groups == 4 and layout.primary == (0, 2, 4, 6) and layout.twin == (1, 3, 5, 7)  # pairs per group


def test_flatten_before_a_linear_is_recorded_for_relayout():
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 2))
    plan = plan_of(net)
    assert plan.flattens == {"_2": 1} and list(plan.absorbers) == ["_3"]


def test_twins_option_keeps_only_the_listed_twins():
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 2, 1))
    layout, _ = plan_of(net, twins={"_1": (0, 2)}).linked["_1"]
    assert layout.has_all_twins is False and [c for c, t in enumerate(layout.twin) if t >= 0] == [0, 2]


def test_plan_of_a_graph_without_activations_is_empty():
    gm, ctx = traced(nn.Sequential(nn.Conv2d(3, 4, 3), nn.Conv2d(4, 2, 1)))
    plan = plan_links(gm, ctx.options)
    assert (plan.linked, plan.absorbers, plan.boundaries, plan.skipped) == ({}, {}, [], {})
