"""Train a skipfast ResNet on synthetic data with DistributedDataParallel.

    torchrun --nproc-per-node 2 examples/train_ddp.py --quick      # CPU: gloo
    torchrun --nproc-per-node 8 examples/train_ddp.py               # GPUs: NCCL, one per process
    python examples/train_ddp.py --quick                            # one process (a 1-rank group)

Batch norm is converted to ``skipfast.SyncBatchNormAct2d`` (statistics over the global
batch; ``--local-bn`` keeps per-rank statistics for comparison). Rank 0 shows a progress
bar and prints the throughput in images per second over all ranks, warm-up excluded.
The synthetic task (noisy class prototypes) is learnable, so the loss goes down.
"""
from __future__ import annotations

import argparse
import os
import socket
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

import skipfast


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="resnet18", choices=["resnet18", "resnet34", "resnet50"])
    p.add_argument("--batch-size", type=int, default=64, help="images per rank and step")
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--warmup", type=int, default=5, help="steps left out of the throughput")
    p.add_argument("--lr", type=float, default=0.02)
    p.add_argument("--local-bn", action="store_true", help="keep per-rank BN statistics (no SyncBatchNormAct2d)")
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--quick", action="store_true", help="a small run for CPUs: 32x32 images, 16 per rank, 20 steps")
    args = p.parse_args()
    if args.quick:
        args.batch_size, args.image_size, args.steps, args.warmup = 16, 32, 20, 3
    return args


def setup():
    """Process group from torchrun's environment, or a 1-process group when run directly."""
    if "RANK" not in os.environ:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(port))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device)
    else:
        device = torch.device("cpu")
        if "OMP_NUM_THREADS" not in os.environ:  # share the cores between this machine's ranks
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", 1))))
        dist.init_process_group("gloo")
    return device


def synthetic_batches(args, rank, device, count=8):
    """A few fixed batches per rank: class prototypes plus noise (a learnable task)."""
    g = torch.Generator().manual_seed(1234)
    prototypes = torch.randn(args.classes, 3, args.image_size, args.image_size, generator=g)
    g.manual_seed(rank)
    batches = []
    for _ in range(count):
        y = torch.randint(0, args.classes, (args.batch_size,), generator=g)
        x = prototypes[y] + 2.0 * torch.randn(args.batch_size, 3, args.image_size, args.image_size, generator=g)
        fmt = torch.channels_last if args.channels_last else torch.contiguous_format
        batches.append((x.to(device, memory_format=fmt), y.to(device)))
    return batches


def main():
    args = parse_args()
    device = setup()
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)  # the same initial weights everywhere (DDP broadcasts rank 0's anyway)
    model = getattr(skipfast.models, args.model)(num_classes=args.classes)
    if not args.local_bn:
        model = skipfast.convert_sync_batchnorm(model)
    model = model.to(device, memory_format=torch.channels_last if args.channels_last else torch.contiguous_format)
    ddp = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
    opt = torch.optim.SGD(ddp.parameters(), lr=args.lr, momentum=0.9, weight_decay=5e-4)
    batches = synthetic_batches(args, rank, device)

    losses = []
    start = None
    bar = tqdm(range(args.steps), desc=f"{args.model} x{world} {dist.get_backend()}", disable=rank != 0)
    for step in bar:
        if step == args.warmup:
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
        x, y = batches[step % len(batches)]
        loss = F.cross_entropy(ddp(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.detach())
        if rank == 0 and (step % 5 == 0 or step == args.steps - 1):
            bar.set_postfix(loss=f"{loss.item():.3f}")
    if device.type == "cuda":
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - start if start is not None else float("nan")
    timed = args.steps - args.warmup

    # The mean loss over ranks, first and last step (for the printout only).
    first_last = torch.stack([losses[0], losses[-1]]).float()
    dist.all_reduce(first_last)
    first_last /= world
    if rank == 0:
        images = timed * args.batch_size * world
        bn = "local BN" if args.local_bn else "SyncBatchNormAct2d"
        print(f"{args.model}, {world} ranks x {args.batch_size} images of {args.image_size}x{args.image_size}, "
              f"{dist.get_backend()} on {device.type}, {bn}: {images / elapsed:.1f} images/s "
              f"({timed} steps in {elapsed:.2f} s after {args.warmup} warm-up); "
              f"loss {first_last[0]:.3f} -> {first_last[1]:.3f}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
