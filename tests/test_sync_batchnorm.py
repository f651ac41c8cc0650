"""SyncBatchNormAct2d: on each rank's slice of a batch it must compute what one
``nn.BatchNorm2d`` + add + ReLU computes over the concatenated batch of all ranks
(outputs, input / residual / weight / bias gradients, running statistics), with gloo
processes spawned here (tests/distributed.py). The oracle runs in float64."""
from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

import skipfast
from skipfast.nn import SyncBatchNormAct2d, convert_sync_batchnorm

from distributed import run_ranks
from helpers import assert_low_precision_ok, saved_bytes

C, H, W = 3, 5, 4


def _config(sizes, dtype=torch.float64, activation="relu", residual=True, momentum=0.1, affine=True, track=True,
            channels_last=False, steps=3):
    return dict(sizes=sizes, dtype=dtype, activation=activation, residual=residual, momentum=momentum, affine=affine,
                track=track, channels_last=channels_last, steps=steps)


def _modules(cfg, seed):
    torch.manual_seed(seed)  # the same parameters on every rank
    kw = dict(eps=1e-5, momentum=cfg["momentum"], affine=cfg["affine"], track_running_stats=cfg["track"])
    ref = nn.BatchNorm2d(C, **kw).double()
    if cfg["affine"]:
        with torch.no_grad():
            ref.weight.uniform_(0.5, 1.5)
            ref.bias.normal_()
    sync = SyncBatchNormAct2d(C, activation=cfg["activation"], **kw).to(cfg["dtype"])
    sync.load_state_dict(ref.state_dict())
    return sync, ref


def _global_batch(cfg, step, seed):
    """The full batch of all ranks (same on every rank): x, residual, output gradient."""
    g = torch.Generator().manual_seed(1000 * seed + step)
    n = sum(cfg["sizes"])
    x = torch.randn(n, C, H, W, generator=g, dtype=torch.float64) * 2 + 0.5
    r = torch.randn(n, C, H, W, generator=g, dtype=torch.float64)
    dy = torch.randn(n, C, H, W, generator=g, dtype=torch.float64)
    return x, r, dy


def _reference_step(ref, cfg, x, r, dy):
    x = x.clone().requires_grad_()
    r = r.clone().requires_grad_() if cfg["residual"] else None
    y = ref(x)
    if r is not None:
        y = y + r
    if cfg["activation"] == "relu":
        y = torch.relu(y)
    (y * dy).sum().backward()
    return y.detach(), x.grad, None if r is None else r.grad


def _tol(dtype):
    return dict(rtol=1e-9, atol=1e-9) if dtype == torch.float64 else dict(rtol=1e-4, atol=1e-4)


def _close(actual, expected, dtype, what):
    torch.testing.assert_close(actual.double(), expected.double(), **_tol(dtype), msg=lambda m: f"{what}: {m}")


def _check_config(rank, world, cfg, seed):
    assert len(cfg["sizes"]) == world
    sync, ref = _modules(cfg, seed)
    lo = sum(cfg["sizes"][:rank])
    hi = lo + cfg["sizes"][rank]
    dtype = cfg["dtype"]
    for step in range(cfg["steps"]):
        x, r, dy = _global_batch(cfg, step, seed)
        y_ref, gx_ref, gr_ref = _reference_step(ref, cfg, x, r, dy)
        fmt = torch.channels_last if cfg["channels_last"] else torch.contiguous_format
        xl = x[lo:hi].to(dtype).contiguous(memory_format=fmt).requires_grad_()
        rl = r[lo:hi].to(dtype).contiguous(memory_format=fmt).requires_grad_() if cfg["residual"] else None
        y = sync(xl, rl)
        (y * dy[lo:hi].to(dtype)).sum().backward()
        what = f"rank {rank} step {step} {cfg}"
        assert y.dtype == dtype and y.shape == xl.shape
        if cfg["channels_last"] and xl.numel():
            assert y.is_contiguous(memory_format=torch.channels_last), what
        _close(y, y_ref[lo:hi], dtype, f"output, {what}")
        _close(xl.grad, gx_ref[lo:hi], dtype, f"grad x, {what}")
        if rl is not None:
            _close(rl.grad, gr_ref[lo:hi], dtype, f"grad residual, {what}")
        if cfg["affine"]:
            # Local sums (DDP averages them): their sum over ranks is the global gradient.
            for p, p_ref, name in ((sync.weight, ref.weight, "weight"), (sync.bias, ref.bias, "bias")):
                total = p.grad.clone()
                dist.all_reduce(total)
                _close(total, p_ref.grad, dtype, f"grad {name}, {what}")
                p.grad = None
                p_ref.grad = None
        if cfg["track"]:
            _close(sync.running_mean, ref.running_mean, dtype, f"running_mean, {what}")
            _close(sync.running_var, ref.running_var, dtype, f"running_var, {what}")
            assert int(sync.num_batches_tracked) == int(ref.num_batches_tracked) == step + 1
    # Eval: running statistics, no communication (only rank 0 runs it; a collective would hang).
    if rank == 0 and cfg["track"] and cfg["sizes"][0]:
        sync.eval()
        ref.eval()
        x, r, dy = _global_batch(cfg, 99, seed)
        y_ref, _, _ = _reference_step(ref, cfg, x, r, dy)
        y = sync(x.to(dtype), r.to(dtype) if cfg["residual"] else None)
        _close(y, y_ref, dtype, f"eval output {cfg}")


