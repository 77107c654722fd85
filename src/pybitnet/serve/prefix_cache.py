"""The prefix cache: K/V of token sequences the server has already run, reused by later requests.

A sequence is cut into blocks of `block_size` tokens. A block is keyed by its own tokens and the block
before it, so a key names one whole prefix (the chain of blocks from position 0), as vLLM's automatic
prefix caching does; only full blocks are kept. Keys are the token tuples themselves (with the parent's
id), so two different prefixes never share a block, whatever their hashes.

Blocks live in one pool tensor allocated when the cache is made but touched only as blocks are written
(the operating system gives pages on first write), so the process grows with what is cached, never past
the budget:
    pool (capacity, 2, layers, Hkv, block_size, D)   [.., 0] keys, [.., 1] values
When a new block needs a slot and none is free, the least recently used block that no other block
continues is dropped (a dropped block's descendants could never match again, so leaves go first).

Requests hand their K/V over by copy (`store` from a cache row, `load` into one), so a block is never in
use by a running request and any block may be evicted between two scheduler steps. Everything here runs
on the scheduler thread, except save/load, which run when it is stopped or not yet started.

On the native float32 CPU path a token's K/V do not depend on how its sequence was split into prefill
chunks or decode steps (kernels.cpp: attention_prefill), so a request that reuses blocks gets the bits of
one that computed them. On the pure-PyTorch path the float32 rule holds instead (docs/server.md).
"""

from __future__ import annotations

import collections
import json
import logging
import os
import tempfile
from dataclasses import dataclass, field
from collections.abc import Callable
from pathlib import Path

import torch

from ..cache import KVCache
from ..errors import InputError
from ..session import common_prefix

log = logging.getLogger("pybitnet.serve")

DEFAULT_BLOCK_SIZE = 16
DEFAULT_BUDGET_MB = 1024
FILE_NAME = "prefix-cache.safetensors"
FORMAT = "pybitnet-prefix-cache/1"


@dataclass(eq=False)
class _Block:
    id: int
    parent: "_Block | None"
    tokens: tuple[int, ...]
    slot: int
    children: int = 0
    key: tuple = field(default=())


@dataclass
class PrefixMatch:
    """The cached K/V that spell the start of a prompt: whole blocks, then possibly the first tokens of one more
    (a token's K/V depend only on the tokens up to it, so a block's first tokens serve any sequence that
    shares them, as llama.cpp reuses a cached prompt up to the first differing token)."""

    chain: list[_Block]
    tail: _Block | None = None
    tail_tokens: int = 0
    block_size: int = DEFAULT_BLOCK_SIZE

    @property
    def tokens(self) -> int:
        return len(self.chain) * self.block_size + self.tail_tokens


