"""DistributedDataParallel with skipfast models (resnet18, densenet121, unet): two gloo
ranks with unequal batches, BN converted with ``skipfast.convert_sync_batchnorm``, take
identical steps on every rank and match one process training on the concatenated batch
(tests/distributed.py starts the ranks)."""
from __future__ import annotations

import copy

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

import skipfast

from distributed import run_ranks

SIZES = (3, 5)  # per-rank batch sizes
STEPS = 2


def _flat(model):
    return torch.cat([t.detach().reshape(-1).double() for t in list(model.parameters()) + list(model.buffers())])


def _sgd(model):
    return torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)


BUILDERS = {
    "resnet18": lambda: skipfast.models.resnet18(num_classes=10),
    "densenet121": lambda: skipfast.models.densenet121(num_classes=10),
    "unet": lambda: skipfast.models.unet(3, 2, base_channels=8, depth=2),
}


def _loss(out, y, reduction):
    """Cross-entropy for classifiers; for the U-Net (2 output channels), per-pixel cross-entropy
    against labels derived from y, so both are sums over samples."""
    if out.dim() == 4:
        y = y.view(-1, 1, 1).expand(-1, out.shape[2], out.shape[3]) % 2
        per_sample = F.cross_entropy(out, y, reduction="none").mean((1, 2))
        return per_sample.sum() if reduction == "sum" else per_sample.mean()
    return F.cross_entropy(out, y, reduction=reduction)


def _check_model(rank, world, name):
    torch.manual_seed(0)
    model = BUILDERS[name]().double()
    reference = copy.deepcopy(model) if rank == 0 else None
    initial = _flat(model)
    g = torch.Generator().manual_seed(1)
    n = sum(SIZES)
    data = [(torch.randn(n, 3, 32, 32, generator=g, dtype=torch.float64), torch.randint(0, 10, (n,), generator=g))
            for _ in range(STEPS)]
    lo, hi = sum(SIZES[:rank]), sum(SIZES[:rank + 1])

    ddp = DDP(skipfast.convert_sync_batchnorm(model))  # find_unused_parameters=False: every parameter is used
    assert sum(isinstance(m, skipfast.SyncBatchNormAct2d) for m in ddp.modules()) > 0
    opt = _sgd(ddp)
    for step, (x, y) in enumerate(data):
        # DDP averages gradients over ranks: scale each rank's summed loss so the
        # average is the gradient of the mean loss over the global batch.
        loss = _loss(ddp(x[lo:hi]), y[lo:hi], "sum") * world / n
        loss.backward()
        opt.step()
        opt.zero_grad()
        mine = _flat(model)
        rank0 = mine.clone()
        dist.broadcast(rank0, src=0)
        assert torch.equal(mine, rank0), f"{name}: rank {rank} differs from rank 0 after step {step}"

    if rank == 0:
        opt = _sgd(reference)
        for x, y in data:
            _loss(reference(x), y, "mean").backward()
            opt.step()
            opt.zero_grad()
        torch.testing.assert_close(_flat(model), _flat(reference), rtol=1e-7, atol=1e-9,
                                   msg=lambda m: f"{name}: DDP differs from one process on the whole batch: {m}")
        assert (_flat(model) - initial).abs().max() > 1e-3, f"{name}: the steps changed nothing"


def _check_models(rank, world):
    for name in BUILDERS:
        _check_model(rank, world, name)


def test_ddp_resnet18_densenet121_unet_match_single_process(tmp_path):
    run_ranks(_check_models, 2, tmp_path, timeout=240)
