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
from largedet_kernels import _extensions

ROOT = Path(__file__).resolve().parent.parent
CUOBJDUMP = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"


def _pointer_row(name: str) -> int:
    """A row of the pointer table, from csrc/tables.h: how a kernel's template argument prints."""
    return int(re.search(rf"\b{name} = (\d+)", (ROOT / "csrc" / "tables.h").read_text()).group(1))


# What csrc/pmd_lamb_launch.cu's dispatch() instantiates, in C++'s names: (parameter, gradient) pairs; moments
# stored as the math type, or bf16 beside float math; fp32 masters beside fp16 and bf16 parameters.
PAIRS = [("float", "float"), ("double", "double"), ("__half", "__half"), ("__half", "float"),
         ("__nv_bfloat16", "__nv_bfloat16"), ("__nv_bfloat16", "float")]  # fmt: skip
BYTES = {"float": 4, "double": 8, "__half": 2, "__nv_bfloat16": 2}


def _math(t: str) -> str:
    return "double" if t == "double" else "float"


def _packs(*streams: str) -> int:
    """128-bit accesses of a whole group of kILP = 8 elements of each stream (NOTE [vector and scalar paths])."""
    return sum(8 * BYTES[t] // 16 for t in streams)


def _streaming_kernels():
    """Every kernel instantiation with a streaming loop, as c++filt names it, with the 128-bit loads and stores of
    its vector path over one group: pass 1 reads x (the fp32 master in its place when there is one, from pointer
    row kMaster), g, m, v and writes m, v; pass 2 reads x, m, v and writes x, the master too, and for bf16
    parameters without masters has a second store of x, rounded stochastically; Σg² reads g."""
    rows = {master: f"(largedet::PointerRow){_pointer_row(row)}" for master, row in ((False, "kX"), (True, "kMaster"))}
    kernels = {}
    for x, g in PAIRS:
        m = _math(x)
        for s in [m] + (["__nv_bfloat16"] if m == "float" else []):
            for master in [False] + ([True] if x in ("__half", "__nv_bfloat16") else []):
                x_read = "float" if master else x
                kernels[f"largedet::pmd_lamb_moments_kernel<{x_read}, {g}, {s}, {m}, {rows[master]}>"] = (
                    _packs(x_read, g, s, s), _packs(s, s))
                stochastic = x == "__nv_bfloat16" and not master
                stores = _packs(x) * (1 + stochastic) + _packs("float") * master
                kernels[f"largedet::pmd_lamb_update_kernel<{x}, {s}, {m}, {str(master).lower()}>"] = (
                    _packs(x_read, s, s), stores)
        kernels[f"largedet::grad_sumsq_kernel<{g}, {_math(g)}>"] = (_packs(g), 0)
    return kernels


STREAMING = _streaming_kernels()
# Entries per target: the streaming kernels, each with its vector and scalar paths, and the per-tensor sums of the
# 2 math types.
ENTRIES_PER_ARCH = len(STREAMING) + 2


# setup.py with one extension alone, the one argv[1] names: the CUDA extension here, not the step cache's check
# that CI builds beside it (half the build's time), which is not this module's.
_ONE_EXTENSION = """
import runpy, sys, setuptools
setup, name = setuptools.setup, sys.argv.pop(1)

def one_extension(**kwargs):
    return setup(**dict(kwargs, ext_modules=[e for e in kwargs.get("ext_modules", []) if e.name == name]))

setuptools.setup, sys.argv[0] = one_extension, "setup.py"
runpy.run_path("setup.py", run_name="__main__")
"""


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """The CUDA extension, built with CI's flags: LARGEDET_CUDA_BUILD=1 for sm_80 and sm_90, ptxas -v."""
    if shutil.which("nvcc") is None and not os.environ.get("CUDA_HOME"):
        pytest.skip("needs nvcc")
    out = tmp_path_factory.mktemp("build")
    env = dict(
        os.environ, LARGEDET_CUDA_BUILD="1", LARGEDET_CPU_BUILD="0", TORCH_CUDA_ARCH_LIST="8.0;9.0", MAX_JOBS="2"
    )
    proc = subprocess.run(
        [sys.executable, "-c", _ONE_EXTENSION, _extensions.AOT_CUDA_MODULE, "build_ext", "--build-lib",
         str(out / "lib"), "--build-temp", str(out / "tmp")], cwd=ROOT, env=env, capture_output=True, text=True,
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
    """SASS lines per (target, function), functions named as c++filt demangles them."""
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
    mangled = sorted({name for _, name in functions})
    demangled = subprocess.run(["c++filt"], input="\n".join(mangled), capture_output=True, text=True, check=True)
    names = dict(zip(mangled, (n.split("(largedet::ChunkTable")[0] for n in demangled.stdout.splitlines())))
    return {(arch, names[name].removeprefix("void ")): body for (arch, name), body in functions.items()}


def test_streaming_loops_use_128_bit_accesses(built):
    functions = _sass_by_function(built[1])
    for arch in ("sm_80", "sm_90"):
        streaming = {name for a, name in functions if a == arch and "tensor_sums_kernel" not in name}
        assert streaming == set(STREAMING), (arch, streaming ^ set(STREAMING))
    for (arch, name), body in functions.items():
        if name not in STREAMING:
            continue
        text = "\n".join(body)
        loads, stores = STREAMING[name]
        assert len(re.findall(r"\bLDG\.E(?:\.EF)?\.128\b", text)) >= loads, (arch, name)
        assert len(re.findall(r"\bSTG\.E\.128\b", text)) >= stores, (arch, name)


_OPS_CHECK = r"""
import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from largedet_kernels.backends import cuda

assert cuda.unavailable_reason(torch.device("cuda")) is None, cuda.unavailable_reason(torch.device("cuda"))
def written(op):
    return {a.name for a in op.default._schema.arguments if a.alias_info is not None and a.alias_info.is_write}

assert written(torch.ops.largedet.step_) == {"params", "exp_avgs", "exp_avg_sqs", "steps", "masters", "workspace",
                                             "records"}
assert written(torch.ops.largedet.moments_) == {"exp_avgs", "exp_avg_sqs", "steps", "workspace", "sums"}
assert written(torch.ops.largedet.update_) == {"params", "steps", "masters", "records"}
assert written(torch.ops.largedet.grad_sumsq) == {"workspace"}
# The table forms declare only the trust-ratio records (NOTE [tensor lists or tables]).
assert all(written(getattr(torch.ops.largedet, name)) == set() for name in ("table_moments_", "table_grad_sumsq"))
assert written(torch.ops.largedet.table_step_) == written(torch.ops.largedet.table_update_) == {"records"}

with FakeTensorMode():
    grads = [torch.empty(5, device="cuda"), torch.empty(3, 3, device="cuda")]
    chunks, workspace = torch.empty(8, dtype=torch.int32, device="cuda"), torch.empty(6, device="cuda")
    out = torch.ops.largedet.grad_sumsq(grads, chunks, workspace, 16384)
    assert out.shape == () and out.dtype == torch.float32 and out.device.type == "cuda"
    params = [g.bfloat16() for g in grads]
    none = torch.ops.largedet.step_(params, grads, params, params, [torch.empty((), device="cuda")] * 2, grads,
                                    chunks, workspace, 16384, torch.empty(2, 14, dtype=torch.float64, device="cuda"),
                                    torch.empty((), device="cuda"), torch.empty((), device="cuda"))
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
    "largedet::pmd_lamb_moments_kernel<float, float, float, float, largedet::kX>",
    "largedet::pmd_lamb_moments_kernel<__half, __half, float, float, largedet::kX>",
    "largedet::pmd_lamb_moments_kernel<__nv_bfloat16, float, float, float, largedet::kX>",
    "largedet::pmd_lamb_moments_kernel<double, double, double, double, largedet::kX>",
    "largedet::pmd_lamb_moments_kernel<float, __nv_bfloat16, __nv_bfloat16, float, largedet::kMaster>",
    "largedet::pmd_lamb_update_kernel<float, float, float, false>",
    "largedet::pmd_lamb_update_kernel<__half, float, float, true>",
    "largedet::pmd_lamb_update_kernel<__nv_bfloat16, float, float, false>",
    "largedet::pmd_lamb_update_kernel<__nv_bfloat16, __nv_bfloat16, float, true>",
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
