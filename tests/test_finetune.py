"""Fine-tuning API: twin parameter groups, split/merge, dead units."""
import copy

import pytest
import torch
from torch import nn

import lnconvert
from lnconvert import io
from lnconvert.analysis import dead_units
from lnconvert.finetune import TwinSplit, plain_state_dict, twin_parameters
from lnconvert.nn import ChannelAffine, GatedMerge
from lnconvert.testing import randomize_batchnorm


class Mixed(nn.Module):
    """Dense conv, a non-uniform grouped consumer (cat of linked + plain), a per-channel
    affine between a linked activation and its consumer, PReLU twins, a gated residual and
    a flatten into a Linear: every kind of twin-carrying parameter."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 2, 3, padding=1), nn.Conv2d(3, 2, 3, padding=1)
        self.grouped = nn.Conv2d(4, 4, 3, padding=1, groups=2)
        self.bn_g, self.act_g = nn.BatchNorm2d(4), nn.PReLU(4)
        self.bn_pre = nn.BatchNorm2d(4)  # after the activation: becomes a ChannelAffine
        self.conv, self.conv2 = nn.Conv2d(4, 4, 1), nn.Conv2d(4, 4, 1)
        self.res_act, self.out_act = nn.ReLU(), nn.ReLU()
        self.fc = nn.Linear(4 * 4, 3)
        self.pool = nn.AdaptiveAvgPool2d(2)

    def forward(self, x):
        h = torch.cat([torch.relu(self.a(x)), self.b(x)], 1)
        h = self.bn_pre(self.act_g(self.bn_g(self.grouped(h))))
        r = self.res_act(self.conv(h))
        h = self.conv2(r) + r  # residual add: a gate boundary with residual="gate"
        return self.fc(torch.flatten(self.pool(self.out_act(h)), 1))


@pytest.fixture
def converted():
    net = Mixed().eval()
    randomize_batchnorm(net, torch.randn(8, 3, 6, 6))
    x = torch.randn(4, 3, 6, 6)
    result = lnconvert.convert(net, example_inputs=x, residual="gate")
    return net, result.model, result.report, x


def _twin_entries(model):
    """Mark every twin entry 1 and every primary 0 through the split parameters; return the
    merged marks per parametrized weight (restoring the values)."""
    marks = {}
    for name, module in model.named_modules():
        for pname in getattr(module, "parametrizations", {}) or {}:
            plist = module.parametrizations[pname]
            saved = [plist.original0.detach().clone(), plist.original1.detach().clone()]
            with torch.no_grad():
                plist.original0.fill_(0), plist.original1.fill_(1)
                marks[f"{name}.{pname}"] = getattr(module, pname).detach().clone()
                plist.original0.copy_(saved[0]), plist.original1.copy_(saved[1])
    return marks


def test_param_groups_hold_exactly_the_twin_half(converted):
    net, gm, report, x = converted
    before = {k: v.clone() for k, v in gm.state_dict().items()}
    with torch.no_grad():
        y = gm(x)
    groups = lnconvert.param_groups(gm, base_lr=1e-3, twin_lr=1e-2, twin_weight_decay=0.0, weight_decay=1e-4)
    base, twin = groups
    assert (base["name"], twin["name"], twin["lr"], twin["weight_decay"], base["weight_decay"]) == \
        ("base", "twin", 1e-2, 0.0, 1e-4)
    every = list(gm.parameters())
    assert len(base["params"]) + len(twin["params"]) == len(every)
    assert {id(p) for p in base["params"]}.isdisjoint({id(p) for p in twin["params"]})
    with torch.no_grad():
        torch.testing.assert_close(gm(x), y, rtol=0, atol=0)  # splitting is exact

    # widened absorbers: the twin entries are exactly the entries the converter zeroed
    marks = _twin_entries(gm)
    absorbers = {c["node"] for c in report.consumers}
    assert absorbers == {"grouped", "conv", "conv2", "fc"}
    for key, mark in marks.items():
        module_name, pname = key.rsplit(".", 1)
        original = before[f"{module_name}.{pname}"]
        if isinstance(gm.get_submodule(module_name), ChannelAffine):
            twins = mark.bool()
            assert twins.sum() == original.numel() // 2  # duplicated per-channel entries
        else:
            torch.testing.assert_close(mark.bool(), original == 0, rtol=0, atol=0)
    grouped = next(m for m in gm.modules() if isinstance(getattr(m, "parametrizations", None), nn.ModuleDict)
                   and getattr(m, "groups", 1) == 2)
    assert grouped.parametrizations.weight[0].start == 0  # twin columns differ between its groups
    # twin-only parameters: the PReLU twin slopes and the residual gate
    gate = next(m.gate for m in gm.modules() if isinstance(m, GatedMerge))
    assert any(p is gate for p in twin["params"])
    n_twin = sum(p.numel() for p in twin["params"])
    n_marked = sum(int(m.sum()) for m in marks.values())
    assert n_twin == n_marked + gate.numel() + 4  # + 4 twin PReLU slopes


@pytest.mark.parametrize("twin_lr", [0.0, 1e-2])
def test_twin_lr_zero_keeps_twins_at_zero_while_primaries_move(converted, twin_lr):
    _, gm, _, x = converted
    opt = torch.optim.Adam(lnconvert.param_groups(gm, base_lr=1e-2, twin_lr=twin_lr))
    twins_before = [p.detach().clone() for p in twin_parameters(gm)]
    primaries_before = [p.detach().clone() for p in opt.param_groups[0]["params"]]
    gm.train()
    for _ in range(2):
        opt.zero_grad()
        gm(x).square().mean().backward()
        opt.step()
    twins_moved = [not torch.equal(a, b) for a, b in zip(twins_before, twin_parameters(gm))]
    assert all(not torch.equal(a, b) for a, b in zip(primaries_before, opt.param_groups[0]["params"]))
    if twin_lr == 0:  # twins stay at their converted values: zero columns, zero gate
        assert not any(twins_moved)
        assert all(torch.count_nonzero(m.gate) == 0 for m in gm.modules() if isinstance(m, GatedMerge))
    else:
        assert all(twins_moved)  # twins receive gradient and learn


def test_split_state_dict_round_trips_and_saves_merged(converted, tmp_path):
    net, gm, report, x = converted
    lnconvert.split_twins(gm)
    with torch.no_grad():
        for p in twin_parameters(gm):
            p.add_(0.1)  # make twins matter
        y = gm(x)
    keys = list(gm.state_dict())
    assert any("parametrizations.weight.original1" in k for k in keys)
    fresh = lnconvert.split_twins(lnconvert.convert(net, example_inputs=x, residual="gate", verify=False).model)
    fresh.load_state_dict(gm.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), y, rtol=0, atol=0)
    plain = plain_state_dict(gm)
    io.save(gm, tmp_path / "m.safetensors")  # the converted model knows its conversion
    loaded = io.load(tmp_path / "m.safetensors", model=net)
    lnconvert.merge_twins(gm)
    assert not any(isinstance(m, TwinSplit) for m in gm.modules())
    assert sorted(gm.state_dict()) == sorted(plain) == sorted(loaded.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(gm(x), y, rtol=0, atol=0)
        torch.testing.assert_close(loaded(x), y, rtol=0, atol=0)


def test_merging_a_deep_copy_leaves_the_split_original_working(converted):
    """deepcopy shares torch's generated Parametrized<X> classes; merging the copy (e.g. to
    export it) must not strip the original's weight properties."""
    net, gm, report, x = converted
    lnconvert.split_twins(gm)
    with torch.no_grad():
        y = gm(x)
    export_copy = lnconvert.merge_twins(copy.deepcopy(gm))
    assert not any(isinstance(m, TwinSplit) for m in export_copy.modules())
    assert any(isinstance(m, TwinSplit) for m in gm.modules())
    with torch.no_grad():
        torch.testing.assert_close(gm(x), y, rtol=0, atol=0)
        torch.testing.assert_close(export_copy(x), y, rtol=0, atol=0)
    lnconvert.merge_twins(gm)  # the original still merges too
    with torch.no_grad():
        torch.testing.assert_close(gm(x), y, rtol=0, atol=0)


