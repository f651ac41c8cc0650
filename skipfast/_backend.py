"""Which implementation runs an op: the compiled extension, Triton, or the eager reference.

Priority, per device (first available wins):

- CPU: ``cpp`` (the compiled extension), else ``reference``.
- CUDA: the family's entry in ``CUDA_PRIORITY`` (``cpp`` before ``triton`` unless a
  family's measurements say otherwise), else ``reference``.

``SKIPFAST_BACKEND=reference|cpp|triton`` forces one for debugging; forcing a backend
that cannot run on the device raises an error that says why.

Under torch.func transforms (grad, vmap, jvp, jacrev, ...) every family runs its eager
reference, forced or not: torch's own ops have every transform's rules (vmap batching rules,
the second derivatives of nested or outer differentiation), which the fused kernels' single
backward has not.
"""
from __future__ import annotations

import contextlib
import importlib.util
import os
import warnings

import torch

BACKENDS = ("reference", "cpp", "triton")

try:
    from . import _C  # noqa: F401  (loading it registers the C++ kernels)

    EXTENSION_ERROR: Exception | None = None
except ImportError as exc:  # pragma: no cover - exercised by the no-extension test
    _C = None
    EXTENSION_ERROR = exc
    warnings.warn(
        f"skipfast: the compiled extension skipfast._C could not be loaded ({exc}); "
        "running the eager PyTorch references. Build it with "
        "`pip install -e . --no-build-isolation`.",
        RuntimeWarning,
        stacklevel=2,
    )

# Families whose CUDA priority differs from the default are listed with the reason, from
# GPU kernel time per call (python -m skipfast.bench.kernels; the recorded run is named).
# conv: H100, benchmarks/results/2026-11-27-nvidia-h100-80gb/kernels.md, bf16.
CUDA_PRIORITY: dict[str, tuple[str, ...]] = {
    # conv: cuDNN + the C++ epilogue pass ran 1.12-1.17x eager conv + add + relu on the 3x3
    # and 7x7 ResNet shapes; the Triton implicit GEMM lost those (0.51x on 3x3 128->128, 0.30x
    # on the 7x7 stem) and won one 1x1 shape (256->64 at 56x56: 2.10x eager).
    "conv": ("cpp", "triton"),
    # bn_act: CUDA C++ is faster in training at every measured shape and layout (H200,
    # benchmarks/results/2026-11-27-nvidia-h200-b007d0e/kernels.md, e.g. [32, 64, 56, 56]
    # forward 35.8 vs 78.5 us NCHW, 41.6 vs 160.5 us channels_last). Triton's eval kernels are
    # faster in channels_last (23.0 vs 28.5 us), but its eval wall time per call was 361 us
    # against 164 us for CUDA C++ on an H100 (host cost of the triton_op route). One order per
    # family: CUDA C++ first.
    "bn_act": ("cpp", "triton"),
}
DEFAULT_CUDA_PRIORITY = ("cpp", "triton")


def has_extension() -> bool:
    return _C is not None


def has_cuda_kernels() -> bool:
    return _C is not None and bool(_C.with_cuda)


# Looked up once, at import: select() asks on every op call, also while torch.compile traces
# a model, and dynamo does not trace importlib's lookup (a graph break, an error under
# fullgraph=True).
_HAS_TRITON = importlib.util.find_spec("triton") is not None


def has_triton() -> bool:
    """Whether triton is installed."""
    return _HAS_TRITON


def _why_not(backend: str, device: torch.device) -> str | None:
    """None if `backend` can run on `device`, else the reason it cannot."""
    if backend == "reference":
        return None
    if backend == "cpp":
        if _C is None:
            return f"the compiled extension is not loaded ({EXTENSION_ERROR})"
        if device.type == "cuda" and not _C.with_cuda:
            return "the extension was built without CUDA kernels"
        if device.type not in ("cpu", "cuda"):
            return f"no C++ kernels for device type {device.type!r}"
        return None
    if backend == "triton":
        if not has_triton():
            return "triton is not installed"
        if device.type == "cuda":
            return None
        if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1":
            return None
        return f"Triton runs on CUDA devices (or on CPU with TRITON_INTERPRET=1), got {device.type!r}"
    return f"unknown backend {backend!r}; expected one of {BACKENDS}"


def select(family: str, device: torch.device) -> str:
    """The backend that runs `family` on `device`."""
    if not torch.compiler.is_compiling() and torch._C._are_functorch_transforms_active():
        return "reference"
    forced = os.environ.get("SKIPFAST_BACKEND", "").strip()
    if forced:
        if forced not in BACKENDS:
            raise ValueError(f"SKIPFAST_BACKEND must be one of {BACKENDS}, got {forced!r}")
        why = _why_not(forced, device)
        if why is not None:
            raise RuntimeError(f"skipfast.{family}: SKIPFAST_BACKEND={forced} cannot run on {device}: {why}")
        return forced
    if torch.compiler.is_compiling():  # traced once per graph; a memo read there would be a guard
        return _first_available(family, device)
    key = (family, device.type)
    backend = _CHOSEN.get(key)
    if backend is None:
        backend = _CHOSEN[key] = _first_available(family, device)
    return backend


def _first_available(family: str, device: torch.device) -> str:
    for backend in CUDA_PRIORITY.get(family, DEFAULT_CUDA_PRIORITY) if device.type == "cuda" else ("cpp",):
        if _why_not(backend, device) is None:
            return backend
    return "reference"


# select()'s unforced choices in eager mode, per (family, device type): they depend on
# nothing that changes while the process runs, and select() runs on every op call.
_CHOSEN: dict[tuple[str, str], str] = {}


@contextlib.contextmanager
def forced(name: str):
    """Within the block, every family runs on backend ``name`` (as ``SKIPFAST_BACKEND=name``)."""
    old = os.environ.get("SKIPFAST_BACKEND")
    os.environ["SKIPFAST_BACKEND"] = name
    try:
        yield
    finally:
        if old is None:
            del os.environ["SKIPFAST_BACKEND"]
        else:
            os.environ["SKIPFAST_BACKEND"] = old
