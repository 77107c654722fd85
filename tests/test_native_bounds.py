"""The native kernels read nothing past their tensors: each operand in turn is placed so that its last byte
is the last one before an unreadable page (as the last tensor of a mapped file may be), and every body must
give the same results as with the operand in ordinary memory. A read past the end faults; the checks run
in a child process so that a fault fails the test instead of ending the run."""

from __future__ import annotations

import subprocess
import sys

import pytest

from pybitnet import native

CHILD = r"""
import ctypes, mmap
import numpy as np, torch
from pybitnet import native
from pybitnet.quant.ggml_blocks import NATIVE_KIND, QuantizedTable
from pybitnet.quant.packed import pack_ternary

ops = native.ops()
libc = ctypes.CDLL(None, use_errno=True)
libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
keep = []  # the mappings behind the views stay open while in use
features = int(ops.cpu_features())
ISAS = ["scalar"] + (["avx2"] if features & native.HAS_AVX2 else []) + \
       (["avx512"] if features & native.HAS_AVX512_VNNI else [])


def at_page_end(t):
    # a copy of t whose last byte is the last one before a PROT_NONE page
    raw = t.contiguous().view(torch.uint8).reshape(-1).numpy() if t.numel() else np.zeros(0, np.uint8)
    size = raw.size
    pages = max(1, (size + mmap.PAGESIZE - 1) // mmap.PAGESIZE)
    region = mmap.mmap(-1, (pages + 1) * mmap.PAGESIZE)
    base = ctypes.addressof(ctypes.c_char.from_buffer(region))
    assert libc.mprotect(base + pages * mmap.PAGESIZE, mmap.PAGESIZE, 0) == 0
    view = np.frombuffer(region, dtype=np.uint8, count=size, offset=pages * mmap.PAGESIZE - size)
    view[:] = raw
    keep.append(region)
    return torch.from_numpy(view).view(t.dtype).reshape(t.shape)


def check(name, op, args, guarded):
    # op(*args) with each argument index in `guarded` moved to a page end, alone, on every body
    for isa in ISAS:
        isa_id = native.ISA_IDS[isa]
        expected = op(*args, isa_id)
        for i in guarded:
            moved = list(args)
            moved[i] = at_page_end(args[i])
            got = op(*moved, isa_id)
            assert torch.equal(got, expected), (name, isa, i)


g = torch.Generator().manual_seed(0)
for m in (1, 3, 9):
    for k in (1, 100, 256, 300, 800):
        w = torch.randint(-1, 2, (5, k), generator=g, dtype=torch.int8)
        q = torch.randint(-128, 128, (m, k), generator=g, dtype=torch.int8)
        check("ternary_matmul", ops.ternary_matmul, (q, pack_ternary(w), k), (0, 1))
    for width in (1, 7, 33, 100, 512):
        h = torch.randn(m, width, generator=g)
        for dtype in (torch.bfloat16, torch.float16, torch.float32):
            check("half_matmul", ops.half_matmul, (h, torch.randn(6, width, generator=g).to(dtype)), (0, 1))
        codes = torch.randint(-127, 128, (6, width), generator=g, dtype=torch.int8)
        check("int8_head", ops.int8_head, (h, codes, torch.rand(6, generator=g) + 0.5, codes.sum(1, dtype=torch.int32)),
              (0, 1, 2, 3))
    for kind in ("Q8_0", "Q6_K", "Q4_K", "Q5_K", "Q4_0"):
        for width in ((64, 256, 576) if kind in ("Q8_0", "Q4_0") else (256, 512)):
            table = QuantizedTable.quantize(torch.randn(7, width, generator=g), kind).data
            h = torch.randn(m, width, generator=g)
            check("quant_head " + kind, lambda h, t, isa: ops.quant_head(h, t, NATIVE_KIND[kind], isa), (h, table), (0, 1))
            check("quant_head_int8 " + kind, lambda h, t, isa: ops.quant_head_int8(h, t, NATIVE_KIND[kind], isa),
                  (h, table), (0, 1))
print("ok")
"""


@pytest.mark.skipif(native.ops() is None, reason="needs the native kernels")
def test_no_kernel_reads_past_its_operands():
    run = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0 and run.stdout.strip() == "ok", (run.returncode, run.stdout[-2000:], run.stderr[-2000:])
