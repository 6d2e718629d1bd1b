"""Channel structure: which dimension of a tensor holds channels, which unit space each channel range belongs
to, and the union-find that merges spaces whose units must be removed together."""

from __future__ import annotations

from dataclasses import dataclass, field

from .groups import Producer


@dataclass
class Channels:
    """Channel structure of a tensor: unit spaces side by side along dimension ``dim``, each unit ``spatial``
    channels wide (a conv channel flattened with its H·W positions, an attention head's channels), the whole
    block of units repeated ``repeat`` times along the dimension (positions flattened in front of the channels,
    as ``x.transpose(1, 2).flatten(1)`` makes them): index ``(r · units + u) · spatial + s`` is unit u's."""

    parts: tuple[tuple[int, int], ...]  # (space id, units), in channel order
    dim: int
    spatial: int = 1
    repeat: int = 1

    @property
    def units(self) -> int:
        return sum(n for _, n in self.parts)

    @property
    def plain(self) -> bool:
        """Each unit is one index along the dimension."""
        return self.spatial == 1 and self.repeat == 1

    def offsets(self):
        offset = 0
        for space, n in self.parts:
            yield space, offset
            offset += n


@dataclass
class Space:
    size: int
    parent: int
    reason: str | None = None
    producers: list = field(default_factory=list)
    members: list = field(default_factory=list)
    consumers: list = field(default_factory=list)
    blocks: int = 1


class Spaces:
    """Union-find over unit spaces."""

    def __init__(self):
        self.spaces: list[Space] = []

    def new(self, size: int, reason: str | None = None) -> int:
        self.spaces.append(Space(size, len(self.spaces), reason))
        return len(self.spaces) - 1

    def find(self, i: int) -> int:
        while self.spaces[i].parent != i:
            self.spaces[i].parent = self.spaces[self.spaces[i].parent].parent
            i = self.spaces[i].parent
        return i

    def get(self, i: int) -> Space:
        return self.spaces[self.find(i)]

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return
        sa, sb = self.spaces[ra], self.spaces[rb]
        sb.parent = ra
        for attr in ("producers", "members", "consumers"):
            getattr(sa, attr).extend(getattr(sb, attr))
        sa.reason = sa.reason or sb.reason
        sa.blocks = max(sa.blocks, sb.blocks)

    def protect(self, ann: Channels | None, reason: str) -> None:
        if ann is None:
            return
        for space, _ in ann.parts:
            s = self.get(space)
            s.reason = s.reason or reason

    def untouched(self, i: int) -> bool:
        """Whether a space's units are still plain producer outputs (no reader or member yet): only then may they
        be regrouped or partitioned."""
        s = self.get(i)
        return not s.consumers and not s.members and bool(s.producers) and s.blocks == 1

    def regroup(self, i: int, factor: int) -> None:
        """Units become blocks of ``factor`` consecutive units (channels become heads, heads become kv groups)."""
        s = self.get(i)
        s.size //= factor
        for p in s.producers:
            p.width *= factor

    def partition(self, i: int, sizes: list[int]) -> list[int]:
        """Split a space into consecutive parts (the queries, keys and values of one fused projection)."""
        s = self.get(i)
        parts, start = [], 0
        for n in sizes:
            part = self.new(n, s.reason)
            self.spaces[part].producers = [Producer(p.name, p.module, p.weight, p.bias, p.dim,
                                                    p.offset + start * p.width, p.width) for p in s.producers]
            parts.append(part)
            start += n
        s.producers = []
        return parts
