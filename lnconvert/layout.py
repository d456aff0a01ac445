"""Channel layouts of linked tensors.

A linked tensor carries, for each *logical* channel ``c`` of the original tensor, the
physical position of its primary value (what the original graph computed) and of its
twin (or -1 when the channel has no twin, e.g. an ordinary input of a ``cat``).
Consumers permute their weights to match the layout, so no runtime shuffles are needed.

Each twin also records its *origin*: the linked activation and channel it came from (several,
since adding two linked tensors sums their twins). Compaction uses the origins to
find every weight column that reads a given twin.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, field
from functools import cached_property
from typing import Iterable, Sequence

# distinct (activation node name, channel) pairs; tuples of strings and ints, which the cyclic
# garbage collector stops tracking
Origin = tuple
_NONE: Origin = ()


@dataclass(frozen=True)
class Layout:
    primary: tuple[int, ...]
    twin: tuple[int, ...]
    dim: int  # channel axis, non-negative
    origins: Sequence[Origin] = field(default=(), compare=False)  # per logical channel

    @property
    def channels(self) -> int:
        return len(self.primary)

    @cached_property
    def width(self) -> int:
        return len(self.primary) + sum(1 for t in self.twin if t >= 0)

    @cached_property
    def has_all_twins(self) -> bool:
        return all(t >= 0 for t in self.twin)

    @cached_property
    def sources(self) -> frozenset[str]:
        """Names of the linked activations whose twins this tensor carries."""
        if isinstance(self.origins, _LinkedOrigins):  # known without making every channel's origin
            return self.origins.sources
        return frozenset(name for origin in self.origins for name, _ in origin)

    def origin(self, c: int) -> Origin:
        return self.origins[c] if self.origins else _NONE

    def _origins(self, channels: Iterable[int]) -> tuple[Origin, ...]:
        return tuple(self.origin(c) for c in channels) if self.origins else ()

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
        return Layout(self.primary, self.twin, dim, self.origins)

    def expand_trailing(self, size: int) -> "Layout":
        """Layout after flattening the channel axis with ``size`` trailing elements per channel."""
        if size == 1:
            return self
        prim = tuple(p * size + s for p in self.primary for s in range(size))
        twin = tuple((t * size + s) if t >= 0 else -1 for t in self.twin for s in range(size))
        origins = tuple(o for o in self.origins for _ in range(size))
        return Layout(prim, twin, self.dim, origins)

    def permuted(self, order: list[int]) -> "Layout":
        """Layout of the same physical tensor whose logical channel k is our ``order[k]``."""
        return Layout(tuple(self.primary[c] for c in order), tuple(self.twin[c] for c in order), self.dim,
                      self._origins(order))

    def select(self, start: int, stop: int, groups: int = 1) -> tuple[list[int], "Layout"]:
        """Physical channels holding logical channels [start, stop) with their twins, and
        the layout of that selection: ascending order, or ``grouped(groups)`` order when every
        channel has a twin (for a grouped/depthwise consumer of the piece)."""
        prim, twin = self.primary[start:stop], self.twin[start:stop]
        origins = self._origins(range(start, stop))
        count = stop - start
        if groups > 1 and count % groups == 0 and all(t >= 0 for t in twin):
            per = count // groups
            physical = [c for g in range(groups) for c in prim[g * per:(g + 1) * per] + twin[g * per:(g + 1) * per]]
            grouped = Layout.linked(count, groups, self.dim, "")
            return physical, Layout(grouped.primary, grouped.twin, self.dim, origins)
        physical = sorted(set(prim) | {t for t in twin if t >= 0})
        position = {p: i for i, p in enumerate(physical)}
        return physical, Layout(tuple(position[p] for p in prim), tuple(position[t] if t >= 0 else -1 for t in twin),
                                self.dim, origins)

    def merged(self, other: "Layout") -> "Layout":
        """The same layout carrying both tensors' twins (the sum of two linked tensors)."""
        origins = tuple(_union(self.origin(c), other.origin(c)) for c in range(self.channels))
        return Layout(self.primary, self.twin, self.dim, origins)

    @staticmethod
    def plain(channels: int, dim: int) -> "Layout":
        """An ordinary tensor: every channel is its own primary and has no twin."""
        return Layout(tuple(range(channels)), (-1,) * channels, dim)

    @staticmethod
    def linked(channels: int, groups: int, dim: int, source: str,
               twin_channels: Sequence[int] | None = None) -> "Layout":
        """A linked activation's output. All twins: per group, that group's primaries then its
        twins (``groups=1`` is the block layout ``[primaries | twins]``). A subset of twins
        (after compaction, ``groups=1``): primaries, then the kept twins in channel order."""
        if twin_channels is not None:
            rank = {c: i for i, c in enumerate(sorted(twin_channels))}
            twin = tuple(channels + rank[c] if c in rank else -1 for c in range(channels))
            return Layout(tuple(range(channels)), twin, dim, _LinkedOrigins(source, channels, frozenset(rank)))
        prim, twin = _linked_positions(channels, groups)
        return Layout(prim, twin, dim, _LinkedOrigins(source, channels))

    @staticmethod
    def concat(parts: Sequence["Layout"], dim: int) -> "Layout":
        prim: list[int] = []
        twin: list[int] = []
        origins: list[Origin] = []
        offset = 0
        for part in parts:
            prim += (p + offset for p in part.primary)
            twin += ((t + offset) if t >= 0 else -1 for t in part.twin)
            origins += (part.origin(c) for c in range(part.channels))
            offset += part.width
        return Layout(tuple(prim), tuple(twin), dim, tuple(origins))

    def to_json(self) -> dict:
        return {"primary": list(self.primary), "twin": list(self.twin), "dim": self.dim}