class KnownDead(nn.Module):
    """Conv channels 0 and 2 and conv2 channel 1 can never fire on inputs in [0, 1]; the
    shared ``act`` is called twice (two layers)."""

    def __init__(self):
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(1, 4, 3), nn.Conv2d(4, 3, 3)
        self.act = nn.ReLU()
        self.fc = nn.Linear(3, 2)
        with torch.no_grad():
            for conv, dead in ((self.conv1, [0, 2]), (self.conv2, [1])):
                conv.weight.uniform_(-0.1, 0.1)
                conv.bias.zero_()
                conv.bias[dead] = -100.0
                conv.bias[[c for c in range(conv.out_channels) if c not in dead]] = 5.0  # always alive

    def forward(self, x):
        x = self.act(self.conv2(self.act(self.conv1(x))))
        return self.fc(x.mean((2, 3)))


def test_dead_units_before_and_after_conversion():
    net = KnownDead().eval()
    loader = [(torch.rand(8, 1, 8, 8), torch.zeros(8)) for _ in range(3)]
    rows = dead_units(net, loader)
    assert [(r.layer, r.kind, r.units, r.dead) for r in rows] == [("act", "relu", 4, 2), ("act#2", "relu", 3, 1)]
    assert rows[0].fraction == 0.5 and net.training is False
    converted = lnconvert.convert(net, example_inputs=loader[0][0]).model
    after = dead_units(converted, loader)
    assert [(r.kind, r.units, r.primary_dead, r.dead) for r in after] == [("linked relu", 4, 2, 0),
                                                                          ("linked relu", 3, 1, 0)]
    # a threshold turns "never above 1e3" into dead: every unit
    assert [r.dead for r in dead_units(net, loader, threshold=1e3, max_batches=1)] == [4, 3]


