"""Cell segmentation with ``skipfast.UNet`` on synthetic microscopy (the tutorial's
exercise 3).

The data are generated here: elliptical cells of random size, shape and orientation,
with textured cytoplasm and a brighter nucleus, some touching or overlapping their
neighbours, on a background with uneven illumination, blurred and noisy. The masks are
the union of the cells. A U-Net is trained with Dice + BCE; validation Dice and IoU are
printed after each epoch and a PNG of input / prediction / ground truth is saved.

    python examples/train_unet_cells.py            # default: reaches validation Dice >= 0.90
    python examples/train_unet_cells.py --quick    # tiny: seconds, prints its Dice
"""
from __future__ import annotations

import argparse
import math
import os
import time

import torch
import torch.nn.functional as F
from tqdm import tqdm

import skipfast


def _smooth_noise(n: int, size: int, cells: int, g: torch.Generator) -> torch.Tensor:
    """Low-frequency noise in [-1, 1]-ish, ``cells`` x ``cells`` control points per image."""
    coarse = torch.randn(n, 1, cells, cells, generator=g)
    return F.interpolate(coarse, size=(size, size), mode="bicubic", align_corners=False)[:, 0]


def _gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    r = max(1, int(math.ceil(2.5 * sigma)))
    k = torch.exp(-0.5 * (torch.arange(-r, r + 1, dtype=x.dtype) / sigma) ** 2)
    k = (k / k.sum()).view(1, 1, 1, -1)
    x = F.conv2d(F.pad(x, (r, r, 0, 0), mode="reflect"), k)
    return F.conv2d(F.pad(x, (0, 0, r, r), mode="reflect"), k.transpose(2, 3))


