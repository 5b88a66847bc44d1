"""The fixtures every parity module shares. The packages come from the venv (`scripts/setup-venv dev` installs
the server and the client editable), `tests.*` from the checkout's root."""

import pytest
import torch


@pytest.fixture(scope="module")
def parity_threads():
    """Pin torch's CPU threads for a whole module (`pytestmark = pytest.mark.usefixtures("parity_threads")`):
    CPU results move by ~1e-6 with the thread count, so every comparison runs at `tests.parity.THREADS`."""
    from tests.parity import THREADS

    previous = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    yield
    torch.set_num_threads(previous)
