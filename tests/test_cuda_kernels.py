"""The CUDA C++ backend without a GPU: the extension builds for sm_80 and sm_90 with no
spills and 128-bit streaming accesses, its ops carry the right schemas and fake
implementations, and the same kernel sources compile for sm_70 (V100) with CUDA 12's
NVRTC and ptxas. Everything that runs the kernels is in tests/test_gpu.py."""

import ctypes
import importlib.util
import os
import re
import shutil
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import pytest
import triton

from benchmarks.gpu_check import ptxas_report

ROOT = Path(__file__).resolve().parent.parent
CUOBJDUMP = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"

# Streams of each kernel's main loop: (loads, stores), each at least one 128-bit access.
STREAMS = {"pmd_lamb_moments_kernel": (4, 2), "pmd_lamb_update_kernel": (3, 1), "grad_sumsq_kernel": (1, 0)}
# Kernel instantiations per target: moments 6 dtype pairs, update 4 and Σg² 4 element types, each with its
# vector and scalar paths (NOTE [vector and scalar paths]); and the per-tensor sums for the 2 math types.
STREAMING_PER_ARCH = 6 + 4 + 4
ENTRIES_PER_ARCH = STREAMING_PER_ARCH + 2


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """The extension, built as CI builds it: LARGEDET_CUDA_BUILD=1 for sm_80 and sm_90, ptxas -v."""
    if shutil.which("nvcc") is None and not os.environ.get("CUDA_HOME"):
        pytest.skip("needs nvcc")
    out = tmp_path_factory.mktemp("build")
    env = dict(
        os.environ, LARGEDET_CUDA_BUILD="1", LARGEDET_CPU_BUILD="0", TORCH_CUDA_ARCH_LIST="8.0;9.0", MAX_JOBS="2"
    )
    proc = subprocess.run(
        [sys.executable, "setup.py", "build_ext", "--build-lib", str(out / "lib"), "--build-temp", str(out / "tmp")],
        cwd=ROOT, env=env, capture_output=True, text=True,
    )  # fmt: skip
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-5000:]
    (so,) = (out / "lib" / "largedet_kernels").glob("_C.*.so")
    return log, so


def test_extension_builds_for_sm80_and_sm90_without_spills(built):
    kernels, spilling = ptxas_report(built[0])
    assert not spilling, spilling
    assert kernels == {"sm_80": ENTRIES_PER_ARCH, "sm_90": ENTRIES_PER_ARCH}, kernels


def _sass_by_function(binary: Path):
    sass = subprocess.run([CUOBJDUMP, "-sass", binary], capture_output=True, text=True, check=True).stdout
    functions = defaultdict(list)
    arch = name = None
    for line in sass.splitlines():
        if m := re.search(r"code for (sm_\d+)", line):
            arch, name = m.group(1), None
        elif "Function :" in line:
            name = line.split("Function :")[1].strip()
        elif name:
            functions[arch, name].append(line)
    return functions


def test_streaming_loops_use_128_bit_accesses(built):
    functions = _sass_by_function(built[1])
    streaming = {k: body for k, body in functions.items() if any(kernel in k[1] for kernel in STREAMS)}
    assert {arch for arch, _ in streaming} == {"sm_80", "sm_90"}
    assert len(streaming) == 2 * STREAMING_PER_ARCH  # two targets
    for (arch, name), body in streaming.items():
        text = "\n".join(body)
        kernel = next(k for k in STREAMS if k in name)
        loads, stores = STREAMS[kernel]
        assert len(re.findall(r"\bLDG\.E(?:\.EF)?\.128\b", text)) >= loads, (arch, name)
        assert len(re.findall(r"\bSTG\.E\.128\b", text)) >= stores, (arch, name)


_OPS_CHECK = r"""
import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from largedet_kernels.backends import cuda

assert cuda.unavailable_reason(torch.device("cuda")) is None, cuda.unavailable_reason(torch.device("cuda"))
step = torch.ops.largedet.pmd_lamb_step_.default._schema
written = {a.name for a in step.arguments if a.alias_info is not None and a.alias_info.is_write}
assert written == {"params", "exp_avgs", "exp_avg_sqs", "steps", "partials", "t_now"}, written
def written(op):
    return {a.name for a in op.default._schema.arguments if a.alias_info is not None and a.alias_info.is_write}

assert written(torch.ops.largedet.pmd_lamb_moments_) == {"exp_avgs", "exp_avg_sqs", "partials", "t_now", "sums"}
assert written(torch.ops.largedet.pmd_lamb_update_) == {"params", "steps"}
sumsq = torch.ops.largedet.grad_sumsq.default._schema
assert {a.name for a in sumsq.arguments if a.alias_info is not None and a.alias_info.is_write} == {"partials"}

with FakeTensorMode():
    grads = [torch.empty(5, device="cuda"), torch.empty(3, 3, device="cuda")]
    i32 = lambda n: torch.empty(n, dtype=torch.int32, device="cuda")
    tables = (torch.empty(5, 2, dtype=torch.int64, device="cuda"), torch.empty(2, dtype=torch.int64, device="cuda"),
              i32(2), i32(2), i32(2), i32(2))
    partials = torch.empty(4, device="cuda")
    out = torch.ops.largedet.grad_sumsq(grads, *tables, partials, 16384, torch.float32)
    assert out.shape == () and out.device.type == "cuda"
    none = torch.ops.largedet.pmd_lamb_step_(grads, grads, grads, grads, [torch.empty((), device="cuda")] * 2,
                                            *tables, torch.empty(2, 11, device="cuda"), torch.empty((), device="cuda"),
                                            torch.empty((), device="cuda"), partials, torch.empty(2, device="cuda"),
                                            16384, torch.float32, torch.float32)
    assert none is None
print("ok")
"""


