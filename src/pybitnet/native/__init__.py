"""Build and load the native CPU kernels (kernels.cpp), registered as `torch.ops.pybitnet.*`.

The C++ source ships inside the package. On first use it is compiled with the machine's C++
compiler (`$CXX`, else g++/c++) against torch's headers and libraries, into a user cache
directory (`$PYBITNET_CACHE`, else `$XDG_CACHE_HOME/pybitnet`, else `~/.cache/pybitnet`) under a
name keyed by a hash of the source, the torch version and the compiler; later processes load that
file. Two processes that race both compile to private temporary names and move the result into
place with an atomic rename, so neither ever loads a half-written library.

No compiler, a failed build, or `PYBITNET_NATIVE=0` -> `ops()` returns None and the kernels module
runs the pure-PyTorch path; the reason is printed once, as one line on stderr.
`PYBITNET_NATIVE_ISA=avx2` (or `scalar`) forces a narrower instruction set than the CPU offers.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import threading
from pathlib import Path

import torch

SOURCE = Path(__file__).with_name("kernels.cpp")
# instruction-set ids understood by the ops (kernels.cpp: enum Isa)
ISA_IDS = {"auto": 0, "scalar": 1, "avx2": 2, "avx512": 3}
# CPU feature bits returned by torch.ops.pybitnet.cpu_features (kernels.cpp: enum Feature)
HAS_AVX2, HAS_AVX512_VNNI, HAS_AVX512_BF16 = 1, 2, 4

_lock = threading.Lock()
_state: dict[str, object] = {}


def enabled() -> bool:
    return os.environ.get("PYBITNET_NATIVE", "1").strip().lower() not in ("0", "false", "no", "off")


def ops():
    """torch.ops.pybitnet when the native library is available, else None (after one stderr line).
    `PYBITNET_NATIVE` is read on the first call; the answer holds for the life of the process."""
    if "ops" in _state:  # every BitLinear call asks: no lock, no environment read once decided
        return _state["ops"]
    with _lock:
        if "ops" not in _state:
            _state["ops"] = _load() if enabled() else None
    return _state["ops"]


def isa() -> int:
    """The instruction-set id to pass to the ops: `PYBITNET_NATIVE_ISA`, default auto (the widest)."""
    name = os.environ.get("PYBITNET_NATIVE_ISA", "auto").strip().lower()
    if name not in ISA_IDS:
        from ..errors import ConfigError

        raise ConfigError(f"PYBITNET_NATIVE_ISA={name!r}; choose one of: {', '.join(ISA_IDS)}")
    return ISA_IDS[name]


def has_avx512_vnni() -> bool:
    """Whether the native ops run their AVX-512 VNNI bodies here (the CPU has them and
    PYBITNET_NATIVE_ISA does not narrow the choice)."""
    loaded = ops()
    return loaded is not None and isa() in (ISA_IDS["auto"], ISA_IDS["avx512"]) \
        and bool(int(loaded.cpu_features()) & HAS_AVX512_VNNI)


def cache_dir() -> Path:
    if os.environ.get("PYBITNET_CACHE"):
        return Path(os.environ["PYBITNET_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "pybitnet"


def _compiler() -> str | None:
    for name in (os.environ.get("CXX"), "g++", "c++", "clang++"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def _torch_paths() -> tuple[list[str], str]:
    root = Path(torch.__file__).parent
    return [str(root / "include"), str(root / "include" / "torch" / "csrc" / "api" / "include")], str(root / "lib")


def _build_command(compiler: str, output: str) -> list[str]:
    includes, libdir = _torch_paths()
    return [
        compiler, "-O3", "-ffp-contract=off", "-std=c++20", "-fPIC", "-shared", "-fopenmp", "-w",
        f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}",
        *[f"-I{p}" for p in includes], f"-I{sysconfig.get_paths()['include']}",
        str(SOURCE), "-o", output, f"-L{libdir}", f"-Wl,-rpath,{libdir}", "-lc10", "-ltorch_cpu",
    ]


def library_path(compiler: str) -> Path:
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True).stdout.splitlines()[:1]
    key = hashlib.sha256()
    for part in (SOURCE.read_bytes(), torch.__version__.encode(), repr(version).encode(), sys.platform.encode()):
        key.update(part)
    return cache_dir() / f"pybitnet_kernels_{key.hexdigest()[:16]}.so"


def _say(message: str) -> None:
    print(f"pybitnet: {message}", file=sys.stderr)


def _load():
    compiler = _compiler()
    if compiler is None:
        _say("no C++ compiler found; using the pure-PyTorch kernels (slower decode)")
        return None
    target = library_path(compiler)
    try:
        if not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=target.stem + ".", suffix=".tmp.so", dir=target.parent)
            os.close(fd)
            try:
                result = subprocess.run(_build_command(compiler, tmp), capture_output=True, text=True)
                if result.returncode != 0:
                    lines = result.stderr.strip().splitlines() or ["(no output)"]
                    first_error = next((line for line in lines if "error" in line), lines[-1]).strip()
                    _say(f"building the native kernels failed ({first_error}); using the pure-PyTorch kernels")
                    return None
                os.replace(tmp, target)  # atomic: a racing process sees the old name or a whole file
            finally:
                if os.path.exists(tmp):
                    os.unlink(tmp)
        torch.ops.load_library(str(target))
    except (OSError, RuntimeError) as err:
        _say(f"cannot build or load the native kernels ({err}); using the pure-PyTorch kernels")
        return None
    return torch.ops.pybitnet