class PrefixCache:
    def __init__(self, *, num_layers: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype,
                 budget_bytes: int, block_size: int = DEFAULT_BLOCK_SIZE, fingerprint: str | Callable[[], str] = ""):
        if block_size < 1 or budget_bytes < 0:
            raise InputError(f"the prefix cache needs block_size >= 1 and a budget >= 0, got {block_size}, {budget_bytes}")
        self.block_size, self.dtype = block_size, dtype
        self._fingerprint = fingerprint  # the model's digest, or what makes it: only files need it
        self.block_shape = (2, num_layers, num_kv_heads, block_size, head_dim)
        itemsize = torch.empty((), dtype=dtype).element_size()
        self.block_bytes = 2 * num_layers * num_kv_heads * block_size * head_dim * itemsize
        self.capacity = budget_bytes // self.block_bytes
        # (capacity, 2, layers, Hkv, block_size, D): pages are touched only when a block is written
        self.pool = torch.empty((self.capacity, *self.block_shape), dtype=dtype) if self.capacity else None
        self._blocks: collections.OrderedDict[tuple, _Block] = collections.OrderedDict()  # LRU first
        self._children: dict[int, list[_Block]] = {}  # parent id (-1: none) -> the blocks that continue it
        self._free = list(range(self.capacity - 1, -1, -1))  # slots, popped from the end
        self._next_id = 0
        self.evictions = 0

    @classmethod
    def for_model(cls, model, budget_bytes: int, block_size: int = DEFAULT_BLOCK_SIZE) -> "PrefixCache":
        c = model.config
        return cls(num_layers=c.num_layers, num_kv_heads=c.num_kv_heads, head_dim=c.head_dim, dtype=model.dtype,
                   budget_bytes=budget_bytes, block_size=block_size, fingerprint=model.fingerprint)

    @property
    def fingerprint(self) -> str:
        if callable(self._fingerprint):  # hashed on first use (a save or a load), not at every server start
            self._fingerprint = self._fingerprint()
        return self._fingerprint

    # -- what it holds -------------------------------------------------------------------------------------------

    @property
    def blocks(self) -> int:
        return len(self._blocks)

    @property
    def bytes_used(self) -> int:
        return len(self._blocks) * self.block_bytes

    def match(self, tokens: list[int], limit: int | None = None) -> PrefixMatch:
        """The cached K/V that spell the longest prefix of tokens[:limit], from position 0."""
        n = self.block_size
        limit = len(tokens) if limit is None else min(limit, len(tokens))
        chain: list[_Block] = []
        parent = None
        for start in range(0, limit - n + 1, n):
            block = self._blocks.get((parent.id if parent else -1, tuple(tokens[start : start + n])))
            if block is None:
                break
            chain.append(block)
            parent = block
        found = PrefixMatch(chain, block_size=n)
        rest = tokens[len(chain) * n : limit]
        for child in self._children.get(parent.id if parent else -1, ()) if rest else ():
            shared = common_prefix(child.tokens, rest)
            if shared > found.tail_tokens:
                found.tail, found.tail_tokens = child, shared
        touched = ([found.tail] if found.tail is not None else []) + chain[::-1]
        for block in touched:  # the root most recent: leaves are evicted before what they continue
            self._blocks.move_to_end(block.key)
        return found

    def load(self, found: PrefixMatch, cache: KVCache, row: int) -> int:
        """Copy the match's K/V into positions [0, found.tokens) of `cache` row `row` and set the row's length to
        that; returns the number of positions filled."""
        n = self.block_size
        pieces = [(block, n) for block in found.chain] + ([(found.tail, found.tail_tokens)] if found.tail else [])
        for i, (block, count) in enumerate(pieces):
            kv = self.pool[block.slot]  # (2, layers, Hkv, n, D)
            cache.keys[:, row, :, i * n : i * n + count] = kv[0, :, :, :count]
            cache.values[:, row, :, i * n : i * n + count] = kv[1, :, :, :count]
        cache.lengths[row] = found.tokens
        return found.tokens

    def store(self, tokens: list[int], cache: KVCache, row: int, upto: int) -> int:
        """Keep the full blocks of tokens[:upto], whose K/V sit at positions [0, upto) of `cache` row `row`;
        returns how many blocks were new."""
        if self.capacity == 0:
            return 0
        n, parent, added, chain = self.block_size, None, 0, []
        for start in range(0, min(upto, len(tokens)) - n + 1, n):
            key = (parent.id if parent else -1, tuple(tokens[start : start + n]))
            block = self._blocks.get(key)
            if block is None:
                slot = self._take_slot(protect=chain)
                if slot is None:
                    break
                block = self._add(key, parent, slot)
                kv = self.pool[slot]
                kv[0].copy_(cache.keys[:, row, :, start : start + n])
                kv[1].copy_(cache.values[:, row, :, start : start + n])
                added += 1
            chain.append(block)
            parent = block
        for block in reversed(chain):
            self._blocks.move_to_end(block.key)
        return added

    def clear(self) -> None:
        self._blocks.clear()
        self._children.clear()
        self._free = list(range(self.capacity - 1, -1, -1))

    # -- slots -----------------------------------------------------------------------------------------------------

    def _add(self, key: tuple, parent: _Block | None, slot: int) -> _Block:
        block = _Block(self._next_id, parent, key[1], slot, key=key)
        self._next_id += 1
        self._blocks[key] = block
        self._children.setdefault(key[0], []).append(block)
        if parent is not None:
            parent.children += 1
        return block

    def _take_slot(self, protect: list[_Block]) -> int | None:
        if self._free:
            return self._free.pop()
        protected = {id(b) for b in protect}
        victim = next((b for b in self._blocks.values() if b.children == 0 and id(b) not in protected), None)
        if victim is None:
            return None
        del self._blocks[victim.key]
        siblings = self._children[victim.key[0]]
        siblings.remove(victim)
        if not siblings:
            del self._children[victim.key[0]]
        if victim.parent is not None:
            victim.parent.children -= 1
        self.evictions += 1
        return victim.slot

    # -- on disk ---------------------------------------------------------------------------------------------------

    def save(self, directory: str | Path) -> Path:
        """Write every block to DIRECTORY/prefix-cache.safetensors (atomically: a temporary file, then a rename)."""
        from safetensors.torch import save_file

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        order = list(self._blocks.values())  # LRU first; parents are kept before their children below
        index = {b.id: i for i, b in enumerate(_parents_first(order))}
        ordered = sorted(order, key=lambda b: index[b.id])
        blocks = [[index[b.parent.id] if b.parent else -1, list(b.tokens)] for b in ordered]
        lru = [index[b.id] for b in order]
        data = self.pool[[b.slot for b in ordered]].contiguous() if ordered else torch.empty((0, *self.block_shape), dtype=self.dtype)
        meta = {"format": FORMAT, "fingerprint": self.fingerprint, "block_size": str(self.block_size),
                "blocks": json.dumps(blocks), "lru": json.dumps(lru)}
        target = directory / FILE_NAME
        fd, tmp = tempfile.mkstemp(prefix=FILE_NAME + ".", suffix=".tmp", dir=directory)
        os.close(fd)
        try:
            save_file({"kv": data}, tmp, metadata=meta)
            os.replace(tmp, target)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        return target

    def load_file(self, directory: str | Path) -> int:
        """Read DIRECTORY/prefix-cache.safetensors into this (empty) cache; returns the blocks loaded.
        A missing file loads nothing; a file of another model, block size or dtype, or one that cannot be
        read whole, is reported in the log and ignored."""
        path = Path(directory) / FILE_NAME
        if not path.exists():
            return 0
        try:
            return self._read(path)
        except Exception as err:  # a corrupt or foreign file must never keep the server from starting
            self.clear()
            log.warning("prefix cache %s not loaded: %s", path.name, err)
            return 0

    def _read(self, path: Path) -> int:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            if meta.get("format") != FORMAT:
                raise ValueError(f"not a pybitnet prefix cache (format {meta.get('format')!r})")
            if meta.get("fingerprint") != self.fingerprint:
                raise ValueError("it was made with another model, dtype or kernel path")
            if int(meta.get("block_size", -1)) != self.block_size:
                raise ValueError(f"block size {meta.get('block_size')} differs from this server's {self.block_size}")
            blocks, lru = json.loads(meta["blocks"]), json.loads(meta["lru"])
            data = f.get_tensor("kv")
        if data.dtype != self.dtype or tuple(data.shape[1:]) != self.block_shape or data.shape[0] != len(blocks):
            raise ValueError(f"its tensor is {data.dtype} {tuple(data.shape)}, expected {len(blocks)} blocks of "
                             f"{self.block_shape} {self.dtype}")
        if sorted(lru) != list(range(len(blocks))):
            raise ValueError("its LRU order does not list every block once")
        keep = set(lru[-self.capacity:]) if self.capacity else set()  # the most recent that fit the budget
        made: list[_Block | None] = []
        for i, entry in enumerate(blocks):
            parent_index, tokens = entry
            if not (isinstance(parent_index, int) and -1 <= parent_index < i and isinstance(tokens, list)
                    and len(tokens) == self.block_size and all(isinstance(t, int) and t >= 0 for t in tokens)):
                raise ValueError(f"block {i} is malformed")
            parent = made[parent_index] if parent_index >= 0 else None
            if i not in keep or (parent_index >= 0 and parent is None):
                made.append(None)
                continue
            slot = self._free.pop()
            self.pool[slot].copy_(data[i])
            made.append(self._add((parent.id if parent else -1, tuple(tokens)), parent, slot))
        for i in lru:  # restore the recency order
            if made[i] is not None:
                self._blocks.move_to_end(made[i].key)
        return sum(b is not None for b in made)


def _parents_first(blocks: list[_Block]) -> list[_Block]:
    """The blocks ordered so that each comes after its parent."""
    out, placed = [], set()

    def place(block: _Block) -> None:
        if block.id in placed:
            return
        if block.parent is not None:
            place(block.parent)
        placed.add(block.id)
        out.append(block)

    for block in blocks:
        place(block)
    return out
