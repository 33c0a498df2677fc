"""How a model's layers share the KV pool: groups of layers with one block table each (vLLM's hybrid KV
cache manager, in small).

A model whose layers all attend to the whole context is one group: every layer has its own K/V tensors and
a request holds one block table for all of them. A model with sliding-window layers (gemma3: five local
layers to each global one) splits its layers into groups of equal size k (the gcd of the two counts):
global groups and local groups. The pool is k tensor pairs; a block id taken by a group addresses that
group's k layers, each in its own tensor. Each group has its own block table per request, so a local
group's blocks that the window has left go back to the pool while the global groups keep theirs.
Gemma 3 270M: 3 global and 15 local layers make one global group and five local groups of 3 layers."""

from __future__ import annotations

from dataclasses import dataclass
from math import gcd
from typing import Any


@dataclass(frozen=True, slots=True)
class KVLayout:
    groups: tuple[tuple[int, ...], ...]      # layer indices of each group, all of one size
    windows: tuple[int, ...]                 # per group: its sliding window in positions, 0 = whole context

    @classmethod
    def for_model(cls, hp: Any) -> "KVLayout":
        """From hyper-parameters: `num_layers`, and where present `sliding_layers` (per layer: local) and
        `sliding_window`."""
        n = hp.num_layers
        window = int(getattr(hp, "sliding_window", 0) or 0)
        local = tuple(getattr(hp, "sliding_layers", ()) or (False,) * n)
        if not window or not any(local):
            return cls((tuple(range(n)),), (0,))
        full = [i for i in range(n) if not local[i]]
        swa = [i for i in range(n) if local[i]]
        k = gcd(len(full), len(swa))
        chunk = lambda layers: [tuple(layers[i:i + k]) for i in range(0, len(layers), k)]  # noqa: E731
        groups = chunk(full) + chunk(swa)
        return cls(tuple(groups), tuple(0 if g[0] in full else window for g in groups))

    @property
    def num_tensors(self) -> int:
        """K/V tensor pairs in the pool: the layers of one group."""
        return len(self.groups[0])

    @property
    def hybrid(self) -> bool:
        return any(self.windows)

    def group_of(self, layer: int) -> int:
        return next(g for g, layers in enumerate(self.groups) if layer in layers)

    def tensor_of(self, layer: int) -> int:
        """The tensor pair holding `layer`'s K/V: its place within its group."""
        return self.groups[self.group_of(layer)].index(layer)

    def blocks_for(self, num_tokens: int, block_size: int, max_chunk: int) -> int:
        """Blocks one request of `num_tokens` positions holds at most, computed in chunks of at most
        `max_chunk` tokens: every block in a full-attention group; in a local group those of its window before
        the chunk's first position, and the chunk's."""
        whole = -(-num_tokens // block_size)
        live = lambda w: min(whole, -(-(w - 1 + max_chunk) // block_size) + 1)  # noqa: E731
        return sum(whole if w == 0 else live(w) for w in self.windows)
