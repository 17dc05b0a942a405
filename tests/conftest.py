import pytest
import torch


@pytest.fixture
def one_thread():
    """Tiny models run fastest on one thread (about 10x on 2 shared cores); several threads fight over the cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
