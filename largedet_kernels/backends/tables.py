"""What the host shares with the kernels, stated once for Python: the rows of the pointer table, the parts of
the packed chunk table and of the workspace, the columns of the hyper-parameter table and how a param group
fills them, the math type, and the dtype pairs the C++ kernels instantiate. csrc/tables.h states the same
for C++ and the constants of triton_kernels.py for Triton; tests/test_chunk_plan.py checks that they agree.

NOTE [double coefficients]
    The per-tensor coefficients of the update (ξ, ξβ, 1−β, the bias corrections
    1−β^t) are formed in float64 and rounded to the math type once. Formed in
    float32 from a float32 β they miss float32 accuracy by far: β2 = 0.999 is off
    by 1.3e-8 in float32, which 1−β2 turns into a relative error of 1.3e-5 in v,
    and 1−β2^t keeps an error of that order over its first thousand steps. So the
    hyper-parameter table is float64 whatever the parameter dtype, with 1−β1 and
    1−β2 formed on the host, and the kernels take ξ and β^t in float64 from the
    table's β and the step count, outside their per-element loops. The torch
    backend reads the same table and forms them likewise on the device (in float32
    on MPS, which has no float64).
"""

import math
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

# Rows of the pointer table (NOTE [pointer tables] in chunk_plan.py): the addresses of x, g, m, v, the step
# count and the fp32 master of each tensor.
POINTER_ROWS = ("x", "g", "m", "v", "step", "master")

# NOTE [packed chunk tables]
#     A plan's chunk tables are one int32 tensor, its parts in CHUNK_TABLE_PARTS order: each chunk's tensor
#     and its index in that tensor (n_chunks each), then each tensor's first chunk and chunk count (n_tensors
#     each), which tell pass 2 where the tensor's partial norms are; a kernel finds n_chunks from the
#     tensor's size and n_tensors. Its workspace is one tensor of the math dtype: each chunk's partial Σx²,
#     Σu² (2 · n_chunks), then each tensor's t, from pass 1 to pass 2 (n_tensors).
CHUNK_TABLE_PARTS = ("chunk_tensor", "chunk_index", "first_chunk", "chunk_count")
WORKSPACE_PARTS = ("partials", "t_now")

# Columns of the per-tensor hyper-parameter table. weight_g and weight_g2 weigh g in m and g² in v: 1−β1 (or
# 1 without grad averaging) and 1−β2. Flags are 0 or 1.
HYPER_COLUMNS = (
    "lr_alpha", "beta1", "beta2", "weight_g", "weight_g2", "eps", "weight_decay", "cycle_length",
    "bias_correction", "eps_inside_sqrt", "adam_w_mode", "use_trust_ratio", "stochastic_rounding", "seed",
    "maximize", "trust_ratio_min", "trust_ratio_max",
)  # fmt: skip
HYPER_DTYPE = torch.float64  # NOTE [double coefficients]

# NOTE [trust-ratio records]
#     With telemetry on, pass 2 writes each tensor's record, in RECORD_FIELDS order, in the math dtype: the step
#     t it was taken at, ‖x‖, ‖u‖ and the ratio applied, ‖x‖/‖u‖ after the bounds (1 where a norm is 0 or the
#     tensor takes no trust ratio, NaN where a norm is not finite), without η·α. The norms are those the ratio
#     is formed from: the whole tensor's under NOTE [sharded norms]. It is written once per tensor, beside the
#     ratio it records (the CUDA and Triton kernels: by the first block of the tensor), and not on a skipped step
#     (NOTE [skipped steps]), which leaves the record of the step before. Off, nothing is written.
RECORD_FIELDS = ("step", "x_norm", "u_norm", "ratio")
COLUMN = {name: i for i, name in enumerate(HYPER_COLUMNS)}


def math_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of the update's math for parameters (or gradients) of ``dtype``: float64 stays, others
    go to float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def has_kernels(param_dtype: torch.dtype, grad_dtype: torch.dtype) -> bool:
    """The (parameter, gradient) dtype pairs the C++ kernels instantiate, on the GPU and on the CPU: gradients
    of the parameters' dtype, or fp32 gradients of fp16/bf16 parameters."""
    low_precision = param_dtype in (torch.float16, torch.bfloat16)
    return grad_dtype == param_dtype or (grad_dtype == torch.float32 and low_precision)


def gradient_weights(group: Dict) -> Tuple[float, float]:
    """The weights of g in m and of g² in v, in double: 1−β1 (1 without gradient averaging) and 1−β2."""
    beta1, beta2 = group["betas"]
    return (1 - beta1) if group["grad_averaging"] else 1.0, 1 - beta2


