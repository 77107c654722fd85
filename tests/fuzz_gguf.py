"""Run many mutated GGUF inputs through the reader and loader by hand (not collected by pytest).

    python tests/fuzz_gguf.py [N] [SEED]        # default N = 10000

Same base files and mutations as tests/test_gguf_fuzz.py, drawn with a seeded RNG. Every input
must load or raise CheckpointError; anything else (or an input slower than SLOW_SECONDS) is a
failure, reported with the seed and index that reproduce it.
"""

from __future__ import annotations

import random
import resource
import sys
import tempfile
import time
import traceback
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from test_gguf_fuzz import INTERESTING_INTS, base_files, check_input, mutate  # noqa: E402

ADDRESS_SPACE_LIMIT = 6 * 2**30
KINDS = ["byte", "byte", "byte_anywhere", "u32", "u64", "truncate", "insert", "delete"]


def random_ops(rng: random.Random) -> list[tuple]:
    ops = []
    for _ in range(rng.randint(1, 4)):
        value = rng.randrange(256) if rng.random() < 0.5 else rng.choice(INTERESTING_INTS)
        ops.append((rng.choice(KINDS), rng.random(), value))
    return ops


def main(count: int = 10_000, seed: int = 0) -> int:
    # A runaway allocation must show up as a MemoryError failure here, not as the kernel's OOM
    # killer picking a process on a shared machine.
    resource.setrlimit(resource.RLIMIT_AS, (ADDRESS_SPACE_LIMIT, ADDRESS_SPACE_LIMIT))
    bases = base_files()
    folder = tempfile.TemporaryDirectory(prefix="gguf-fuzz-run-")
    path = Path(folder.name) / "input.gguf"
    outcomes: Counter[str] = Counter()
    failures = 0
    start = time.perf_counter()
    for index in range(count):
        rng = random.Random(f"{seed}-{index}")
        base = rng.randrange(len(bases))
        ops = random_ops(rng)
        try:
            outcomes[check_input(mutate(bases[base], ops), path)] += 1
        except Exception:  # noqa: BLE001 - the point is to catch every other exception type
            failures += 1
            print(f"FAILURE seed={seed} index={index} base={base} ops={ops}", file=sys.stderr)
            traceback.print_exc()
    elapsed = time.perf_counter() - start
    folder.cleanup()
    print(f"{count} mutated inputs in {elapsed:.0f}s: {outcomes['ok']} loaded, {outcomes['rejected']} "
          f"rejected with CheckpointError/GGUFError, {failures} failures")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main(*(int(a) for a in sys.argv[1:3])))
