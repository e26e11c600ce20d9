"""A few optimizer steps of every fused backend on the GPU, for compute-sanitizer to watch.

    compute-sanitizer --tool memcheck python -m benchmarks.sanitize_step
"""

import torch

from largedet_kernels import PMDLAMB, dispatch


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
            torch.cuda.synchronize()
            print(f"{backend} {dtype}: 3 steps")


if __name__ == "__main__":
    main()
