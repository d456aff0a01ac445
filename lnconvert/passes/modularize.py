"""Turn functional and method activations into module calls, one module per call site."""
from __future__ import annotations

from torch import fx

from ..errors import UnsupportedModelError
from ..options import PassContext
from ..rewrite import insert_module_after
from ..rules import FUNCTIONAL_ACTIVATIONS, Kind, is_inplace_call, is_kind


def _redirect_later_readers(gm: fx.GraphModule, node: fx.Node) -> None:
    """An in-place activation overwrote its input: readers that run after it saw the output."""
    source = node.args[0]
    if not isinstance(source, fx.Node):
        return
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    for user in list(source.users):
        if user is not node and order[user] > order[node]:
            user.replace_input_with(source, node)


_VIEWS = {"getitem", "view", "view_as", "narrow", "select", "transpose", "permute", "t", "unflatten", "flatten",
          "reshape", "squeeze", "unsqueeze", "expand", "unfold", "diagonal", "chunk", "split", "unbind",
          "contiguous", "detach"}  # may return memory shared with their input


def _is_view(node: fx.Node) -> bool:
    name = node.target if node.op == "call_method" else getattr(node.target, "__name__", None)
    return node.op in ("call_method", "call_function") and name in _VIEWS


def _check_no_write_through_view(gm: fx.GraphModule, node: fx.Node) -> None:
    """An in-place activation on a view (``x[:, :2].relu_()``) also changes the viewed tensor;
    made out of place, its later readers would see the old values, so refuse instead."""
    chain, source = [], node.args[0]
    while isinstance(source, fx.Node) and _is_view(source):
        chain.append(source)
        source = source.args[0]
    if not chain:
        return
    chain.append(source)
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    # readers of the view itself are redirected like any in-place input's; those of what it views cannot be
    if any(user not in chain and order[user] > order[node] for c in chain[1:] for user in c.users):
        raise UnsupportedModelError(f"in-place activation '{node.name}' writes into a view of '{source.name}', "
                                    f"which is read afterwards; write it out of place (inplace=False, relu "
                                    f"instead of relu_)")


def _functional_key(node: fx.Node):
    if node.op not in ("call_function", "call_method"):
        return None
    try:
        return node.target if node.target in FUNCTIONAL_ACTIVATIONS else None
    except TypeError:
        return None


def run(gm: fx.GraphModule, ctx: PassContext) -> fx.GraphModule:
    """``F.relu(x)``, ``torch.relu(x)``, ``x.relu_()``... become ``call_module`` nodes with the
    equivalent ``nn`` module, so later passes see one form; every in-place activation (module
    or functional) gets its later readers redirected to its output.

    Preserves: the function exactly, including what in-place calls made other readers see; an
    in-place activation writing through a view into a tensor read later is refused.
    """
    for node in list(gm.graph.nodes):
        key = _functional_key(node)
        is_module_act = node.op == "call_module" and is_kind(gm, node, Kind.ACTIVATION)
        if key is None and not is_module_act:
            continue
        if is_inplace_call(gm, node):
            _check_no_write_through_view(gm, node)
            _redirect_later_readers(gm, node)
        if key is None:
            continue
        # args[0] is the input (or ``self`` of a method call); the rest configure the activation
        module = FUNCTIONAL_ACTIVATIONS[key](node.args[1:], dict(node.kwargs))
        name = f"{node.name}_act"
        new = insert_module_after(gm, node, module, name, (node.args[0],))
        new.meta = dict(node.meta)
        node.replace_all_uses_with(new)
        gm.graph.erase_node(node)
    gm.recompile()
    return gm
