"""Process-level setting for fast CPU inference: the C allocator's policy for large blocks.

A forward pass frees and reallocates the same activation sizes in every layer (28 MB of int32
accumulators, 14 MB gate/up, ... at T=512 for 2B-4T). glibc's malloc serves blocks above its mmap
threshold (32 MB at most, adjusted at run time) with fresh mmaps, and hands the heap's free top
back above its trim threshold, so the same pages are faulted in again and again. Raising both
keeps freed activation memory mapped for the next layer. Measured on the 2B-4T shape, 6 layers,
2 threads, interleaved runs: T=256 prefill 1.49-1.59 ms/token with it vs 1.63-1.75 without, and
T=4096 2.1 vs 2.3 ms/token. Peak RSS is unchanged (memory is reused, not added).

`tune_allocator()` runs when the first model is built; PYBITNET_TUNE_MALLOC=0 opts out. It only
changes glibc's two thresholds (nothing on other C libraries), once per process.

The price is that large transient buffers freed elsewhere in the process (a server's request bodies,
their JSON and tokens) stay mapped too, and a burst of them grows the process for good. A long-running
server therefore calls `release_memory()` (glibc's malloc_trim) after a large request, which hands the
free heap back without changing the thresholds the forward pass benefits from.

Loading a model (`loading()`, around `loaders.load`) runs with a low mmap threshold instead, so that what
it frees leaves no holes in the heap for the forward pass to scatter over; the thresholds above apply again
once the model is built.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import threading

M_TRIM_THRESHOLD = -1  # glibc mallopt parameters
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_BYTES = 1 << 30  # blocks below this come from the heap and are reused
TRIM_THRESHOLD_BYTES = 1 << 31  # free heap top kept mapped up to this size

# While a model loads, blocks from this size up that the heap has no room for get mappings of their own (`loading()`).
LOAD_MMAP_THRESHOLD_BYTES = 1 << 20

_state: dict[str, bool] = {}
_loading = {"depth": 0}
_loading_lock = threading.Lock()


def tune_allocator() -> bool:
    """Apply the thresholds once per process; True if glibc accepted them."""
    if "tuned" in _state:
        return _state["tuned"]
    _state["tuned"] = _apply_thresholds() if os.environ.get("PYBITNET_TUNE_MALLOC", "1") != "0" else False
    return _state["tuned"]


def _apply_thresholds() -> bool:
    libc = _libc()
    try:
        return libc is not None and bool(libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)) and bool(
            libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES))
    except AttributeError:  # not glibc
        return False


@contextlib.contextmanager
def loading():
    """The allocator policy while a model loads (loaders.load): a block of LOAD_MMAP_THRESHOLD_BYTES or more
    that the heap has no free room for gets a mapping of its own instead of growing the heap, so a freed
    temporary (a tensor's decode buffers, the loader's copy of a layer once it is fused) goes back to the
    system whole instead of leaving a hole between the tensors the model keeps. Left in the heap, those holes are where the first forward pass's activations land, fresh pages
    of a different hole at each allocation: on the 2B-4T shape (Q4_K table) a 128-token prefill grew RSS by
    ~125 MB for 69 MB of live blocks, in a heap of 2.1 GB of address space with 1.4 GB of holes, and the
    process peaked at 1.10x what the loaded model keeps (benchmarks/load_rss.py). With this, the heap is
    0.25 GB (0.1 GB free), the prefill grows RSS by ~105 MB, and the peak is 1.06-1.07x.

    On leaving, the forward pass's thresholds (`tune_allocator`) apply. PYBITNET_TUNE_MALLOC=0 leaves the
    allocator alone here too. Like any mallopt it is process-wide: a forward pass in another thread during
    a load gets mappings for its large blocks meanwhile (slower, the same results). Nested loads share it."""
    if not tune_allocator():  # first, so that a model built inside the load finds the process tuned already
        yield
        return
    with _loading_lock:
        _loading["depth"] += 1
        if _loading["depth"] == 1:
            _libc().mallopt(M_MMAP_THRESHOLD, LOAD_MMAP_THRESHOLD_BYTES)
    try:
        yield
    finally:
        with _loading_lock:
            _loading["depth"] -= 1
            if _loading["depth"] == 0:
                _apply_thresholds()


def release_memory() -> bool:
    """Hand the C heap's free memory back to the system (glibc's malloc_trim); True if some was released.

    With the thresholds above, memory freed after a burst of large transient buffers (a server's request
    bodies, their JSON, their tokens) stays with the process; a long-running server calls this after such a
    request so that its size returns to where it was."""
    libc = _libc()
    if libc is None:
        return False
    try:
        return bool(libc.malloc_trim(0))
    except AttributeError:  # not glibc
        return False


def _libc():
    if "libc" not in _handles:
        try:
            _handles["libc"] = ctypes.CDLL("libc.so.6")
        except OSError:
            _handles["libc"] = None
    return _handles["libc"]


_handles: dict[str, object] = {}
