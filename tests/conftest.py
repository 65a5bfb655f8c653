"""Shared test fixtures."""

import pytest
import torch


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a test module (restored after): the tests' tensors are small, and on a shared
    2-core machine intra-op threads cost more than they gain. Use with
    ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session", autouse=True)
def _single_thread_session():
    """The whole suite runs with one intra-op thread (see ``one_thread``): measured 12x faster for the sampler
    matrix on the shared 2-core machine than torch's default of 2 threads."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
