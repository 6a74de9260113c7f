"""Fused CPU kernels (``cpu_kernels.cpp``), built once per machine with the system's C++ compiler.

A LoRA step on a CPU spends about a quarter of its time in element-wise passes over activations.
The kernels do SwiGLU's forward and backward, RMSNorm's forward and input gradient and a
dropped copy of a tensor each in one pass, and give LoRA's A products with a dropped input
without the copy: ``x @ A.T`` and ``dh.T @ x`` minus the dropped elements' terms
(``tuneforge.accel.fused`` and ``tuneforge.accel.fast_dropout`` call them). ``varlen_attention``
is packed samples' causal attention, forward and backward, in one call
(``tuneforge.accel.attention``). They are optional: without a compiler, on other
devices or dtypes, or with ``TUNEFORGE_KERNELS=0``, the same functions run as PyTorch ops.

The library is compiled on first use (about 20 s; ``make install`` does it ahead, or ``python -m
tuneforge.accel.kernels``) with ``-march=native`` for this machine, into
``$TUNEFORGE_CACHE/kernels/`` under a name that hashes the source, the compiler flags, the
PyTorch and Python versions and the CPU, so a change of any of them builds a new one.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path

import torch

SOURCE = Path(__file__).with_name("cpu_kernels.cpp")
ENV = "TUNEFORGE_KERNELS"  # "0" turns the kernels off
FLAGS = ["-O3", "-march=native", "-fopenmp", "-fPIC", "-shared", "-std=c++20", "-w"]

_loaded: bool | None = None  # whether the library is in this process; None: not tried yet
_enabled = True
_blas: bool | None = None  # whether the loaded library found BLAS (sgemm) in PyTorch


def compiler() -> str | None:
    """The C++ compiler to build with: ``$CXX``, else c++ or g++ on PATH."""
    for name in (os.environ.get("CXX"), "c++", "g++"):
        if name and shutil.which(name):
            return name
    return None


def _cpu_id() -> str:
    """What -march=native depends on: the CPU model and its flags (Linux), else the machine."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.machine()
    wanted = ("model name", "flags")
    return "".join(line for line in info.splitlines()[:40] if line.startswith(wanted))


def library_path() -> Path:
    from tuneforge.models import cache_dir

    key = hashlib.sha256()
    for part in (SOURCE.read_bytes(), " ".join(FLAGS).encode(), torch.__version__.encode()):
        key.update(part)
    key.update(f"{sys.version_info[:2]}{platform.machine()}{_cpu_id()}".encode())
    return cache_dir() / "kernels" / f"cpu_kernels-{key.hexdigest()[:16]}.so"


def build(verbose: bool = False) -> Path:
    """Compile the kernels for this machine (no-op when already built); returns the library.
    Raises RuntimeError with the compiler's message when it fails."""
    target = library_path()
    if target.exists():
        return target
    cxx = compiler()
    if cxx is None:
        raise RuntimeError("no C++ compiler found (set CXX, or install g++)")
    from torch.utils.cpp_extension import include_paths

    torch_lib = Path(torch.__file__).parent / "lib"
    target.parent.mkdir(parents=True, exist_ok=True)
    # a temporary name in the same folder, renamed into place: builds racing in two processes
    # (test workers) each write their own file, and a reader never sees a half-written one
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    cmd = [cxx, *FLAGS, *(f"-I{p}" for p in include_paths()), str(SOURCE), "-o", tmp]
    cmd += [f"-L{torch_lib}", f"-Wl,-rpath,{torch_lib}", "-lc10", "-ltorch_cpu"]
    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    cmd.append(f"-D_GLIBCXX_USE_CXX11_ABI={abi}")
    if verbose:
        print(" ".join(cmd), file=sys.stderr)
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        Path(tmp).unlink(missing_ok=True)
        raise RuntimeError(f"compiling {SOURCE.name} failed:\n{r.stderr[-2000:]}")
    os.chmod(tmp, 0o755)
    os.replace(tmp, target)
    return target


def _switched_on() -> bool:
    """Not turned off (``disabled()``, or ``TUNEFORGE_KERNELS=0``)."""
    return _enabled and os.environ.get(ENV, "1") != "0"


def available() -> bool:
    """Whether the kernels are on and loaded in this process, building them first if needed. A
    failed build is tried once per process: it warns and leaves the PyTorch path."""
    global _loaded
    if not _switched_on():
        return False
    if _loaded is None:
        _loaded = False
        try:
            if not library_path().exists():
                print("tuneforge: building the fused CPU kernels (once, ~20 s)", file=sys.stderr)
            torch.ops.load_library(str(build()))
            _loaded = True
        except (RuntimeError, OSError) as e:
            first = (str(e).strip() or type(e).__name__).splitlines()[0]
            warnings.warn(f"tuneforge: fused CPU kernels unavailable ({first})", stacklevel=2)
    return _loaded


def attention_expected() -> bool:
    """Whether training in this process would run ``varlen_attention`` (the kernels on, and
    loaded, built or buildable here, and PyTorch with BLAS), without building anything: for
    estimates made before a run."""
    if not _switched_on():
        return False
    if _loaded is not None:
        return _loaded and (_blas if _blas is not None else torch.backends.mkl.is_available())
    return (library_path().exists() or compiler() is not None) and torch.backends.mkl.is_available()


def loaded() -> bool:
    """Whether the kernels ran (or could run) in this process so far; never builds."""
    return _enabled and bool(_loaded)


def usable(*tensors: torch.Tensor) -> bool:
    """Whether the kernels take these tensors: float32, contiguous, on the CPU, no autocast."""
    if not all(
        t.device.type == "cpu" and t.dtype == torch.float32 and t.is_contiguous() for t in tensors
    ):
        return False
    return not torch.is_autocast_enabled("cpu") and available()


def attention_usable(*tensors: torch.Tensor) -> bool:
    """Whether ``varlen_attention`` takes these (B, H, T, D) tensors: float32 on the CPU, head_dim
    contiguous, rows at least head_dim apart, no autocast, and a PyTorch whose CPU library exports
    BLAS (MKL builds do)."""
    if not all(
        t.device.type == "cpu"
        and t.dtype == torch.float32
        and t.stride(-1) == 1
        and (t.shape[-2] == 1 or t.stride(-2) >= t.shape[-1])  # tokens at least D apart
        for t in tensors
    ):
        return False
    global _blas
    if torch.is_autocast_enabled("cpu") or not available():
        return False
    if _blas is None:
        _blas = bool(torch.ops.tuneforge.has_blas())
    return _blas


@contextlib.contextmanager
def disabled() -> Iterator[None]:
    """The PyTorch path inside the block (tests and benchmarks compare both)."""
    global _enabled
    before, _enabled = _enabled, False
    try:
        yield
    finally:
        _enabled = before
