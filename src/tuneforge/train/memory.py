"""Keep the process's memory close to what its tensors hold: glibc's malloc, told to give large
freed blocks back to the system.

glibc serves an allocation of at least ``M_MMAP_THRESHOLD`` bytes (128 KiB at start) by its own
``mmap``, returned to the system on free. But the threshold is dynamic: each such block freed
raises it to that block's size (up to 32 MiB), so from then on tensors of a few MiB come from the
heap, whose freed pages stay in the process unless they happen to sit at its top. A training
step allocates and frees such tensors by the thousand (activations, gradients, and in QLoRA
every 4-bit weight dequantized for each matmul); the heap's free holes then add up: measured on
the built-in model (bench/estimate_bench.py, CPU), peak RSS 0.8 GiB above the live tensors for
QLoRA and 0.5 GiB for full fine-tuning. Setting the threshold once fixes it (a value set by
``mallopt`` is never raised), so freed tensors above it go back at once, as
``MALLOC_MMAP_THRESHOLD_`` in the environment would do.

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
import os
import sys

M_MMAP_THRESHOLD = -3  # glibc's malloc.h
MMAP_THRESHOLD = 1024 * 1024  # see the module docstring for the measured trade-off
ENV = "MALLOC_MMAP_THRESHOLD_"


def return_freed_memory() -> bool:
    """Fix glibc's mmap threshold at 1 MiB for the rest of the process, unless the environment
    sets it already (``MALLOC_MMAP_THRESHOLD_``) or the C library is not glibc (macOS, musl,
    Windows: nothing to do).

    Returns:
        Whether the threshold was set.
    """
    if not sys.platform.startswith("linux") or ENV in os.environ:
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
