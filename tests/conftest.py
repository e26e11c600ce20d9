import pytest
import torch


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield


@pytest.fixture(params=["torch"])
def backend(request):
    """Every backend that can run on this machine's CPU tensors."""
    return request.param
