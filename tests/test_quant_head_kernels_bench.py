"""benchmarks/quant_head_kernels.py runs both block-table heads for every type asked for, in a child process
as it is run, and its two rates agree with the type's bytes per value (GB/s = G values/s x bytes per value)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from pybitnet import native

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(native.ops() is None, reason="needs the native kernels")
def test_every_type_gets_both_heads_rates():
    bytes_per_value = {"Q8_0": 34 / 32, "Q6_K": 210 / 256, "Q5_K": 176 / 256, "Q4_K": 144 / 256, "Q4_0": 18 / 32}
    types = ("q8_0", "q6_k", "q5_k", "q4_k", "q4_0")
    run = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "quant_head_kernels.py"), "--types", ",".join(types),
                          "--hidden", "512", "--resident-rows", "8", "--repeats", "3", "--no-full"],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    rows = {line.split()[0]: line for line in run.stdout.splitlines() if "resident" in line}
    assert sorted(rows) == sorted(t.upper() for t in types)
    for name, line in rows.items():
        fields = line.replace("|", " ").split()
        assert fields[2] == "8", line
        exact_gb, exact_values, int8_gb, int8_values = (float(x) for x in fields[3:])
        for gb, values in ((exact_gb, exact_values), (int8_gb, int8_values)):
            assert values > 0, line
            # both printed to 0.1: the rounding bounds the difference
            assert abs(gb - values * bytes_per_value[name]) <= 0.05 + 0.05 * bytes_per_value[name] + 1e-9, line
