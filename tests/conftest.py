"""Test-session set-up: the repository's packages importable without the project installed, and CPU kernels
whose rounding does not depend on where a row falls in a SIMD vector."""

import os
import pathlib
import sys

_ROOT = pathlib.Path(__file__).resolve().parents[1]
# The server's packages (imagegen, with common/ and services/ through imagegen/__init__.py) and the client's.
for _path in (str(_ROOT / "clients" / "python"), str(_ROOT)):
    if _path not in sys.path:
        sys.path.insert(0, _path)

# ATen's AVX2 kernels treat a vector's tail elements differently from its body, so sharding a sequence (another
# row count per rank) moves fp32 results by ~1e-6 on AVX2-only CPUs (seen: 1.07e-6 for Edit-Plus at --sp 2; the
# same code stays under 1e-6 on AVX-512 machines). The parity contract (<= 1e-6 between layouts) is about our
# sharding, not that: pin ATen to its portable kernels for every test process and the stage processes they
# start (they inherit the environment). Set before torch picks its kernels; an explicit setting wins.
os.environ.setdefault("ATEN_CPU_CAPABILITY", "default")
