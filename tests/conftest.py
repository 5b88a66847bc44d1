"""Make the repository's top-level packages importable when pytest runs without the project installed."""

import pathlib
import sys

_ROOT = pathlib.Path(__file__).resolve().parents[1]
# The server's packages (imagegen, with common/ and services/ through imagegen/__init__.py) and the client's.
for _path in (str(_ROOT / "clients" / "python"), str(_ROOT)):
    if _path not in sys.path:
        sys.path.insert(0, _path)
