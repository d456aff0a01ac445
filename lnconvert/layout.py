"""Channel layouts of linked tensors.

A linked tensor carries, for each *logical* channel ``c`` of the original tensor, the
physical position of its primary value (what the original graph computed) and of its
twin (or -1 when the channel has no twin, e.g. an ordinary input of a ``cat``).
Consumers permute their weights to match the layout, so no runtime shuffles are needed.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Sequence


@dataclass(frozen=True)
class Layout:
    primary: tuple[int, ...]
    twin: tuple[int, ...]
    dim: int  # channel axis, non-negative
    # names of the linked activations whose twins this tensor carries
    sources: frozenset[str] = field(default=frozenset(), compare=False)

    @property
    def channels(self) -> int:
        return len(self.primary)

    @property
    def width(self) -> int:
        return len(self.primary) + sum(1 for t in self.twin if t >= 0)

    @property
    def has_all_twins(self) -> bool:
        return all(t >= 0 for t in self.twin)

    @property
    def is_primary_prefix(self) -> bool:
        """True when the primaries are the first C physical channels in order."""
        return self.primary == tuple(range(self.channels))

    def logical_of_physical(self) -> list[int]:
        """For each physical channel, the logical channel it belongs to."""
        owner = [-1] * self.width
        for c, (p, t) in enumerate(zip(self.primary, self.twin)):
            owner[p] = c
            if t >= 0:
                owner[t] = c
        return owner

    def fits_groups(self, groups: int) -> bool:
        """Can a conv with ``groups`` groups absorb this layout without a reshuffle?

        Each group's primaries must fall in that group's physical range; twins may lie
        anywhere because their weights start at zero.
        """
        if groups == 1:
            return True
        if self.width % groups or self.channels % groups:
            return False
        per_group_phys, per_group_log = self.width // groups, self.channels // groups
        return all(p // per_group_phys == c // per_group_log for c, p in enumerate(self.primary))

    def with_dim(self, dim: int) -> "Layout":
        return Layout(self.primary, self.twin, dim, self.sources)

    def expand_trailing(self, size: int) -> "Layout":
        """Layout after flattening the channel axis with ``size`` trailing elements per channel."""
        if size == 1:
            return self
        prim = tuple(p * size + s for p in self.primary for s in range(size))
        twin = tuple((t * size + s) if t >= 0 else -1 for t in self.twin for s in range(size))
        return Layout(prim, twin, self.dim, self.sources)

    def permuted(self, order: list[int]) -> "Layout":
        """Layout of the same physical tensor whose logical channel k is our ``order[k]``."""
        return Layout(tuple(self.primary[c] for c in order), tuple(self.twin[c] for c in order), self.dim,
                      self.sources)

    def select(self, start: int, stop: int, groups: int = 1) -> tuple[list[int], "Layout"]:
        """Physical channels holding logical channels [start, stop) with their twins, and
        the layout of that selection: ascending order, or ``grouped(groups)`` order when every
        channel has a twin (for a grouped/depthwise consumer of the piece)."""
        prim, twin = self.primary[start:stop], self.twin[start:stop]
        count = stop - start
        if groups > 1 and count % groups == 0 and all(t >= 0 for t in twin):
            per = count // groups
            physical = [c for g in range(groups) for c in prim[g * per:(g + 1) * per] + twin[g * per:(g + 1) * per]]
            grouped = Layout.grouped(count, groups, self.dim, "")
            return physical, Layout(grouped.primary, grouped.twin, self.dim, self.sources)
        physical = sorted(set(prim) | {t for t in twin if t >= 0})
        position = {p: i for i, p in enumerate(physical)}
        sources = self.sources if any(t >= 0 for t in twin) else frozenset()  # a twinless piece credits none
        return physical, Layout(tuple(position[p] for p in prim), tuple(position[t] if t >= 0 else -1 for t in twin),
                                self.dim, sources)

    @staticmethod
    def plain(channels: int, dim: int) -> "Layout":
        """An ordinary tensor: every channel is its own primary and has no twin."""
        return Layout(tuple(range(channels)), (-1,) * channels, dim)

    @staticmethod
    def grouped(channels: int, groups: int, dim: int, source: str) -> "Layout":
        """Per group: that group's primaries, then its twins. ``groups=1`` is the block layout."""
        per = channels // groups
        prim, twin = [], []
        for g in range(groups):
            base = 2 * per * g
            prim += range(base, base + per)
            twin += range(base + per, base + 2 * per)
        return Layout(tuple(prim), tuple(twin), dim, frozenset({source}))

    @staticmethod
    def concat(parts: Sequence["Layout"], dim: int) -> "Layout":
        prim: list[int] = []
        twin: list[int] = []
        offset = 0
        sources: set[str] = set()
        for part in parts:
            prim += (p + offset for p in part.primary)
            twin += ((t + offset) if t >= 0 else -1 for t in part.twin)
            offset += part.width
            sources |= part.sources
        return Layout(tuple(prim), tuple(twin), dim, frozenset(sources))

    def to_json(self) -> dict:
        return {"primary": list(self.primary), "twin": list(self.twin), "dim": self.dim}

    @staticmethod
    def from_json(data: dict) -> "Layout":
        return Layout(tuple(data["primary"]), tuple(data["twin"]), int(data["dim"]))


def describe(layout: Layout) -> str:
    """Short human name of a layout for reports."""
    c = layout.channels
    if c and layout.twin[0] > 0 and c % layout.twin[0] == 0:
        groups = c // layout.twin[0]
        if layout == Layout.grouped(c, groups, layout.dim, ""):
            kind = "block" if groups == 1 else f"grouped({groups})"
            return f"{kind} {c}->{layout.width}"
    return f"mapped {c}->{layout.width}"


def merge_sources(layouts: Iterable[Layout]) -> frozenset[str]:
    out: set[str] = set()
    for layout in layouts:
        out |= layout.sources
    return frozenset(out)