def synthetic_cells(n: int, size: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` images ``[n, 1, size, size]`` (normalised) and binary masks of the same shape."""
    g = torch.Generator().manual_seed(seed)

    def u(lo, hi, shape=()):
        return lo + (hi - lo) * torch.rand(shape, generator=g)

    ys, xs = torch.meshgrid(torch.arange(size, dtype=torch.float32), torch.arange(size, dtype=torch.float32),
                            indexing="ij")
    texture = _smooth_noise(n, size, max(size // 6, 2), g)
    images = torch.zeros(n, size, size)
    masks = torch.zeros(n, size, size)
    for i in range(n):
        k = int(torch.randint(4, 13, (), generator=g))
        a = u(0.06, 0.13, (k,)) * size  # semi-axes
        b = a * u(0.55, 1.0, (k,))
        theta = u(0, math.pi, (k,))
        cx, cy = u(0, size, (k,)), u(0, size, (k,))
        for j in range(1, k):  # about half the cells sit against an earlier one: touching or overlapping
            if torch.rand((), generator=g) < 0.5:
                p = int(torch.randint(0, j, (), generator=g))
                d = (a[p] + a[j]) * u(0.55, 1.0)
                ang = u(0, 2 * math.pi)
                cx[j], cy[j] = cx[p] + d * torch.cos(ang), cy[p] + d * torch.sin(ang)
        dx, dy = xs - cx.view(k, 1, 1), ys - cy.view(k, 1, 1)
        c, s = torch.cos(theta).view(k, 1, 1), torch.sin(theta).view(k, 1, 1)
        r2 = ((dx * c + dy * s) / a.view(k, 1, 1)) ** 2 + ((-dx * s + dy * c) / b.view(k, 1, 1)) ** 2
        inside = (r2 <= 1).float()
        nucleus = (r2 <= u(0.12, 0.25)).float()
        brightness = u(0.5, 1.0, (k,)).view(k, 1, 1)
        images[i] = (brightness * (inside * (1 + 0.35 * texture[i]) + 0.6 * nucleus)).sum(0)
        masks[i] = inside.amax(0)
    images = _gaussian_blur(images[:, None], sigma=1.0)[:, 0]
    # Uneven illumination: a random linear ramp times a vignette, plus background glow.
    ang = u(0, 2 * math.pi, (n, 1, 1))
    ramp = ((xs - size / 2) * torch.cos(ang) + (ys - size / 2) * torch.sin(ang)) / size
    vignette = 1 - 0.5 * (((xs - size / 2) ** 2 + (ys - size / 2) ** 2) / (size / 2) ** 2)
    illum = (1 + u(0.3, 0.8, (n, 1, 1)) * ramp) * vignette.clamp(min=0.3)
    images = images * illum + 0.1 * illum * (1 + 0.3 * _smooth_noise(n, size, 3, g))
    images = images + u(0.03, 0.09, (n, 1, 1)) * torch.randn(n, size, size, generator=g)
    images = (images - images.mean((1, 2), keepdim=True)) / images.std((1, 2), keepdim=True)
    return images[:, None], masks[:, None]


def dice_bce_loss(logits: torch.Tensor, target: torch.Tensor, eps: float = 1.0) -> torch.Tensor:
    p = torch.sigmoid(logits)
    inter = (p * target).sum((1, 2, 3))
    dice = (2 * inter + eps) / (p.sum((1, 2, 3)) + target.sum((1, 2, 3)) + eps)
    return F.binary_cross_entropy_with_logits(logits, target) + (1 - dice).mean()


@torch.no_grad()
def evaluate(model, x, y, batch: int) -> tuple[float, float, torch.Tensor]:
    """Dice and IoU over the whole set (pixels pooled), thresholding at probability 0.5."""
    model.eval()
    preds = torch.cat([model(x[i:i + batch]) > 0 for i in range(0, x.shape[0], batch)]).float()
    model.train()
    inter = (preds * y).sum().item()
    total = preds.sum().item() + y.sum().item()
    union = total - inter
    return 2 * inter / max(total, 1e-9), inter / max(union, 1e-9), preds


def save_examples(path: str, x, pred, y, k: int = 4) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    k = min(k, x.shape[0])
    fig, axes = plt.subplots(k, 3, figsize=(7, 2.3 * k), squeeze=False)
    for r in range(k):
        for c, (img, title) in enumerate(((x[r, 0], "input"), (pred[r, 0], "prediction"), (y[r, 0], "ground truth"))):
            axes[r, c].imshow(img.numpy(), cmap="gray")
            axes[r, c].set_axis_off()
            if r == 0:
                axes[r, c].set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv=None) -> dict[str, float]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny images, few steps (seconds); prints its Dice")
    p.add_argument("--epochs", type=int, help="default 5, quick 2")
    p.add_argument("--train", type=int, help="training images (default 640, quick 48)")
    p.add_argument("--val", type=int, help="validation images (default 128, quick 16)")
    p.add_argument("--size", type=int, help="image size (default 64, quick 32)")
    p.add_argument("--base-channels", type=int, help="U-Net width (default 16, quick 8)")
    p.add_argument("--depth", type=int, help="U-Net depth (default 3, quick 2)")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "out"))
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    q = args.quick
    epochs = args.epochs or (2 if q else 5)
    n_train, n_val = args.train or (48 if q else 640), args.val or (16 if q else 128)
    size = args.size or (32 if q else 64)
    base, depth = args.base_channels or (8 if q else 16), args.depth or (2 if q else 3)

    t_start = time.perf_counter()
    x_train, y_train = synthetic_cells(n_train, size, seed=args.seed)
    x_val, y_val = synthetic_cells(n_val, size, seed=args.seed + 1)
    print(f"synthetic cells: {n_train} training / {n_val} validation images 1x{size}x{size}, "
          f"foreground {y_train.mean().item():.0%}; data in {time.perf_counter() - t_start:.1f}s")
    torch.manual_seed(args.seed)
    model = skipfast.UNet(in_channels=1, out_channels=1, base_channels=base, depth=depth)
    print(f"UNet(base_channels={base}, depth={depth}): {sum(p.numel() for p in model.parameters()):,} parameters; "
          f"{epochs} epochs of batch {args.batch}, Adam lr {args.lr}, threads {torch.get_num_threads()}")
    steps_per_epoch = math.ceil(n_train / args.batch)
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lr, total_steps=epochs * steps_per_epoch)
    g = torch.Generator().manual_seed(args.seed)
    dice = iou = float("nan")
    for epoch in range(1, epochs + 1):
        order = torch.randperm(n_train, generator=g)
        bar = tqdm(range(steps_per_epoch), desc=f"epoch {epoch}/{epochs}", leave=False)
        running = 0.0
        for step in bar:
            idx = order[step * args.batch:(step + 1) * args.batch]
            xb, yb = x_train[idx], y_train[idx]
            if torch.rand((), generator=g) < 0.5:  # flips: free augmentation
                xb, yb = xb.flip(-1), yb.flip(-1)
            loss = dice_bce_loss(model(xb), yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            running += loss.item()
            bar.set_postfix(loss=f"{loss.item():.3f}")
        dice, iou, preds = evaluate(model, x_val, y_val, args.batch)
        print(f"epoch {epoch:>2}: train loss {running / steps_per_epoch:.4f}  val Dice {dice:.4f}  val IoU {iou:.4f}  "
              f"[{time.perf_counter() - t_start:.0f}s]", flush=True)
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "unet_cells.png")
    save_examples(path, x_val, preds, y_val)
    print(f"final validation Dice {dice:.4f}, IoU {iou:.4f} in {time.perf_counter() - t_start:.0f}s")
    print(f"examples: {path}")
    return {"dice": dice, "iou": iou}


if __name__ == "__main__":
    main()