def _converted_split(net=None):
    net = (net or KnownDead()).eval()
    x = torch.rand(4, 1, 8, 8)
    gm = lnconvert.convert(net, example_inputs=x).model
    return gm, torch.optim.Adam(lnconvert.param_groups(gm, base_lr=1e-3, twin_lr=1e-3)), x


def _step(model, opt, x, autocast=False):
    opt.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out = model(x)
    loss = torch.nn.functional.cross_entropy(out.float(), torch.tensor([0, 1, 0, 1]))
    loss.backward()
    opt.step()
    return out, loss


def test_bf16_autocast_train_step_reaches_the_twins():
    gm, opt, x = _converted_split()
    out, loss = _step(gm, opt, x, autocast=True)
    assert out.dtype == torch.bfloat16 and torch.isfinite(loss)
    assert all(p.grad is not None for p in twin_parameters(gm))
    assert any(p.grad.abs().sum() > 0 for p in twin_parameters(gm))


def test_ddp_wraps_a_converted_model(tmp_path):
    import torch.distributed as dist

    gm, opt, x = _converted_split()
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        ddp = torch.nn.parallel.DistributedDataParallel(gm)  # no BN: nothing to synchronise but gradients
        before = [p.detach().clone() for p in twin_parameters(gm)]
        _step(ddp, opt, x)
        _step(ddp, opt, x)
        assert any(not torch.equal(a, b) for a, b in zip(before, twin_parameters(gm)))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_torch_compile_trains_a_split_model():  # ~1 min of inductor compilation on 2 CPU cores
    gm, opt, x = _converted_split()
    compiled = torch.compile(gm)
    for _ in range(2):
        _step(compiled, opt, x)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), gm(x), rtol=1e-5, atol=1e-5)