CONFIGS_3 = [
    _config([3, 0, 2]),  # an empty rank
    _config([1, 4, 2], activation=None, residual=False, momentum=None),  # plain BN, cumulative average
    _config([2, 1, 3], dtype=torch.float32, channels_last=True),
    _config([2, 2, 1], affine=False, track=False, steps=2),
]


def _check_configs(rank, world, configs):
    for i, cfg in enumerate(configs):
        _check_config(rank, world, cfg, seed=i)


def test_matches_batchnorm_over_global_batch_3_ranks(tmp_path):
    run_ranks(_check_configs, 3, tmp_path, CONFIGS_3)


def _expect(exc, match, fn):
    with pytest.raises(exc, match=match):
        fn()


def _check_two_ranks(rank, world):
    _check_configs(rank, world, [_config([2, 5]), _config([4, 1], activation=None, residual=True, momentum=None)])

    # float32 with a large mean against the spread: as accurate as eager float32 BN over
    # the global batch (the statistics travel in float64).
    g = torch.Generator().manual_seed(5)
    x = torch.randn(6, C, 8, 8, generator=g, dtype=torch.float64) + 100
    lo, hi = (0, 2) if rank == 0 else (2, 6)
    y = SyncBatchNormAct2d(C, activation=None)(x[lo:hi].float())
    expected = F.batch_norm(x, None, None, training=True)[lo:hi]
    eager = F.batch_norm(x.float(), None, None, training=True)[lo:hi]
    assert_low_precision_ok(y, eager, expected)

    # Bytes saved for backward: x, the per-channel weight / mean / invstd and a 1-bit mask.
    m = SyncBatchNormAct2d(C).double()
    x = torch.randn(4, C, H, W, dtype=torch.float64, requires_grad=True)
    r = torch.randn_like(x, requires_grad=True)
    nbytes, y = saved_bytes(m, x, r)
    assert nbytes == x.numel() * 8 + 3 * C * 8 + (x.numel() + 7) // 8, nbytes
    y.sum().backward()

    # Channel counts differ across ranks: a clear error on every rank, state unchanged.
    c = 3 if rank == 0 else 4
    m = SyncBatchNormAct2d(c)
    _expect(RuntimeError, r"SyncBatchNormAct2d: .*disagree on the number of channels: this rank has "
            f"{c}, the ranks range from 3 to 4", lambda: m(torch.randn(2, c, 3, 3)))
    assert int(m.num_batches_tracked) == 0 and torch.equal(m.running_mean, torch.zeros(c))

    # Statistics dtype differs across ranks.
    m = SyncBatchNormAct2d(C)
    dtype = torch.float32 if rank == 0 else torch.float64
    _expect(RuntimeError, "SyncBatchNormAct2d: .*disagree on the statistics dtype",
            lambda: m.to(dtype)(torch.randn(2, C, 3, 3, dtype=dtype)))
    assert int(m.num_batches_tracked) == 0

    # One value per channel over the whole group: torch's error, on every rank, state unchanged.
    m = SyncBatchNormAct2d(C)
    _expect(ValueError, "Expected more than 1 value per channel when training",
            lambda: m(torch.randn(1 - rank, C, 1, 1)))
    assert int(m.num_batches_tracked) == 0 and torch.equal(m.running_var, torch.ones(C))

    # Every rank empty: an empty output; like nn.BatchNorm2d, only num_batches_tracked moves.
    x = torch.randn(0, C, 3, 3, requires_grad=True)
    y = m(x)
    y.sum().backward()
    assert y.shape == x.shape and x.grad.shape == x.shape
    assert int(m.num_batches_tracked) == 1 and torch.equal(m.running_mean, torch.zeros(C))

    # The group still works after the rejected calls.
    _check_config(rank, world, _config([3, 2], steps=1), seed=7)


def test_two_ranks_saved_bytes_and_bad_inputs(tmp_path):
    run_ranks(_check_two_ranks, 2, tmp_path)


# ---- single process: no torch.distributed ----


def test_training_without_process_group_raises():
    assert not dist.is_initialized()
    m = SyncBatchNormAct2d(C)
    with pytest.raises(RuntimeError, match=r"SyncBatchNormAct2d: training needs an initialised torch.distributed"):
        m(torch.randn(2, C, 3, 3))
    assert int(m.num_batches_tracked) == 0 and torch.equal(m.running_mean, torch.zeros(C))


