"""Insert the boundary ops where a linked tensor cannot continue."""
from __future__ import annotations

from torch import fx

from ..layers import IN_LAYOUT
from ..nn import ChannelSelect, GatedMerge
from ..options import PassContext
from ..plan import LinkPlan
from ..rewrite import insert_module_after
from ..rules import is_inplace_call


def run(gm: fx.GraphModule, ctx: PassContext, plan: LinkPlan) -> fx.GraphModule:
    """Every planned boundary edge gets the primaries back: ``slice`` shares one
    ChannelSelect per producer (copying when a consumer writes in place, so it cannot
    corrupt the linked tensor); ``gate`` inserts a GatedMerge per edge (gate = 0).
    Preserves: what every boundary consumer reads, exactly.
    """
    nodes = {n.name: n for n in gm.graph.nodes}
    selects: dict[str, fx.Node] = {}
    by_producer: dict[str, list[str]] = {}
    for consumer, producer, kind, _ in plan.boundaries:
        if kind == "slice":
            by_producer.setdefault(producer, []).append(consumer)
    for consumer_name, producer_name, kind, reason in plan.boundaries:
        consumer, producer = nodes[consumer_name], nodes[producer_name]
        layout = plan.layouts[producer_name]
        if kind == "gate":
            merged = insert_module_after(gm, producer, GatedMerge(layout.primary, layout.twin, layout.dim),
                                         f"{producer_name}_gate", (producer,))
            merged.meta[IN_LAYOUT] = layout
            consumer.replace_input_with(producer, merged)
        else:
            if producer_name not in selects:
                copy = any(is_inplace_call(gm, nodes[c]) for c in by_producer[producer_name])
                selects[producer_name] = insert_module_after(
                    gm, producer, ChannelSelect(layout.primary, layout.dim, copy=copy),
                    f"{producer_name}_primary", (producer,))
            consumer.replace_input_with(producer, selects[producer_name])
        ctx.report.boundary(consumer_name, producer_name, kind, reason)
    gm.recompile()
    return gm
