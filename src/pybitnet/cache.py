"""The KV cache: allocated once for (batch, max_len), written in place at given positions."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .errors import CacheError


@dataclass
class LayerWindow:
    """One layer's part of a KVCache as one forward call sees it: where the call's K/V are written,
    and how many positions its queries may look at. The model's layers know nothing of other layers."""

    keys: torch.Tensor  # (B, Hkv, max_len, D), a view into the cache
    values: torch.Tensor  # (B, Hkv, max_len, D)
    write_at: int | torch.Tensor  # the start shared by every row, or (B, T) positions per row
    length: int  # after the write, the call sees positions [0, length)

    def write(self, k: torch.Tensor, v: torch.Tensor) -> None:
        """k, v (B, Hkv, T, D) -> this call's positions."""
        if isinstance(self.write_at, int):
            end = self.write_at + k.shape[2]
            self.keys[:, :, self.write_at : end] = k
            self.values[:, :, self.write_at : end] = v
            return
        rows = torch.arange(k.shape[0], device=k.device)[:, None]  # (B, 1) against positions (B, T)
        self.keys[rows, :, self.write_at] = k.transpose(1, 2)  # indexed view is (B, T, Hkv, D)
        self.values[rows, :, self.write_at] = v.transpose(1, 2)

    def visible(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, Hkv, length, D) views of keys and values, no copy."""
        return self.keys[:, :, : self.length], self.values[:, :, : self.length]


class KVCache:
    """Keys and values of every layer, (layers, B, Hkv, max_len, D) each, plus each row's length.

    Rows may hold different lengths (a ragged batch after prefill): row b's next token goes to
    position lengths[b]. Nothing is ever concatenated; asking for a position >= max_len is an error.
    """

    def __init__(self, num_layers: int, batch_size: int, max_len: int, num_kv_heads: int, head_dim: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"):
        if batch_size <= 0 or max_len <= 0:
            raise CacheError(f"a KV cache needs batch_size > 0 and max_len > 0, got {batch_size} and {max_len}")
        shape = (num_layers, batch_size, num_kv_heads, max_len, head_dim)
        self.keys = torch.zeros(shape, dtype=dtype, device=device)
        self.values = torch.zeros(shape, dtype=dtype, device=device)
        self.lengths = torch.zeros(batch_size, dtype=torch.long, device=device)  # (B,)

    @property
    def batch_size(self) -> int:
        return self.keys.shape[1]

    @property
    def max_len(self) -> int:
        return self.keys.shape[3]

    def check_room(self, end: int) -> None:
        if end > self.max_len:
            raise CacheError(
                f"KV cache overflow: position {end - 1} requested but the cache holds max_len={self.max_len} "
                f"positions; allocate a larger cache (model.new_cache(batch, max_len))"
            )

    def windows(self, seq: int) -> tuple[list["LayerWindow"], torch.Tensor]:
        """Each layer's window for a forward call that appends `seq` tokens to every row.

        Row b's tokens go to positions lengths[b] .. lengths[b]+seq-1. Returns the windows and those
        positions, (B, seq). The caller advances `lengths` once the call has run.
        """
        positions = self.lengths[:, None] + torch.arange(seq, device=self.lengths.device)  # (B, T)
        first, last = int(self.lengths.min()), int(self.lengths.max())
        self.check_room(last + seq)
        # Rows at one length write one slice; ragged rows write their own positions.
        write_at: int | torch.Tensor = first if first == last else positions
        return [LayerWindow(self.keys[i], self.values[i], write_at, last + seq)
                for i in range(self.keys.shape[0])], positions

    def copy_rows(self, src: "KVCache", src_rows: list[int], dst_rows: list[int]) -> None:
        """Copy whole rows of another cache (same layers, heads and head dim) into rows of this one:
        their keys/values for positions [0, src.max_len) and their lengths. A request prefilled alone
        in a small cache joins a running batch this way, without touching the other rows."""
        if len(src_rows) != len(dst_rows):
            raise CacheError(f"copy_rows: {len(src_rows)} source rows but {len(dst_rows)} destination rows")
        if src.keys.shape[0] != self.keys.shape[0] or src.keys.shape[4] != self.keys.shape[4] \
                or src.keys.shape[2] != self.keys.shape[2]:
            raise CacheError("copy_rows: the caches differ in layers, heads or head dim")
        if src.max_len > self.max_len:
            raise CacheError(f"copy_rows: source holds {src.max_len} positions, this cache only {self.max_len}")
        for s_row, d_row in zip(src_rows, dst_rows):
            if not (0 <= s_row < src.batch_size and 0 <= d_row < self.batch_size):
                raise CacheError(f"copy_rows: row {s_row} -> {d_row} out of range")
            n = src.max_len
            self.keys[:, d_row, :, :n] = src.keys[:, s_row]
            self.values[:, d_row, :, :n] = src.values[:, s_row]
            self.lengths[d_row] = src.lengths[s_row]

    def select_rows(self, rows: torch.Tensor) -> None:
        """Keep only `rows` (a LongTensor of row indices), so finished sequences stop costing work."""
        rows = torch.as_tensor(rows, dtype=torch.long, device=self.keys.device)
        if rows.numel() == 0:
            raise CacheError("select_rows needs at least one row to keep")
        if int(rows.max()) >= self.batch_size or int(rows.min()) < 0:
            raise CacheError(f"select_rows: row index out of range for batch size {self.batch_size}")
        self.keys = self.keys.index_select(1, rows)
        self.values = self.values.index_select(1, rows)
        self.lengths = self.lengths.index_select(0, rows)