@pytest.mark.parametrize("activation", ["relu", None])
@pytest.mark.parametrize("track", [True, False])
def test_eval_needs_no_process_group(activation, track):
    m = SyncBatchNormAct2d(C, activation=activation, track_running_stats=track).double().eval()
    if track:
        with torch.no_grad():
            m.running_mean.normal_()
            m.running_var.uniform_(0.5, 2)
            m.weight.normal_()
    x = torch.randn(2, C, 3, 3, dtype=torch.float64, requires_grad=True)
    r = torch.randn_like(x, requires_grad=True)
    y = m(x, r)
    expected = F.batch_norm(x, m.running_mean, m.running_var, m.weight, m.bias, not track, 0.0, m.eps) + r
    expected = torch.relu(expected) if activation == "relu" else expected
    torch.testing.assert_close(y, expected)
    assert torch.autograd.gradcheck(lambda a, b: m(a, b), (x, r), fast_mode=True)


def test_state_dict_matches_sync_batchnorm():
    ours, torchs = SyncBatchNormAct2d(C), nn.SyncBatchNorm(C)
    assert list(ours.state_dict()) == list(torchs.state_dict())
    with torch.no_grad():
        torchs.running_mean.normal_()
        torchs.weight.normal_()
    ours.load_state_dict(torchs.state_dict(), strict=True)
    torchs.load_state_dict(ours.state_dict(), strict=True)
    torch.testing.assert_close(ours.running_mean, torchs.running_mean)
    assert isinstance(ours, nn.BatchNorm2d)
    assert "activation='relu'" in repr(ours)


def test_bad_inputs():
    with pytest.raises(ValueError, match="SyncBatchNormAct2d: activation must be 'relu' or None, got 'gelu'"):
        SyncBatchNormAct2d(C, activation="gelu")
    m = SyncBatchNormAct2d(C)
    x = torch.randn(2, C, 3, 3)
    cases = [
        (TypeError, "x must be a torch.Tensor, got list", ([1.0],)),
        (ValueError, r"x must be a 4-D tensor \[N, C, H, W\], got 3-D", (torch.randn(C, 3, 3),)),
        (TypeError, "x must be a floating-point tensor, got dtype torch.int64",
         (torch.ones(2, C, 3, 3, dtype=torch.long),)),
        (ValueError, r"x must have 3 channels \(dim 1\), got 4", (torch.randn(2, 4, 3, 3),)),
        (ValueError, r"residual must have the shape of x \(2, 3, 3, 3\), got \(2, 3, 3, 1\)",
         (x, torch.randn(2, C, 3, 1))),
        (TypeError, "residual must have the dtype of x", (x, x.double())),
        (TypeError, "residual must be a torch.Tensor or None, got float", (x, 1.0)),
    ]
    for training in (True, False):
        m.train(training)
        for exc, match, args in cases:
            with pytest.raises(exc, match="SyncBatchNormAct2d: " + match):
                m(*args)
    assert int(m.num_batches_tracked) == 0 and torch.equal(m.running_mean, torch.zeros(C))


class _BNWithActivation(nn.BatchNorm2d):
    """Stands for skipfast.nn.BatchNormAct2d: a BatchNorm2d subclass with `activation`."""

    def __init__(self, c, activation):
        super().__init__(c)
        self.activation = activation


def test_convert_sync_batchnorm_shares_parameters_and_buffers():
    model = skipfast.models.resnet18(num_classes=10).eval()
    before = {name: t for name, t in list(model.named_parameters()) + list(model.named_buffers())}
    bns = {name: m for name, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)}
    activations = {name: getattr(m, "activation", None) for name, m in bns.items()}
    assert set(activations.values()) == {"relu", None}  # BatchNormAct2d with and without ReLU
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = model(x)
    group = object()  # any process-group handle is only stored
    assert convert_sync_batchnorm(model, process_group=group) is model
    converted = {name: m for name, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)}
    assert converted.keys() == bns.keys() and len(bns) == 20
    for name, m in converted.items():
        assert type(m) is SyncBatchNormAct2d and m.activation == activations[name] and m.process_group is group
        assert not m.training
    after = {name: t for name, t in list(model.named_parameters()) + list(model.named_buffers())}
    assert after.keys() == before.keys()
    assert all(after[k] is before[k] for k in before)
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected)


def test_convert_keeps_activation_and_existing_sync_modules():
    act = _BNWithActivation(4, "relu")
    new = convert_sync_batchnorm(act)
    assert type(new) is SyncBatchNormAct2d and new.activation == "relu" and new.weight is act.weight
    already = SyncBatchNormAct2d(4)
    seq = nn.Sequential(already, nn.BatchNorm2d(4, momentum=None, eps=1e-3, affine=False))
    convert_sync_batchnorm(seq)
    assert seq[0] is already
    assert seq[1].momentum is None and seq[1].eps == 1e-3 and seq[1].weight is None and seq[1].activation is None
    with pytest.raises(ValueError, match="convert_sync_batchnorm: _BNWithActivation.activation must be 'relu' or None, "
                                         "got 'tanh'"):
        convert_sync_batchnorm(nn.Sequential(_BNWithActivation(4, "tanh")))