class _LinkedOrigins(Sequence):
    """A linked activation's origins, ``((source, c),)`` for channel ``c`` (``()`` for a channel
    outside ``kept``), made when read: a conversion reads a few (compaction reads them all), and
    a DenseNet-121's linked channels would otherwise keep ~80k tuples alive."""

    __slots__ = ("source", "channels", "kept")

    def __init__(self, source: str, channels: int, kept: frozenset[int] | None = None):
        self.source, self.channels, self.kept = source, channels, kept

    def __len__(self) -> int:
        return self.channels

    @property
    def sources(self) -> frozenset[str]:
        return frozenset((self.source,)) if self.channels and self.kept != frozenset() else frozenset()

    def __getitem__(self, c):  # Sequence's own methods (iteration, slicing by index) read through this
        if isinstance(c, slice):
            return tuple(self[i] for i in range(*c.indices(self.channels)))
        if not -self.channels <= c < self.channels:
            raise IndexError(c)
        c %= self.channels
        return ((self.source, c),) if self.kept is None or c in self.kept else _NONE


@functools.lru_cache(maxsize=256)
def _linked_positions(channels: int, groups: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Physical positions of the primaries and the twins of ``Layout.linked`` with all twins."""
    per = channels // groups
    prim: list[int] = []
    twin: list[int] = []
    for g in range(groups):
        base = 2 * per * g
        prim += range(base, base + per)
        twin += range(base + per, base + 2 * per)
    return tuple(prim), tuple(twin)


def _union(a: Origin, b: Origin) -> Origin:
    return a if not b or a == b else b if not a else tuple(dict.fromkeys(a + b))


def describe(layout: Layout) -> str:
    """Short human name of a layout for reports."""
    c = layout.channels
    if c and layout.twin[0] > 0 and c % layout.twin[0] == 0:
        groups = c // layout.twin[0]
        if (layout.primary, layout.twin) == _linked_positions(c, groups):
            kind = "block" if groups == 1 else f"grouped({groups})"
            return f"{kind} {c}->{layout.width}"
    return f"mapped {c}->{layout.width}"


def merge_sources(layouts: Iterable[Layout]) -> frozenset[str]:
    out: set[str] = set()
    for layout in layouts:
        out |= layout.sources
    return frozenset(out)
