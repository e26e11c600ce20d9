"""The fused step's op family, defined once: its schemas and fake implementations. csrc/cpu/pmd_lamb_cpu.cpp
implements it for CPU tensors, csrc/binding.cpp for CUDA tensors; tests/cuda_emulator defines it again under
``largedet_emulated`` and implements that for CPU tensors with the CUDA kernels.

NOTE [tensor lists or tables]
    Each op comes twice. The tensor-list form (``step_``, ``moments_``, ``update_``, ``grad_sumsq``) declares
    what it writes, so torch.compile can trace it, and checks every tensor; it builds the pointer table
    itself. The table form (``table_step_``, ...) takes the addresses from the plan's pointer table (NOTE
    [pointer tables] in chunk_plan.py) and writes what the table addresses, which no schema can declare:
    eager mode only. It exists because converting six tensor lists costs ~1.5 us per tensor at the call,
    more than the step of a small tensor; the table is the optimizer's, built from tensors its step cache
    checked and keeps alive (NOTE [step cache] in step_cache.py). The tables cannot tell the host what
    the tensors are, so those forms take the dtypes and whether the bucket has fp32 masters.

    Beside the tensors every op takes the plan's packed chunk table (NOTE [packed chunk tables] in
    tables.py), its workspace (per-chunk partial norms, then each tensor's step) and its chunk size. The
    CPU kernels cut tensors into chunks of their own, fixed size (NOTE [cpu passes] in
    csrc/cpu/pmd_lamb_cpu.cpp) and keep their partial sums in double: they check the chunk size and
    leave the chunk table and workspace unread.
"""

from typing import Dict

import torch

NAMESPACE = "largedet"

_LISTS = "Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs, Tensor(c!)[] exp_avg_sqs, Tensor(d!)[] steps"
_PLAN = "Tensor chunks, Tensor(w!) workspace, int chunk_size"
_TABLES = "Tensor ptrs, Tensor numels, Tensor chunks, Tensor workspace, int chunk_size"
_DTYPES = "ScalarType x_dtype, ScalarType g_dtype, ScalarType m_dtype, bool has_masters"
# Pass 2's trust-ratio records, None with telemetry off (NOTE [trust-ratio records] in tables.py).
_RECORDS = "Tensor(r!)? records=None"

# name -> schema, in the argument order that csrc/binding.cpp and csrc/cpu/pmd_lamb_cpu.cpp implement. A list
# form declares what either implementation writes: the CPU advances the steps in pass 1, the GPU in pass 2.
SCHEMAS: Dict[str, str] = {
    "step_": (
        f"({_LISTS}, Tensor(e!)[] masters, {_PLAN}, Tensor hyper, Tensor grad_factor, Tensor found_inf, "
        f"{_RECORDS}) -> ()"
    ),
    "moments_": (
        "(Tensor[] params, Tensor[] grads, Tensor(a!)[] exp_avgs, Tensor(b!)[] exp_avg_sqs, Tensor(c!)[] steps, "
        f"Tensor[] masters, {_PLAN}, Tensor hyper, Tensor grad_factor, Tensor found_inf, Tensor(s!) sums) -> ()"
    ),
    "update_": (
        "(Tensor(a!)[] params, Tensor[] exp_avgs, Tensor[] exp_avg_sqs, Tensor(b!)[] steps, Tensor(c!)[] masters, "
        "Tensor chunks, Tensor workspace, int chunk_size, Tensor hyper, Tensor found_inf, Tensor sums, "
        f"{_RECORDS}) -> ()"
    ),
    "grad_sumsq": f"(Tensor[] grads, {_PLAN}) -> Tensor",
    # NOTE [tensor lists or tables]: what these write is addressed by ptrs, not declared.
    "table_step_": f"({_TABLES}, {_DTYPES}, Tensor hyper, Tensor grad_factor, Tensor found_inf, {_RECORDS}) -> ()",
    "table_moments_": f"({_TABLES}, {_DTYPES}, Tensor hyper, Tensor grad_factor, Tensor found_inf, Tensor sums) -> ()",
    "table_update_": f"({_TABLES}, {_DTYPES}, Tensor hyper, Tensor found_inf, Tensor sums, {_RECORDS}) -> ()",
    "table_grad_sumsq": f"({_TABLES}, ScalarType g_dtype) -> Tensor",
}

_libraries: Dict[str, torch.library.Library] = {}


def _sum_of_squares(grads_or_workspace: torch.Tensor, g_dtype: torch.dtype) -> torch.Tensor:
    from .tables import math_dtype

    return grads_or_workspace.new_empty((), dtype=math_dtype(g_dtype))


def define(namespace: str = NAMESPACE) -> None:
    """The schemas and fake implementations under ``namespace``, once per process."""
    if namespace in _libraries:
        return
    library = _libraries[namespace] = torch.library.Library(namespace, "DEF")
    for name, schema in SCHEMAS.items():
        library.define(name + schema)
    for name in ("step_", "moments_", "update_", "table_step_", "table_moments_", "table_update_"):
        torch.library.register_fake(f"{namespace}::{name}", lambda *args: None, lib=library)
    torch.library.register_fake(f"{namespace}::grad_sumsq", lambda grads, chunks, workspace, chunk_size:
                                _sum_of_squares(grads[0], grads[0].dtype), lib=library)  # fmt: skip
    torch.library.register_fake(f"{namespace}::table_grad_sumsq", lambda ptrs, numels, chunks, workspace,
                                chunk_size, g_dtype: _sum_of_squares(workspace, g_dtype), lib=library)  # fmt: skip


define()
