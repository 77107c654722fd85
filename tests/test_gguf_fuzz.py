"""Fuzz the GGUF reader and loader with mutated small files: every input must load or raise our
CheckpointError (GGUFError is one), never another exception, and never take long.

The CI run is a few hundred hypothesis examples; `python tests/fuzz_gguf.py N` runs N more by hand
with the same mutations.
"""

from __future__ import annotations

import functools
import struct
import tempfile
import time
from pathlib import Path

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pybitnet import synthetic
from pybitnet.errors import CheckpointError
from pybitnet.loaders.gguf import load_gguf_weights, read_gguf_metadata, write_gguf
from test_gguf_file import const_spec, micro_config, rewrite

# Values that break naive parsers when written over a count, length, type or offset field.
INTERESTING_INTS = (0, 1, 2, 3, 4, 7, 8, 31, 32, 33, 36, 38, 99, 127, 128, 255, 256, 2**31 - 1, 2**31,
                    2**32 - 1, 2**32, 2**40, 2**62, 2**63 - 1, 2**63, 2**64 - 1)
SLOW_SECONDS = 10.0  # a small file that takes this long to reject counts as a hang


@functools.lru_cache(maxsize=None)
def base_files() -> tuple[bytes, ...]:
    """Small valid files covering I2_S + tokenizer arrays, TQ2_0 + a `.scale` tensor, TQ1_0, F16."""
    with tempfile.TemporaryDirectory(prefix="gguf-fuzz-") as tmp:  # only the bytes are kept
        return _write_base_files(Path(tmp))


def _write_base_files(folder: Path) -> tuple[bytes, ...]:
    small = micro_config(vocab_size=16)
    tq_shape = micro_config(vocab_size=16, hidden_size=256, intermediate_size=256, head_dim=0)
    tokenizer = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.tokens": [f"t{i}" for i in range(16)],
                 "tokenizer.ggml.token_type": [1] * 16, "tokenizer.ggml.merges": ["t 1", "t 2"]}
    files = []
    for name, config, qtype, tok in (("i2s", small, "i2_s", tokenizer), ("tq2", tq_shape, "tq2_0", None),
                                     ("tq1", tq_shape, "tq1_0", None), ("f16", small, "f16", None)):
        path = folder / f"{name}.gguf"
        write_gguf(path, config, synthetic.random_weights(config, 0), qtype, tokenizer_metadata=tok)
        if qtype == "tq2_0":
            scale = const_spec("blk.0.ffn_down.scale", np.array([0.5], dtype=np.float32))
            path = rewrite(path, folder / "tq2s.gguf", add_tensors=(scale,))
        files.append(path.read_bytes())
    return tuple(files)


def header_size(raw: bytes) -> int:
    """Bytes before the first tensor's data (where mutations matter most); a rough bound is enough."""
    return min(len(raw), raw.rfind(b"blk.0.") + 200)


def mutate(raw: bytes, ops: list[tuple]) -> bytes:
    """Apply (kind, position fraction, value) operations; positions are fractions so they fit any size."""
    data = bytearray(raw)
    head = header_size(raw)
    for kind, where, value in ops:
        span = head if kind != "byte_anywhere" else len(data)
        pos = min(int(where * span), max(len(data) - 1, 0))
        if kind in ("byte", "byte_anywhere"):
            if data:
                data[pos] = value & 0xFF
        elif kind == "u32":
            data[pos : pos + 4] = struct.pack("<I", value % 2**32)
        elif kind == "u64":
            data[pos : pos + 8] = struct.pack("<Q", value % 2**64)
        elif kind == "truncate":
            del data[int(where * len(data)):]
        elif kind == "insert":
            data[pos:pos] = bytes([value & 0xFF]) * (1 + value % 9)
        elif kind == "delete":
            del data[pos : pos + 1 + value % 16]
    return bytes(data)


def check_input(raw: bytes, path: Path) -> str:
    """Run the reader and the loader on `raw`; returns 'ok' or 'rejected', raises on anything else."""
    path.write_bytes(raw)
    start = time.perf_counter()
    outcome = "ok"
    try:
        read_gguf_metadata(path)
        config, weights = load_gguf_weights(path)
        assert len(weights) > 0 and config.num_layers >= 1
    except CheckpointError:
        outcome = "rejected"
    elapsed = time.perf_counter() - start
    assert elapsed < SLOW_SECONDS, f"input took {elapsed:.1f}s"
    return outcome


operation = st.tuples(
    st.sampled_from(["byte", "byte", "byte_anywhere", "u32", "u64", "truncate", "insert", "delete"]),
    st.floats(0, 1, exclude_max=True),
    st.one_of(st.integers(0, 255), st.sampled_from(INTERESTING_INTS)),
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True)
@given(base=st.integers(0, 3), ops=st.lists(operation, min_size=1, max_size=4))
def test_mutated_files_raise_only_our_errors(tmp_path_factory, base: int, ops: list[tuple]):
    raw = mutate(base_files()[base], ops)
    check_input(raw, tmp_path_factory.getbasetemp() / "fuzz.gguf")


def test_unmutated_bases_load(tmp_path: Path):
    for raw in base_files():
        assert check_input(raw, tmp_path / "base.gguf") == "ok"
