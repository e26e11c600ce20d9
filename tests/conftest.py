import os

import pytest
import torch

# Without a GPU the Triton kernels run for real under Triton's interpreter, on
# CPU tensors. It must be switched on before the kernels are first imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Under pytest-xdist (make test) each worker takes its share of the cores, so that the workers' thread pools
# do not fight over them.
if "PYTEST_XDIST_WORKER_COUNT" in os.environ:
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])))

import ranks  # noqa: E402
from largedet_kernels import dispatch  # noqa: E402  (after TRITON_INTERPRET)
from triton_interpreter import interpreted, patch_the_language_once_per_launch  # noqa: E402

patch_the_language_once_per_launch()

CPU_BACKENDS = ["torch"]
# The CPU extension as the package loads it: built ahead of time, or on first use (then once, into the cache).
if dispatch.unavailable_reason("cpu", torch.device("cpu")) is None:
    CPU_BACKENDS.append("cpu")
if interpreted():
    CPU_BACKENDS.append("triton")

# Small enough that the tests' tensors cross chunk and tile boundaries everywhere.
TRITON_TEST_CHUNK, TRITON_TEST_BLOCK = 256, 64


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield


@pytest.fixture(autouse=True, scope="module")
def _ranks_end_with_their_module():
    """The gloo ranks a module's tests ran on (tests/ranks.py) end with the module."""
    yield
    ranks.close_all()


def _small_triton_chunks(monkeypatch):
    from largedet_kernels.backends import triton as triton_backend

    monkeypatch.setattr(triton_backend, "CHUNK", TRITON_TEST_CHUNK)
    monkeypatch.setattr(triton_backend, "BLOCK", TRITON_TEST_BLOCK)
    return triton_backend


@pytest.fixture(params=CPU_BACKENDS)
def backend(request, monkeypatch):
    """Every backend that can step this machine's CPU tensors."""
    if request.param == "triton":
        _small_triton_chunks(monkeypatch)
    return request.param


@pytest.fixture(params=[*CPU_BACKENDS, "cuda"], ids=[*CPU_BACKENDS, "cuda-emulated"])
def every_backend(request, monkeypatch):
    """Every backend this machine runs: those of CPU tensors, and the cuda backend through the emulator."""
    if request.param == "cuda":
        request.getfixturevalue("emulated_cuda")
    elif request.param == "triton":
        _small_triton_chunks(monkeypatch)
    return request.param


@pytest.fixture
def triton_backend(monkeypatch):
    """The Triton backend on CPU tensors under the interpreter, with small chunks."""
    if "triton" not in CPU_BACKENDS:
        pytest.skip("needs Triton and TRITON_INTERPRET=1")
    return _small_triton_chunks(monkeypatch)


@pytest.fixture(scope="session")
def cuda_emulator():
    """The CUDA C++ kernels of csrc/ on the CPU (tests/cuda_emulator), built on first use."""
    import cuda_emulator as emulator

    emulator.load()
    return emulator


@pytest.fixture
def emulated_cuda(cuda_emulator, monkeypatch):
    """The cuda backend on CPU tensors through the emulator; yields the emulator module.

    torch runs on one thread meanwhile: the emulator keeps one core busy, and idle OpenMP
    workers spinning on the other would only slow it down."""
    from largedet_kernels.backends import cuda

    on_gpus = cuda.unavailable_reason
    monkeypatch.setattr(cuda, "unavailable_reason", lambda device: None if device.type == "cpu" else on_gpus(device))
    monkeypatch.setattr(cuda.KERNELS, "ops", getattr(torch.ops, cuda_emulator.NAMESPACE))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield cuda_emulator
    torch.set_num_threads(threads)
    cuda_emulator.configure(cuda_emulator.DEFAULT_SCHEDULE)
