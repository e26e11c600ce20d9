"""Train a torchvision detector with the LargeDet recipe under torchrun: DDP, grouped
SyncBN, the linear scaling rule with warm-up, and PMD-LAMB.

    # CPU, gloo, toy scale (what CI runs):
    torchrun --nproc_per_node 2 examples/train_detection.py --iters 3 --image-size 128
    # GPUs, NCCL: the same command on a GPU machine, e.g. 8 GPUs, BN groups of 4
    torchrun --nproc_per_node 8 examples/train_detection.py --model fasterrcnn_resnet50_fpn --bn-group-size 4

The data are procedural (coloured rectangles on noise, the colour is the class), so the
script runs without downloads; swap in a real dataset loader for real training.
"""

import argparse
import os
import time

import torch
import torch.distributed as dist
import torchvision
from torch.nn.parallel import DistributedDataParallel

from largedet_kernels import PMDLAMB
from largedet_kernels.recipe import WarmupMultiStepLR, convert_sync_batchnorm, param_groups, scaled_lr

COLOURS = torch.tensor([[0.9, 0.1, 0.1], [0.1, 0.8, 0.2], [0.2, 0.3, 0.9]])  # class k + 1 is colour k


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="fasterrcnn_mobilenet_v3_large_fpn", help="a torchvision detection model")
    ap.add_argument("--iters", type=int, default=100)
    ap.add_argument("--batch-per-rank", type=int, default=2)
    ap.add_argument("--image-size", type=int, default=320)
    ap.add_argument("--base-lr", type=float, default=0.4,
                    help="lr for --base-batch images: η·α = 0.5%% per step (README: how to choose η and α)")
    ap.add_argument("--base-batch", type=int, default=16)
    ap.add_argument("--warmup-iters", type=int, default=10)
    ap.add_argument("--bn-group-size", type=int, default=None, help="ranks per SyncBN group (default: all)")
    ap.add_argument("--cycle-length", type=int, default=200, help="PMD-LAMB's T")
    ap.add_argument("--alpha", type=float, default=0.012, help="PMD-LAMB's α")
    return ap.parse_args()


def synthetic_batch(n: int, size: int, gen: torch.Generator, device: torch.device):
    """n images with 1–3 coloured rectangles each on a noisy background, and their targets."""
    images, targets = [], []
    for _ in range(n):
        image = 0.5 + 0.1 * torch.randn(3, size, size, generator=gen)
        boxes, labels = [], []
        for _ in range(int(torch.randint(1, 4, (), generator=gen))):
            w, h = (torch.randint(size // 8, size // 2, (2,), generator=gen)).tolist()
            x0, y0 = (
                int(torch.randint(0, size - w, (), generator=gen)),
                int(torch.randint(0, size - h, (), generator=gen)),
            )
            k = int(torch.randint(0, len(COLOURS), (), generator=gen))
            image[:, y0 : y0 + h, x0 : x0 + w] = COLOURS[k, :, None, None]
            boxes.append([x0, y0, x0 + w, y0 + h])
            labels.append(k + 1)
        images.append(image.clamp(0, 1).to(device))
        targets.append({"boxes": torch.tensor(boxes, dtype=torch.float32, device=device),
                        "labels": torch.tensor(labels, device=device)})  # fmt: skip
    return images, targets


def main() -> None:
    args = parse_args()
    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    torch.manual_seed(0)  # the same initial weights on every rank

    model = torchvision.models.detection.__dict__[args.model](
        weights=None, weights_backbone=None, num_classes=len(COLOURS) + 1,
        min_size=args.image_size, max_size=args.image_size,
    )  # fmt: skip
    if cuda:
        model = convert_sync_batchnorm(model, group_size=args.bn_group_size)
    elif rank == 0:
        print("CPU: torch's SyncBatchNorm needs CUDA, so BatchNorm statistics stay per rank")
    model = DistributedDataParallel(model.to(device), device_ids=[device.index] if cuda else None)

    batch = args.batch_per_rank * world
    lr = scaled_lr(args.base_lr, args.base_batch, batch)  # linear scaling rule
    optimizer = PMDLAMB(param_groups(model, weight_decay=5e-4), lr=lr, alpha=args.alpha, cycle_length=args.cycle_length)
    milestones = [int(args.iters * 2 / 3), int(args.iters * 8 / 9)]  # the paper's 60k and 80k of 90k
    scheduler = WarmupMultiStepLR(optimizer, milestones, warmup_factor=0.1, warmup_iters=args.warmup_iters)
    if rank == 0:
        print(f"{world} ranks x {args.batch_per_rank} images, lr {lr:g}, PMD-LAMB on "
              f"{sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters")  # fmt: skip

    gen = torch.Generator().manual_seed(1000 + rank)  # each rank its own images
    model.train()
    for it in range(args.iters):
        start = time.perf_counter()
        images, targets = synthetic_batch(args.batch_per_rank, args.image_size, gen, device)
        lr_now = optimizer.param_groups[0]["lr"]
        losses = model(images, targets)
        loss = sum(losses.values())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        scheduler.step()
        reported = loss.detach().clone()
        dist.all_reduce(reported)
        if rank == 0:
            print(f"iter {it:4d}  loss {reported.item() / world:.4f}  lr {lr_now:.4g}  "
                  f"{time.perf_counter() - start:.2f} s", flush=True)  # fmt: skip
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
