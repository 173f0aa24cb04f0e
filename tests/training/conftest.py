"""Training tests: torch on one thread (the machine is shared), and small error models built in memory."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

torch = pytest.importorskip("torch")


@pytest.fixture(autouse=True)
def one_torch_thread() -> Iterator[None]:
    """Keep each test on one intra-op thread; restore the setting afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
