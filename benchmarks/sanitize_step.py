"""A few optimizer steps of every fused backend on the GPU, for compute-sanitizer to watch.

    compute-sanitizer --tool memcheck python -m benchmarks.sanitize_step
"""

import torch

from largedet_kernels import PMDLAMB, dispatch
from largedet_kernels.backends import Bucket


def _halves(backend: str, opt: PMDLAMB) -> None:
    """The two halves of a sharded step (NOTE [sharded norms]) on the optimizer's tensors."""
    params = [p for p in opt.param_groups[0]["params"]]
    bucket = Bucket(
        params[0].device, params=[p.detach() for p in params], grads=[p.grad for p in params],
        exp_avgs=[opt.state[p]["exp_avg"] for p in params], exp_avg_sqs=[opt.state[p]["exp_avg_sq"] for p in params],
        steps=[opt.state[p]["step"] for p in params], groups=[opt.param_groups[0]] * len(params),
    )  # fmt: skip
    pending = dispatch.backend_module(backend).begin_step(bucket, None, None)
    pending.finish(pending.sums)


def main() -> None:
    device = torch.device("cuda")
    shapes = [(1,), (7,), (16385,), (64, 3, 7, 7), (1000,), (0,)]
    for backend in ("cuda", "triton"):
        reason = dispatch.unavailable_reason(backend, device)
        if reason:
            print(f"{backend}: skipped ({reason})")
            continue
        for dtype in (torch.float32, torch.bfloat16):
            params = [torch.nn.Parameter(torch.randn(s, device=device, dtype=dtype)) for s in shapes]
            params.append(torch.nn.Parameter(torch.randn(4097, device=device, dtype=dtype)[1:]))  # misaligned
            opt = PMDLAMB(params, cycle_length=3, max_grad_norm=1.0, backend=backend)
            for _ in range(3):
                for p in params:
                    p.grad = torch.randn_like(p)
                opt.step()
            _halves(backend, opt)
            torch.cuda.synchronize()
            print(f"{backend} {dtype}: 3 steps and one in halves")


if __name__ == "__main__":
    main()