def test_ops_have_mutation_schemas_and_fake_implementations(built, tmp_path):
    # A copy of the package with the built extension in it, imported in a fresh process.
    shutil.copytree(ROOT / "largedet_kernels", tmp_path / "largedet_kernels")
    shutil.copy(built[1], tmp_path / "largedet_kernels")
    env = dict(os.environ, PYTHONPATH=str(tmp_path))
    env.pop("TRITON_INTERPRET", None)
    proc = subprocess.run([sys.executable, "-c", _OPS_CHECK], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-3000:]


# --- V100 (sm_70): CUDA 13 has no sm_70, so NVRTC and ptxas of CUDA 12 compile the same sources.

SM70_KERNELS = [
    "largedet::pmd_lamb_moments_kernel<float, float, float>",
    "largedet::pmd_lamb_moments_kernel<__half, __half, float>",
    "largedet::pmd_lamb_moments_kernel<__nv_bfloat16, float, float>",
    "largedet::pmd_lamb_moments_kernel<double, double, double>",
    "largedet::pmd_lamb_update_kernel<float, float>",
    "largedet::pmd_lamb_update_kernel<__half, float>",
    "largedet::pmd_lamb_update_kernel<__nv_bfloat16, float>",
    "largedet::grad_sumsq_kernel<float, float>",
    "largedet::grad_sumsq_kernel<__nv_bfloat16, float>",
    "largedet::tensor_sums_kernel<float>",
]


def _cu12_root():
    spec = importlib.util.find_spec("nvidia.cuda_nvrtc")
    return Path(list(spec.submodule_search_locations)[0]).parent if spec else None


def _nvrtc_ptx(lib, source: bytes, options, names) -> str:
    prog = ctypes.c_void_p()
    assert lib.nvrtcCreateProgram(ctypes.byref(prog), source, b"sm70.cu", 0, None, None) == 0
    for name in names:
        assert lib.nvrtcAddNameExpression(prog, f"&{name}".encode()) == 0
    opts = (ctypes.c_char_p * len(options))(*options)
    result = lib.nvrtcCompileProgram(prog, len(options), opts)
    size = ctypes.c_size_t()
    lib.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
    log = ctypes.create_string_buffer(size.value)
    lib.nvrtcGetProgramLog(prog, log)
    assert result == 0, log.value.decode()
    lib.nvrtcGetPTXSize(prog, ctypes.byref(size))
    ptx = ctypes.create_string_buffer(size.value)
    lib.nvrtcGetPTX(prog, ptx)
    lib.nvrtcDestroyProgram(ctypes.byref(prog))
    return ptx.value.decode()


def test_kernel_sources_compile_for_sm70_with_cuda12(tmp_path):
    root = _cu12_root()
    if root is None:
        pytest.skip("needs nvidia-cuda-nvrtc-cu12, nvidia-cuda-nvcc-cu12 and nvidia-cuda-runtime-cu12")
    lib = ctypes.CDLL(str(root / "cuda_nvrtc" / "lib" / "libnvrtc.so.12"))
    options = [b"--gpu-architecture=compute_70", b"--std=c++17", b"-default-device",
               f"-I{ROOT / 'csrc'}".encode(), f"-I{root / 'cuda_runtime' / 'include'}".encode()]  # fmt: skip
    ptx = _nvrtc_ptx(lib, b'#include "pmd_lamb.cuh"\n', options, SM70_KERNELS)
    assert ptx.count(".entry") == len(SM70_KERNELS)
    assert "ld.global.nc.v4" in ptx and "st.global.v4" in ptx  # the 128-bit paths survive on sm_70
    (tmp_path / "k.ptx").write_text(ptx)
    proc = subprocess.run([root / "cuda_nvcc" / "bin" / "ptxas", "-arch=sm_70", "-v", tmp_path / "k.ptx", "-o",
                           tmp_path / "k.cubin"], capture_output=True, text=True)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    kernels, spilling = ptxas_report(proc.stderr)
    assert kernels == {"sm_70": len(SM70_KERNELS)} and not spilling, (kernels, spilling)