def adapts(group: Dict) -> bool:
    """Whether the group's tensors take the trust ratio: its ``adapt``, or where that is None apex's rule
    (``use_nvlamb=False``: none for tensors without weight decay)."""
    adapt = group["adapt"]
    return (group["use_nvlamb"] or group["weight_decay"] != 0) if adapt is None else adapt


def hyper_row(group: Dict) -> List[Any]:
    """One tensor's row of the hyper-parameter table, from its param group, in HYPER_COLUMNS order. A tensor
    lr is left out of the row's η·α (TensorLrs applies it on the device: NOTE [tensor lr])."""
    beta1, beta2 = group["betas"]
    weight_g, weight_g2 = gradient_weights(group)
    lr = group["lr"]
    bounds = group["trust_ratio_bounds"] or (0.0, math.inf)
    row = dict(
        lr_alpha=(1.0 if isinstance(lr, torch.Tensor) else lr) * group["alpha"], beta1=beta1, beta2=beta2,
        weight_g=weight_g, weight_g2=weight_g2,
        eps=group["eps"], weight_decay=group["weight_decay"], cycle_length=group["cycle_length"] or 0,
        bias_correction=group["bias_correction"], eps_inside_sqrt=group["eps_inside_sqrt"],
        adam_w_mode=group["adam_w_mode"],
        use_trust_ratio=adapts(group), stochastic_rounding=group["stochastic_rounding"], seed=group["seed"],
        maximize=group["maximize"], trust_ratio_min=bounds[0], trust_ratio_max=bounds[1],
    )  # fmt: skip
    return [row[name] for name in HYPER_COLUMNS]


def hyper_rows(groups: Sequence[Dict]) -> Tuple[List[List[Any]], List[int]]:
    """One row per distinct param group of ``groups`` (one group per tensor), and each tensor's row: a
    schedule that changes lr every step costs a row per group, not per tensor."""
    slots: Dict[int, int] = {}
    rows, which = [], []
    for group in groups:
        slot = slots.get(id(group))
        if slot is None:
            slot = slots[id(group)] = len(rows)
            rows.append(hyper_row(group))
        which.append(slot)
    return rows, which


def to_device(values, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Host values as one device tensor, copied from pinned memory without blocking the host."""
    host = torch.tensor(values, dtype=dtype)
    return host.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else host.to(device)


def hyper_table(rows: List[List[Any]], which: List[int], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """The per-tensor table [n_tensors, len(HYPER_COLUMNS)] on the device: the group rows uploaded, then
    gathered per tensor there."""
    table = to_device(rows, dtype, device)
    return table if len(rows) == len(which) else table[to_device(which, torch.int64, device)]


class TensorLrs:
    """NOTE [tensor lr]
    A param group's lr may be a 0-d (or one-element) tensor, as torch's optimizers allow, so that an lr
    schedule writing into it in place neither recompiles a compiled step nor invalidates a captured CUDA
    graph. The tables then hold α alone in that group's η·α, and each step multiplies the column by the
    tensors' current values on the device (a CPU tensor is copied without blocking the host): no host
    sync and no rebuild of the step cache, whose hyper-parameter check sees the same tensor. A CUDA graph
    replays the read of an lr on the parameters' device; one on the CPU is a copy a capture cannot hold.
    An lr tensor on another accelerator than its parameters is refused when the group is checked."""

    def __init__(self, groups: Sequence[Dict], device: torch.device, dtype: torch.dtype) -> None:
        slots: Dict[int, int] = {}
        self.lrs: List[torch.Tensor] = []
        index = []
        for group in groups:
            lr = group["lr"]
            if isinstance(lr, torch.Tensor):
                index.append(slots.setdefault(id(lr), len(self.lrs)))
                if index[-1] == len(self.lrs):
                    self.lrs.append(lr)
            else:
                index.append(-1)
        self.dtype, self.device = dtype, device
        # Each tensor's lr in the list of self.lrs, then 1 for a float lr, which the table holds already.
        self.index = to_device([len(self.lrs) if i < 0 else i for i in index], torch.int64, device)
        self.one = torch.ones(1, dtype=dtype, device=device)

    def factors(self) -> torch.Tensor:
        """Each tensor's lr factor, as of now."""
        lrs = [lr.reshape(1).to(self.device, self.dtype, non_blocking=True) for lr in self.lrs]
        return torch.cat([*lrs, self.one])[self.index]

    @staticmethod
    def of(groups: Sequence[Dict], device: torch.device, dtype: torch.dtype) -> Optional["TensorLrs"]:
        """The bucket's tensor lrs, or None when every lr is a number."""
        return TensorLrs(groups, device, dtype) if any(isinstance(g["lr"], torch.Tensor) for g in groups) else None

    def applied(self, table: torch.Tensor) -> torch.Tensor:
        """The hyper-parameter table with the lrs in its η·α column."""
        out = table.clone()
        out[:, COLUMN["lr_alpha"]] *= self.factors()
        return out
