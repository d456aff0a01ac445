"""Replace each planned activation call by a LinkedActivation (per call site)."""
from __future__ import annotations

from torch import fx

from ..layers import LAYOUT
from ..layout import describe
from ..nn import LinkedActivation
from ..options import PassContext
from ..plan import LinkPlan
from ..rewrite import own_module
from ..rules import rule_for


def run(gm: fx.GraphModule, ctx: PassContext, plan: LinkPlan) -> fx.GraphModule:
    """Each linked activation ``g`` becomes ``LinkedActivation(g, policy)``: primaries equal
    ``g(x)`` exactly, twins are added. A shared module (torchvision ResNet's ``relu``) gets a
    linked copy per call site. Preserves: the primary half of every linked output; the
    graph is only consistent again once ``widen`` and ``boundaries`` have run.
    """
    for node in list(gm.graph.nodes):  # graph order, so the report reads like the model
        if node.name in plan.skipped:
            ctx.report.activation(node.name, rule_for(gm, node).name, "skipped", plan.skipped[node.name])
        if node.name not in plan.linked:
            continue
        layout, groups = plan.linked[node.name]
        act_type = rule_for(gm, node).name
        subset = layout.has_all_twins is False
        kept = [c for c, t in enumerate(layout.twin) if t >= 0] if subset else None
        linked = LinkedActivation(gm.get_submodule(node.target), ctx.options.policy, dim=layout.dim, groups=groups,
                                  twin_channels=kept)
        own_module(gm, node, linked, "linked")
        node.meta[LAYOUT] = layout  # marks the linked activations (compaction reads it)
        ctx.report.activation(node.name, act_type, "linked", describe(layout))
    gm.recompile()
    return gm
