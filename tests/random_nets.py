"""Random CNNs for property-based tests: a hypothesis strategy for a plain-data description
and a builder that turns a description into an ``nn.Module``.

A description is a dict (so a shrunk counterexample prints as a readable literal that can be
pasted into ``@example``): ``{"stem": ..., "blocks": [...], "head": ...}``. Each block says
what it is (``conv``, ``residual``, ``cat``, ``se``, ``pool``, ``shared``, ``branch``, ``split``)
and how its activations are written: ``module``, ``inplace`` (``ReLU(inplace=True)``,
``x.relu_()``), ``functional`` (``F.relu(x)``), ``method`` (``x.sigmoid()``) or ``shared`` (one
module instance called at several sites, like torchvision's ResNet ``relu``).
Channels stay <= 8 and inputs 8x8 so that an example converts in well under a second.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from hypothesis import strategies as st
from torch import nn

INPUT_SHAPE = (2, 3, 8, 8)

# name -> (module factory given the channel count, functional form or None)
ACTIVATIONS = {
    "relu": (lambda c: nn.ReLU(), F.relu),
    "relu6": (lambda c: nn.ReLU6(), F.relu6),
    "leaky_relu": (lambda c: nn.LeakyReLU(0.2), lambda x: F.leaky_relu(x, 0.2)),
    "prelu": (lambda c: nn.PReLU(c), None),
    "elu": (lambda c: nn.ELU(0.7), lambda x: F.elu(x, 0.7)),
    "selu": (lambda c: nn.SELU(), F.selu),
    "celu": (lambda c: nn.CELU(1.3), lambda x: F.celu(x, 1.3)),
    "silu": (lambda c: nn.SiLU(), F.silu),
    "gelu": (lambda c: nn.GELU(), F.gelu),
    "gelu_tanh": (lambda c: nn.GELU(approximate="tanh"), lambda x: F.gelu(x, approximate="tanh")),
    "hardswish": (lambda c: nn.Hardswish(), F.hardswish),
    "hardtanh": (lambda c: nn.Hardtanh(-0.5, 2.0), lambda x: F.hardtanh(x, -0.5, 2.0)),
    "mish": (lambda c: nn.Mish(), F.mish),
    "tanh": (lambda c: nn.Tanh(), torch.tanh),
    "sigmoid": (lambda c: nn.Sigmoid(), torch.sigmoid),
    "hardsigmoid": (lambda c: nn.Hardsigmoid(), F.hardsigmoid),
}
METHODS = ("relu", "sigmoid", "tanh")           # x.relu(), x.sigmoid(), x.tanh()
INPLACE_MODULES = ("relu", "relu6", "leaky_relu", "elu", "selu", "celu", "silu", "hardswish", "hardtanh", "mish")
FORMS = ("module", "inplace", "functional", "method", "shared")
GATES = ("sigmoid", "hardsigmoid")


class Call(nn.Module):
    """Calls a function, so tracing records the call itself (it is not a submodule)."""

    def __init__(self, fn, label: str):
        super().__init__()
        self.fn, self.label = fn, label

    def forward(self, x):
        return self.fn(x)

    def extra_repr(self) -> str:
        return self.label


def _method(name: str, inplace: bool):
    method = name + ("_" if inplace else "")
    return Call(lambda x: getattr(x, method)(), f"x.{method}()")


def make_activation(name: str, form: str, channels: int, shared: nn.ModuleDict) -> nn.Module:
    """``name`` written as ``form``; forms a type cannot take fall back to a plain module."""
    factory, functional = ACTIVATIONS[name]
    if form == "shared" and name != "prelu":  # PReLU's parameters are per channel
        if name not in shared:
            shared[name] = factory(channels)
        return shared[name]
    if form == "inplace" and name in INPLACE_MODULES:
        module = factory(channels)
        module.inplace = True
        return module
    if form == "inplace" and name in METHODS:
        return _method(name, inplace=True)
    if form == "method" and name in METHODS:
        return _method(name, inplace=False)
    if form == "functional" and functional is not None:
        return Call(functional, f"functional {name}")
    return factory(channels)


class Context:
    """What the builder tracks while it adds blocks: channels, spatial size, shared modules."""

    def __init__(self, channels: int, size: int, shared: nn.ModuleDict, bn_stats: bool):
        self.channels, self.size, self.shared, self.bn_stats = channels, size, shared, bn_stats

    def act(self, spec, channels: int | None = None) -> nn.Module:
        if spec is None:
            return nn.Identity()
        name, form = spec
        return make_activation(name, form, channels or self.channels, self.shared)

    def bn(self, channels: int) -> nn.BatchNorm2d:
        return nn.BatchNorm2d(channels, track_running_stats=self.bn_stats)


def _add(a, b, how: str):
    if how == "+=":
        a += b
        return a
    return torch.add(a, b) if how == "torch.add" else a + b


class ConvBlock(nn.Module):
    def __init__(self, spec: dict, ctx: Context):
        super().__init__()
        c_in, out = ctx.channels, spec["out"]
        groups = {"1": 1, "depthwise": c_in, "2": 2}[spec["groups"]]
        if spec["groups"] == "depthwise":
            out = c_in
        if c_in % groups or out % groups:
            groups = 1
        stride = spec["stride"] if ctx.size >= 2 else 1
        k = spec["k"]
        self.pre = ctx.bn(c_in) if spec["bn"] == "before" else nn.Identity()
        self.conv = nn.Conv2d(c_in, out, k, stride=stride, padding=k // 2, groups=groups, bias=spec["bias"])
        self.post = ctx.bn(out) if spec["bn"] == "after" else nn.Identity()
        self.act = ctx.act(spec["act"], out)
        self.after_act = ctx.bn(out) if spec["bn"] == "after_act" else nn.Identity()
        ctx.channels, ctx.size = out, (ctx.size + 2 * (k // 2) - k) // stride + 1

    def forward(self, x):
        return self.after_act(self.act(self.post(self.conv(self.pre(x)))))


class Residual(nn.Module):
    """``body(x) + skip(x)``: pre-activation or post-activation, optional projection, BN and
    activation after the add."""

    def __init__(self, spec: dict, ctx: Context):
        super().__init__()
        c, out = ctx.channels, spec["out"]
        self.preact = ctx.act(spec["act"], c) if spec["preact"] else nn.Identity()
        self.conv1, self.bn1 = nn.Conv2d(c, c, 3, padding=1, bias=False), ctx.bn(c)
        self.act1 = ctx.act(spec["act"], c)
        self.conv2, self.bn2 = nn.Conv2d(c, out, 3, padding=1, bias=False), ctx.bn(out)
        self.skip = nn.Sequential(nn.Conv2d(c, out, 1), ctx.bn(out)) if out != c else nn.Identity()
        self.post_bn = ctx.bn(out) if spec["bn_after_add"] else nn.Identity()
        self.post_act = ctx.act(spec["act"], out) if spec["act_after_add"] else nn.Identity()
        self.how = spec["add"]
        ctx.channels = out

    def forward(self, x):
        x = self.preact(x)  # an in-place pre-activation also changes what the skip reads
        y = self.bn2(self.conv2(self.act1(self.bn1(self.conv1(x)))))
        return self.post_act(self.post_bn(_add(y, self.skip(x), self.how)))


class Cat(nn.Module):
    """1x1 branches (with or without an activation), optionally the input itself, concatenated;
    optionally a BN after the concatenation (folds into the branches when they are bare convs)."""

    def __init__(self, spec: dict, ctx: Context):
        super().__init__()
        c = ctx.channels
        self.branches = nn.ModuleList(nn.Sequential(nn.Conv2d(c, w, 1), ctx.act(act, w)) for w, act in spec["branches"])
        self.identity = spec["identity"]
        out = sum(w for w, _ in spec["branches"]) + (c if self.identity else 0)
        self.bn = ctx.bn(out) if spec["bn_after"] else nn.Identity()
        ctx.channels = out

    def forward(self, x):
        parts = [branch(x) for branch in self.branches] + ([x] if self.identity else [])
        return self.bn(torch.cat(parts, dim=1))


class SqueezeExcite(nn.Module):
    def __init__(self, spec: dict, ctx: Context):
        super().__init__()
        c, hidden = ctx.channels, spec["hidden"]
        self.fc1, self.fc2 = nn.Conv2d(c, hidden, 1), nn.Conv2d(hidden, c, 1)
        self.inner = ctx.act(spec["act"], hidden)
        self.gate = ctx.act((spec["gate"], spec["gate_form"]), c)
        self.pool = spec["pool"]

    def forward(self, x):
        s = x.mean((2, 3), keepdim=True) if self.pool == "mean" else F.adaptive_avg_pool2d(x, 1)
        return x * self.gate(self.fc2(self.inner(self.fc1(s))))


class Pool(nn.Module):
    def __init__(self, spec: dict, ctx: Context):
        super().__init__()
        k = 2 if ctx.size >= 2 else 1
        self.pool = nn.MaxPool2d(k) if spec["op"] == "max" else nn.AvgPool2d(k)
        ctx.size //= k

    def forward(self, x):
        return self.pool(x)


class Shared(nn.Module):
    """One conv (and BN, when asked) applied twice: a shared module at two call sites."""

    def __init__(self, spec: dict, ctx: Context):
        super().__init__()
        c = ctx.channels
        self.conv = nn.Conv2d(c, c, 3, padding=1)
        self.bn = ctx.bn(c) if spec["bn"] else nn.Identity()
        self.act = ctx.act(spec["act"], c)

    def forward(self, x):
        return self.act(self.bn(self.conv(self.act(self.bn(self.conv(x))))))


class Branch(nn.Module):
    """Two activated branches combined by add or mul (both operands may be linked)."""

    def __init__(self, spec: dict, ctx: Context):
        super().__init__()
        c = ctx.channels
        self.a, self.b = nn.Conv2d(c, c, 1), nn.Conv2d(c, c, 3, padding=1)
        self.act_a, self.act_b = ctx.act(spec["act_a"], c), ctx.act(spec["act_b"], c)
        self.op = spec["op"]

    def forward(self, x):
        a, b = self.act_a(self.a(x)), self.act_b(self.b(x))
        return a * b if self.op == "mul" else a + b


class Split(nn.Module):
    """ShuffleNet-like: split channels, transform one piece, concatenate back."""

    def __init__(self, spec: dict, ctx: Context):
        super().__init__()
        c = ctx.channels
        self.half, self.even = c // 2, c % 2 == 0
        self.conv = nn.Conv2d(c - self.half, c - self.half, 3, padding=1, groups=c - self.half
                              if spec["depthwise"] else 1)
        self.act = ctx.act(spec["act"], c - self.half)
        self.how = spec["how"]

    def forward(self, x):
        if self.how == "slice":
            a, b = x[:, :self.half], x[:, self.half:]
        elif self.how == "chunk" and self.even:
            a, b = x.chunk(2, dim=1)
        else:
            a, b = torch.split(x, [self.half, x.shape[1] - self.half], dim=1)
        return torch.cat([a, self.act(self.conv(b))], dim=1)


class Shuffle(nn.Module):
    """ShuffleNet's channel shuffle: view(N, G, C/G, H, W) -> transpose -> view(N, C, H, W)."""

    def __init__(self, spec: dict, ctx: Context):
        super().__init__()
        self.groups = 2 if ctx.channels % 2 == 0 else 1

    def forward(self, x):
        n, c, h, w = x.size()
        return x.view(n, self.groups, c // self.groups, h, w).transpose(1, 2).contiguous().view(n, c, h, w)


class Elementwise(nn.Module):
    """Ops that keep channels: spatial padding, resizing, dropout, scalar arithmetic, clone."""

    def __init__(self, spec: dict, ctx: Context):
        super().__init__()
        self.op = spec["op"]
        self.dropout = nn.Dropout2d(0.3)
        self.factor = 2 if ctx.size <= 8 else 1  # inputs stay small
        if self.op == "pad":
            ctx.size += 2
        elif self.op == "upsample":
            ctx.size *= self.factor

    def forward(self, x):
        if self.op == "pad":
            return F.pad(x, (1, 1, 1, 1))
        if self.op == "upsample":
            return F.interpolate(x, scale_factor=self.factor, mode="nearest")
        if self.op == "dropout":
            return self.dropout(x)
        if self.op == "scalar":
            return x * 0.5 + 1.0
        return x.clone()


class Deconv(nn.Module):
    """A transposed conv (stride 2) with BN and an activation."""

    def __init__(self, spec: dict, ctx: Context):
        super().__init__()
        factor = 2 if ctx.size <= 8 else 1  # inputs stay small
        self.conv = nn.ConvTranspose2d(ctx.channels, spec["out"], factor, stride=factor)
        self.bn, self.act = ctx.bn(spec["out"]), ctx.act(spec["act"], spec["out"])
        ctx.channels, ctx.size = spec["out"], ctx.size * factor

    def forward(self, x):
        return self.act(self.bn(self.conv(x)))


BLOCKS = {"conv": ConvBlock, "residual": Residual, "cat": Cat, "se": SqueezeExcite, "pool": Pool,
          "shared": Shared, "branch": Branch, "split": Split, "shuffle": Shuffle, "elementwise": Elementwise,
          "deconv": Deconv}


class Head(nn.Module):
    def __init__(self, spec: dict, ctx: Context):
        super().__init__()
        c, kind = ctx.channels, spec["kind"]
        self.kind = kind
        if kind == "gap":
            self.pool, self.fc = nn.AdaptiveAvgPool2d(1), nn.Linear(c, 3)
        elif kind in ("flatten", "reshape", "torch.flatten"):
            self.fc = nn.Linear(c * ctx.size * ctx.size, 3)
        elif kind == "two":
            self.fc = nn.Linear(c, 3)
        elif kind == "mlp":
            self.fc1, self.fc2 = nn.Linear(c, 5), nn.Linear(5, 3)
            self.bn = nn.BatchNorm1d(5, track_running_stats=ctx.bn_stats) if spec["bn"] else nn.Identity()
            self.act = ctx.act(spec["act"], 5)
        elif kind == "conv":
            self.fc = nn.Conv2d(c, 3, 1)

    def forward(self, x):
        if self.kind == "gap":
            return self.fc(torch.flatten(self.pool(x), 1))
        if self.kind == "flatten":
            return self.fc(x.view(x.size(0), -1))
        if self.kind == "reshape":
            return self.fc(x.reshape(-1, x.shape[1] * x.shape[2] * x.shape[3]))
        if self.kind == "torch.flatten":
            return self.fc(torch.flatten(x, 1))
        if self.kind == "two":  # two outputs: the features and a linear on their spatial max
            return x, self.fc(x.amax((2, 3)))
        if self.kind == "mlp":
            return self.fc2(self.act(self.bn(self.fc1(x.mean((2, 3))))))
        if self.kind == "conv":
            return self.fc(x)
        return x  # "none": the last block's output is the model output


class RandomNet(nn.Module):
    def __init__(self, spec: dict):
        super().__init__()
        self.shared = nn.ModuleDict()  # registered here as well, so sharing is visible
        ctx = Context(3, INPUT_SHAPE[-1], self.shared, spec.get("bn_stats", True))
        self.stem = ConvBlock(spec["stem"], ctx)
        self.blocks = nn.ModuleList(BLOCKS[b["kind"]](b, ctx) for b in spec["blocks"])
        self.head = Head(spec["head"], ctx)

    def forward(self, x):
        x = self.stem(x)
        for block in self.blocks:
            x = block(x)
        return self.head(x)


@torch.no_grad()
def build(spec: dict, seed: int = 0) -> nn.Module:
    """The network for ``spec`` in eval mode, with randomised BN statistics and PReLU slopes."""
    from lnconvert.testing import randomize_batchnorm

    torch.manual_seed(seed)
    net = RandomNet(spec).eval()
    for m in net.modules():
        if isinstance(m, nn.PReLU):
            m.weight.uniform_(-0.5, 0.5)
    generator = torch.Generator().manual_seed(seed)
    randomize_batchnorm(net, torch.randn((8,) + INPUT_SHAPE[1:], generator=generator), seed=seed)
    return net


# ---------------------------------------------------------------- strategies
activation = st.tuples(st.sampled_from(sorted(ACTIVATIONS)), st.sampled_from(FORMS))
maybe_activation = st.one_of(st.none(), activation)
width = st.integers(1, 8)

BLOCK_STRATEGIES = {
    "conv": st.fixed_dictionaries({
        "kind": st.just("conv"), "out": width, "k": st.sampled_from([1, 3]), "stride": st.sampled_from([1, 2]),
        "groups": st.sampled_from(["1", "depthwise", "2"]),
        "bn": st.sampled_from(["after", "before", "none", "after_act"]),
        "bias": st.booleans(), "act": maybe_activation}),
    "residual": st.fixed_dictionaries({
        "kind": st.just("residual"), "out": width, "act": activation, "preact": st.booleans(),
        "bn_after_add": st.booleans(), "act_after_add": st.booleans(),
        "add": st.sampled_from(["+", "+=", "torch.add"])}),
    "cat": st.fixed_dictionaries({
        "kind": st.just("cat"), "branches": st.lists(st.tuples(st.integers(1, 4), maybe_activation), min_size=1,
                                                     max_size=2),
        "identity": st.booleans(), "bn_after": st.booleans()}),
    "se": st.fixed_dictionaries({
        "kind": st.just("se"), "hidden": st.integers(1, 4), "act": activation, "gate": st.sampled_from(GATES),
        "gate_form": st.sampled_from(FORMS), "pool": st.sampled_from(["mean", "adaptive"])}),
    "pool": st.fixed_dictionaries({"kind": st.just("pool"), "op": st.sampled_from(["max", "avg"])}),
    "shared": st.fixed_dictionaries({"kind": st.just("shared"), "bn": st.booleans(), "act": activation}),
    "branch": st.fixed_dictionaries({
        "kind": st.just("branch"), "act_a": activation, "act_b": maybe_activation,
        "op": st.sampled_from(["add", "mul"])}),
    "split": st.fixed_dictionaries({
        "kind": st.just("split"), "act": activation, "depthwise": st.booleans(),
        "how": st.sampled_from(["slice", "split", "chunk"])}),
    "shuffle": st.fixed_dictionaries({"kind": st.just("shuffle")}),
    "elementwise": st.fixed_dictionaries({
        "kind": st.just("elementwise"), "op": st.sampled_from(["pad", "upsample", "dropout", "scalar", "clone"])}),
    "deconv": st.fixed_dictionaries({"kind": st.just("deconv"), "out": width, "act": activation}),
}
HEADS = st.one_of(
    st.fixed_dictionaries({"kind": st.sampled_from(["gap", "flatten", "reshape", "torch.flatten", "conv", "two",
                                                    "none"])}),
    st.fixed_dictionaries({"kind": st.just("mlp"), "bn": st.booleans(), "act": activation}),
)


@st.composite
def networks(draw, max_blocks: int = 4) -> dict:
    """A random network description (the builder adapts what cannot apply, e.g. groups)."""
    stem = draw(BLOCK_STRATEGIES["conv"].map(lambda b: {**b, "groups": "1", "bn": "after"}))
    blocks = draw(st.lists(st.one_of(*BLOCK_STRATEGIES.values()), max_size=max_blocks))
    return {"stem": stem, "blocks": blocks, "head": draw(HEADS),
            "bn_stats": draw(st.sampled_from([True, True, True, False]))}
