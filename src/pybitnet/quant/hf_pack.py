"""The Hugging Face packed ternary layout: 4 values per uint8 along axis 0 (docs/formats.md).

With P = ceil(out / 4), byte B[p, c] holds rows p, p+P, p+2P, p+3P of column c in bits
1..0, 3..2, 5..4, 7..6; each 2-bit code is value + 1 (0 -> -1, 1 -> 0, 2 -> +1; 3 is invalid).
"""

from __future__ import annotations

import torch

from ..errors import CheckpointError


def pack_hf(ternary: torch.Tensor) -> torch.Tensor:
    """(out, ...) int values in {-1,0,1} -> (ceil(out/4), ...) uint8."""
    out = ternary.shape[0]
    rows = -(-out // 4)
    codes = torch.ones((4 * rows,) + tuple(ternary.shape[1:]), dtype=torch.uint8)  # padding packs as 0
    codes[:out] = (ternary.to(torch.int16) + 1).to(torch.uint8)
    codes = codes.view((4, rows) + tuple(ternary.shape[1:]))
    return codes[0] | (codes[1] << 2) | (codes[2] << 4) | (codes[3] << 6)


def unpack_hf(packed: torch.Tensor, out_features: int, name: str = "weight") -> torch.Tensor:
    """(P, ...) uint8 -> (out_features, ...) int8 ternary; a code of 3 is a CheckpointError naming `name`."""
    if packed.dtype != torch.uint8:
        raise CheckpointError(f"packed tensor {name!r} has dtype {packed.dtype}, expected uint8")
    if out_features > 4 * packed.shape[0]:
        raise CheckpointError(
            f"packed tensor {name!r} has {packed.shape[0]} rows, too few for {out_features} output features"
        )
    codes = torch.cat([(packed >> (2 * i)) & 3 for i in range(4)], dim=0)[:out_features]
    if bool((codes == 3).any()):
        idx = [int(i) for i in (codes == 3).nonzero()[0]]
        raise CheckpointError(f"packed tensor {name!r} holds the invalid 2-bit code 3 (non-ternary) at {idx}")
    return codes.to(torch.int8) - 1
