"""relayout on its own: reshapes lose hard-coded widths, splits become channel selections, shuffles vanish."""
from torch import nn

from .graphs import functions, module_types, run_planned_pass


def relaid(net, shape=(2, 3, 8, 8), **options):
    return run_planned_pass(net, "relayout", shape, **options)


class _HardCodedView(nn.Module):
    def __init__(self):
        super().__init__()
        self.c, self.r, self.fc = nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Linear(4 * 6 * 6, 2)

    def forward(self, x):
        return self.fc(self.r(self.c(x)).view(-1, 144))  # 144 = 4 channels: wrong once linked


class _Chunks(nn.Module):
    def __init__(self):
        super().__init__()
        self.c, self.r, self.a, self.b = nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(2, 2, 1), nn.Conv2d(2, 2, 1)

    def forward(self, x):
        left, right = self.r(self.c(x)).chunk(2, dim=1)
        return self.a(left) + self.b(right)


class _Shuffle(nn.Module):
    def __init__(self):
        super().__init__()
        self.c, self.r, self.d = nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 2, 1)

    def forward(self, x):
        y = self.r(self.c(x))
        n, c, h, w = y.shape
        y = y.view(n, 2, c // 2, h, w).transpose(1, 2).reshape(n, c, h, w)  # ShuffleNet's channel shuffle
        return self.d(y)


def test_hard_coded_view_becomes_a_flatten():
    gm, ctx, plan = relaid(_HardCodedView())
    assert functions(gm)["flatten"] == 1 and "view" not in functions(gm)
    assert gm(ctx.example_inputs[0]).shape == (2, 2)  # runs on the linked width


def test_chunk_pieces_become_channel_selections_with_their_twins():
    gm, ctx, plan = relaid(_Chunks())
    assert module_types(gm)["ChannelSelect"] == 2 and "chunk" not in functions(gm)
    widths = sorted(len(physical) for _, physical in plan.selects.values())
    assert widths == [4, 4]  # each piece: 2 channels and their 2 twins
    assert gm(ctx.example_inputs[0]).shape == (2, 2, 6, 6)


def test_channel_shuffle_is_removed_and_absorbed_as_a_permutation():
    gm, ctx, plan = relaid(_Shuffle())
    assert not {"view", "transpose", "reshape"} & set(functions(gm))
    assert len(plan.rewires) >= 1
    assert gm(ctx.example_inputs[0]).shape == (2, 2, 6, 6)


def test_graph_without_linked_reshapes_is_unchanged():
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 2, 1))
    gm, ctx, plan = relaid(net)
    assert (plan.flattens, plan.selects, plan.rewires) == ({}, {}, {})
    assert functions(gm) == {}
