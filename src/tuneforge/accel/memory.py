"""Keep the process's memory close to what its tensors hold, without paying for it in speed.

**jemalloc, when the system has it.** A training step allocates and frees activation and
gradient tensors of a few MiB by the thousand. glibc's malloc cannot serve that well either way
(below): it either keeps freed memory as heap holes (peak RSS far above the live tensors) or gives
it back and page-faults it in again on the next allocation. jemalloc reuses freed blocks by size
class and returns idle pages after a delay: on the built-in model (bench/sft_bench.py setting,
LoRA, 1 thread, back to back on a quiet machine) it gave 29.3 supervised tok/s at 2564 MB peak
RSS, against 27.4 at 2753 MB with glibc at a 1 MiB threshold (with another job on the second
core: 55.3 / 2564 against 42.0 / 2766, and 50.9 / 4106 with glibc keeping its heap). A library
cannot change its process's allocator, so ``tuneforge train`` re-executes itself once with
jemalloc in ``LD_PRELOAD`` when it finds ``libjemalloc.so`` (Debian/Ubuntu: ``apt install
libjemalloc2``; conda: ``conda install jemalloc``). ``TUNEFORGE_MALLOC=glibc`` turns this off.

**Freed pages stay with jemalloc** (``JEMALLOC_CONF``, passed as ``MALLOC_CONF`` with the
preload). jemalloc's default gives unused pages back to the system over ten seconds (blocks of
8 MiB and more at once), and a training step wants them back within a second: on the built-in
model (LoRA, 12 micro-batches of two packed rows, about 1000 tokens each, 2 threads) that was
about 250,000 page faults per micro-batch, 6.7-7.7 s of each pass's ~78 s of CPU time spent in
the kernel handing back zeroed pages. ``dirty_decay_ms:-1,muzzy_decay_ms:-1`` keeps them: under 100 faults a pass
after the first, 0.6 s in the kernel, 2.84-2.87 ms per token against 3.13-3.31 (-9%),
alternating processes, for 2058 MB peak RSS instead of 1999-2007. Kept pages alone are not
enough: with jemalloc's default ``lg_extent_max_active_fit:6`` a freed block is reused only for
requests at least 1/64 of its size, and micro-batches of varying lengths then grew the process
by about 460 MB each pass (2392, 2783, 3272 MB); ``lg_extent_max_active_fit:16`` lets any freed
block serve a smaller request, and peak RSS stayed at 2058-2059 MB over three passes. The
process does not shrink between steps, like PyTorch's CUDA caching allocator. Transparent huge
pages (``thp:always``) were slower (four times the kernel time). A ``MALLOC_CONF`` of your own
comes after these options and wins.

**glibc otherwise.** glibc serves an allocation of at least ``M_MMAP_THRESHOLD`` bytes (128 KiB at
start) by its own ``mmap``, returned to the system on free. But the threshold is dynamic: each
such block freed raises it to that block's size (up to 32 MiB), so from then on tensors of a few
MiB come from the heap, whose freed pages stay in the process unless they happen to sit at its
top. The heap's free holes then add up: measured on the built-in model (bench/estimate_bench.py,
CPU), peak RSS 0.8 GiB above the live tensors for QLoRA and 0.5 GiB for full fine-tuning. Setting
the threshold once fixes it (a value set by ``mallopt`` is never raised), so freed tensors above
it go back at once, as ``MALLOC_MMAP_THRESHOLD_`` in the environment would do.

The value is 1 MiB, a measured trade-off: every fresh ``mmap`` is zero-filled by the kernel, so a
low threshold costs speed. bench/sft_bench.py (LoRA, 2 x 512-token packed rows, idle 2-core CPU)
gave 57.5 supervised tok/s and 2710 MB peak RSS at 128 KiB, 63.8 / 2728 at 512 KiB,
75.1 / 3058 at 1 MiB, 91.4 / 4353 at 4 MiB, and 73.1 / 4389 with glibc's dynamic default.
QLoRA's dequantized weights (several MiB each) stay above 1 MiB, so they still go back at once.
bench/estimate_bench.py (3 steps) found 1 MiB steps about 25% slower than glibc's default, so the
speed side is not settled; ``MALLOC_MMAP_THRESHOLD_`` in the environment overrides this.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import glob
import os
import sys
from pathlib import Path

from tuneforge.errors import TuneforgeError

M_MMAP_THRESHOLD = -3  # glibc's malloc.h
MMAP_THRESHOLD = 1024 * 1024  # see the module docstring for the measured trade-off
ENV = "MALLOC_MMAP_THRESHOLD_"
# keep freed pages and let any of them serve a smaller request (module docstring)
JEMALLOC_CONF = "dirty_decay_ms:-1,muzzy_decay_ms:-1,lg_extent_max_active_fit:16"
CHOICE_ENV = "TUNEFORGE_MALLOC"  # "jemalloc" (the default, when found) or "glibc"
_REEXEC_MARK = "TUNEFORGE_MALLOC_REEXEC"  # set on the re-executed process: never loop
_LIB_DIRS = (
    "/usr/lib/x86_64-linux-gnu",
    "/usr/lib/aarch64-linux-gnu",
    "/usr/lib64",
    "/usr/lib",
    "/usr/local/lib",
)


def find_jemalloc() -> str | None:
    """The path of a jemalloc shared library (the conda environment's, then the system's)."""
    dirs = [os.path.join(p, "lib") for p in (os.environ.get("CONDA_PREFIX"), sys.prefix) if p]
    for d in [*dirs, *_LIB_DIRS]:
        found = sorted(glob.glob(os.path.join(d, "libjemalloc.so*")))
        if found:
            return found[0]
    return None


def preload_jemalloc(env: dict[str, str]) -> dict[str, str] | None:
    """A copy of ``env`` whose processes start with jemalloc (prepended to ``LD_PRELOAD``) keeping
    its freed pages (``JEMALLOC_CONF`` ahead of any ``MALLOC_CONF`` of the caller's, which wins),
    or None when jemalloc is not installed."""
    lib = find_jemalloc()
    if lib is None:
        return None
    return {
        **env,
        "LD_PRELOAD": " ".join(p for p in (lib, env.get("LD_PRELOAD")) if p),
        "MALLOC_CONF": ",".join(p for p in (JEMALLOC_CONF, env.get("MALLOC_CONF")) if p),
    }


def allocator() -> str:
    """The allocator serving this process: ``"jemalloc"`` if it is loaded, else ``"system"``."""
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return "system"
    return "jemalloc" if "libjemalloc" in maps else "system"


def reexec_with_jemalloc() -> None:
    """Replace this process by the same command with jemalloc preloaded (see the module
    docstring), once; returns without doing anything when ``TUNEFORGE_MALLOC=glibc``, off Linux,
    when jemalloc is already in use or not installed, or in a process re-executed already."""
    choice = os.environ.get(CHOICE_ENV, "jemalloc").lower()
    if choice not in ("jemalloc", "glibc"):
        raise TuneforgeError(f"{CHOICE_ENV}={choice!r}: use jemalloc or glibc")
    if (
        choice == "glibc"
        or not sys.platform.startswith("linux")
        or _REEXEC_MARK in os.environ
        or allocator() == "jemalloc"
    ):
        return
    env = preload_jemalloc(dict(os.environ))
    if env is None:
        return
    env[_REEXEC_MARK] = "1"
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)


def return_freed_memory() -> bool:
    """Fix glibc's mmap threshold at 1 MiB for the rest of the process, unless the environment
    sets it already (``MALLOC_MMAP_THRESHOLD_``), jemalloc serves the process, or the C library
    is not glibc (macOS, musl, Windows: nothing to do).

    Returns:
        Whether the threshold was set.
    """
    if not sys.platform.startswith("linux") or ENV in os.environ or allocator() == "jemalloc":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        gnu_version = libc.gnu_get_libc_version  # only glibc has it
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    del gnu_version
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    return mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1
