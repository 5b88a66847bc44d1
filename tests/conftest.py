"""Make the repository's top-level packages importable when pytest runs without the project installed, and
the fixtures every parity module shares."""

import pathlib
import sys

import pytest
import torch

_ROOT = pathlib.Path(__file__).resolve().parents[1]
# The server's packages (imagegen, with common/ and services/ through imagegen/__init__.py) and the client's.
for _path in (str(_ROOT / "clients" / "python"), str(_ROOT)):
    if _path not in sys.path:
        sys.path.insert(0, _path)


@pytest.fixture(scope="module")
def parity_threads():
    """Pin torch's CPU threads for a whole module (`pytestmark = pytest.mark.usefixtures("parity_threads")`):
    CPU results move by ~1e-6 with the thread count, so every comparison runs at `tests.parity.THREADS`."""
    from tests.parity import THREADS

    previous = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    yield
    torch.set_num_threads(previous)
