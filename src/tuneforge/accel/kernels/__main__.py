"""``python -m tuneforge.accel.kernels``: build the fused CPU kernels now (``make install`` runs it)."""

import sys

from tuneforge.accel.kernels import build

try:
    print(build(verbose="-v" in sys.argv))
except (RuntimeError, OSError) as e:  # no compiler, a failed compile, an unwritable cache
    # not an error for the install: training then runs the same functions as PyTorch ops
    print(f"tuneforge: fused CPU kernels not built: {e}", file=sys.stderr)
