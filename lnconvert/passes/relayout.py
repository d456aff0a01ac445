"""Rewrite the ops whose meaning would change on a wider tensor: reshapes, shuffles, splits."""
from __future__ import annotations

import torch
from torch import fx

from ..nn import ChannelSelect
from ..options import PassContext
from ..plan import LinkPlan
from ..rewrite import eliminate_dead_code, insert_module_after


def run(gm: fx.GraphModule, ctx: PassContext, plan: LinkPlan) -> fx.GraphModule:
    """- a flatten/view/reshape of a linked tensor becomes ``torch.flatten(x, dim)``, so no
      hard-coded channel count (``view(-1, 25088)``) survives;
    - a channel shuffle (and a view to the same shape) is removed: the plan recorded it as a
      permutation of the layout, which the consumers' weights absorb;
    - each ``chunk``/``split`` piece becomes a ChannelSelect of its channels and their twins.
    Preserves: the value of every rewritten node's primaries, exactly; ops left unused
    (the shuffle's views, the split) are removed by dead-code elimination afterwards.
    """
    nodes = {n.name: n for n in gm.graph.nodes}
    for name, start_dim in plan.flattens.items():
        node = nodes[name]
        with gm.graph.inserting_before(node):
            flat = gm.graph.call_function(torch.flatten, (node.args[0], start_dim))
        flat.meta = dict(node.meta)
        node.replace_all_uses_with(flat)
        gm.graph.erase_node(node)
    for name, (source, physical) in plan.selects.items():
        piece = nodes[name]
        layout = plan.layouts[name]
        select = insert_module_after(gm, nodes[source], ChannelSelect(physical, layout.dim), f"{name}_piece",
                                     (nodes[source],))
        piece.replace_all_uses_with(select)
    for name, source in plan.rewires.items():  # last: also redirects the selects just made
        while source in plan.rewires:  # consecutive shuffles / no-op views: all read the first source
            source = plan.rewires[source]
        nodes[name].replace_all_uses_with(nodes[source])
    eliminate_dead_code(gm)
    gm.recompile()
    return gm
