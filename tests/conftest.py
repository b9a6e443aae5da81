"""Shared pytest fixtures."""
import pytest
import torch


@pytest.fixture
def one_thread():
    "Run the test on one torch thread (steadier on a shared 2-core CI machine), restoring the setting after."
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
