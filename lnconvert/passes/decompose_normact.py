"""Split timm's fused norm+activation modules into separate norm, dropout and activation calls."""
from __future__ import annotations

from torch import fx, nn

from ..options import PassContext


def _normact_types() -> tuple[type, ...]:
    try:
        from timm.layers import norm_act
    except ImportError:
        return ()
    names = ("BatchNormAct2d", "SyncBatchNormAct", "FrozenBatchNormAct2d")
    return tuple(getattr(norm_act, n) for n in names if hasattr(norm_act, n))


NORMACT_TYPES = _normact_types()


def _plain_batchnorm(module: nn.Module) -> nn.BatchNorm2d:
    """An nn.BatchNorm2d holding the same statistics and affine values as ``module``."""
    weight = getattr(module, "weight", None)
    tracks = getattr(module, "running_mean", None) is not None
    bn = nn.BatchNorm2d(module.num_features, eps=module.eps, momentum=getattr(module, "momentum", 0.1),
                        affine=weight is not None, track_running_stats=tracks)
    bn.to(device=module.running_mean.device if tracks else None,
          dtype=weight.dtype if weight is not None else None)
    state = {k: v for k, v in module.state_dict().items() if k in bn.state_dict()}
    bn.load_state_dict(state, strict=False)
    return bn.train(module.training)


def run(gm: fx.GraphModule, ctx: PassContext) -> fx.GraphModule:
    """Replace each ``BatchNormAct2d``-like call by ``act(drop(bn(x)))`` with plain modules.

    timm's norm-act modules subclass ``nn.BatchNorm2d`` yet also apply an activation, so
    a plain BN fold would silently drop it (a known trap). Preserves: the function exactly
    (the same ops in the same order); identity drop/act parts are not inserted.
    """
    decomposed = False
    for node in list(gm.graph.nodes):
        if node.op != "call_module" or type(gm.get_submodule(node.target)) not in NORMACT_TYPES:
            continue
        fused = gm.get_submodule(node.target)
        parts = [("bn", _plain_batchnorm(fused))]
        parts += [(name, getattr(fused, name)) for name in ("drop", "act")
                  # an Identity / absent part computes nothing (not a layer-type dispatch)
                  if not isinstance(getattr(fused, name, None), (nn.Identity, type(None)))]
        value = node.args[0]
        anchor = node
        for suffix, module in parts:
            name = f"{node.target}_{suffix}"
            gm.add_submodule(name, module)
            with gm.graph.inserting_before(anchor):
                value = gm.graph.call_module(name, (value,))
        node.replace_all_uses_with(value)
        gm.graph.erase_node(node)
        decomposed = True
    if decomposed:
        gm.delete_all_unused_submodules()
        gm.recompile()
    return gm
