"""A few optimizer steps of the fused backends on the GPU, for compute-sanitizer to watch.

    PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool memcheck \
        python -m benchmarks.sanitize_step --bucket aligned

Without PyTorch's caching allocator every tensor is an allocation of its own, so an access
past a tensor's end leaves its allocation and the sanitizer sees it. A kernel takes the
128-bit path for a tensor whose addresses are 16-byte aligned, each tensor on its own (NOTE
[vector and scalar paths]): ``--bucket aligned`` steps tensors that all are (the vector
path, with scalar tails where a size is not a multiple of the group), ``--bucket
misaligned`` adds a view one element into its storage, which takes the scalar path beside
the others' vector path. Each backend steps fp32 and bf16 parameters 3 times with
clipping (so the Σg² kernel runs too) and once in halves (NOTE [sharded norms]). The
script checks that each plan took the path its bucket names, and exits non-zero when a
backend cannot run instead of skipping it.
"""

import argparse
import sys
from typing import List, Optional

import torch

from largedet_kernels import PMDLAMB, dispatch
from largedet_kernels.backends import Bucket, KeptTables

# Around a chunk (16385), in groups and tails (1, 7, 1000), a conv weight, an empty tensor.
SHAPES = [(1,), (7,), (16385,), (64, 3, 7, 7), (1000,), (0,)]
DTYPES = (torch.float32, torch.bfloat16)
STEPS = 3
VECTOR_PATH = {"aligned": True, "misaligned": False}  # whether every tensor of the bucket takes the vector path


def make_params(bucket: str, device: torch.device, dtype: torch.dtype) -> List[torch.nn.Parameter]:
    params = [torch.nn.Parameter(torch.randn(s, device=device, dtype=dtype)) for s in SHAPES]
    if bucket == "misaligned":
        params.append(torch.nn.Parameter(torch.randn(4097, device=device, dtype=dtype)[1:]))
    return params


def _halves(backend: str, opt: PMDLAMB) -> KeptTables:
    """The two halves of a sharded step (NOTE [sharded norms]) on the optimizer's tensors;
    returns the kept tables that hold their plan."""
    params = [p for p in opt.param_groups[0]["params"]]
    kept = KeptTables()
    bucket = Bucket(
        params[0].device, params=[p.detach() for p in params], grads=[p.grad for p in params],
        exp_avgs=[opt.state[p]["exp_avg"] for p in params], exp_avg_sqs=[opt.state[p]["exp_avg_sq"] for p in params],
        steps=[opt.state[p]["step"] for p in params], groups=[opt.param_groups[0]] * len(params), kept=kept,
    )  # fmt: skip
    pending = dispatch.backend_module(backend).begin_step(bucket, None, None)
    pending.finish(pending.sums)
    return kept


def all_aligned(plan) -> bool:
    """Whether the x, g, m, v addresses of the plan's pointer table are all 16-byte aligned."""
    return all(a % 16 == 0 for a in plan.address_key[: 4 * plan.n_tensors])


def step_bucket(backend: str, dtype: torch.dtype, bucket: str, device: torch.device) -> List[bool]:
    """Steps one bucket; returns all_aligned of every plan the steps used."""
    params = make_params(bucket, device, dtype)
    opt = PMDLAMB(params, cycle_length=3, max_grad_norm=1.0, backend=backend)
    for _ in range(STEPS):
        for p in params:
            p.grad = torch.randn_like(p)
        opt.step()
    kept = [*opt._step_cache.kept_tables(), _halves(backend, opt)]
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return [all_aligned(tables.plan) for tables in kept]


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bucket", required=True, choices=sorted(VECTOR_PATH))
    parser.add_argument("--device", default="cuda", help="cuda (default); cpu with TRITON_INTERPRET=1 for a rehearsal")
    parser.add_argument("--backends", nargs="+", default=["cuda", "triton"], choices=["cuda", "triton"])
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print(f"sanitize_step: FAILED: torch {torch.__version__} sees no CUDA device")
        return 1
    path = "vector" if VECTOR_PATH[args.bucket] else "scalar"
    stepped, failures = [], []
    for backend in args.backends:
        reason = dispatch.unavailable_reason(backend, device)
        if reason:
            failures.append(f"the {backend} backend cannot run on {device}: {reason}")
            continue
        for dtype in DTYPES:
            name = f"{backend} {str(dtype).removeprefix('torch.')}"
            plans = step_bucket(backend, dtype, args.bucket, device)
            if plans != [VECTOR_PATH[args.bucket]] * len(plans):
                failures.append(f"{name}: plans all aligned {plans}; the {args.bucket} bucket takes the {path} path")
                continue
            print(f"{name}: {path} path, {STEPS} steps with clipping and one in halves")
            stepped.append(name)
    for failure in failures:
        print(f"sanitize_step: FAILED: {failure}")
    print(f"sanitize_step: {args.bucket} bucket, {path} path: {', '.join(stepped) or 'nothing stepped'}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
