"""Which implementation runs an op: the compiled extension, Triton, or the eager reference.

Priority, per device (first available wins):

- CPU: ``cpp`` (the compiled extension), else ``reference``.
- CUDA: the family's entry in ``CUDA_PRIORITY`` (``cpp`` before ``triton`` unless a
  family's measurements say otherwise), else ``reference``.

``SKIPFAST_BACKEND=reference|cpp|triton`` forces one for debugging; forcing a backend
that cannot run on the device raises an error that says why.
"""
from __future__ import annotations

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

# Families whose CUDA priority differs from the default are listed with the reason.
CUDA_PRIORITY: dict[str, tuple[str, ...]] = {
    # The Triton implicit GEMM writes its output once with bias, residual and ReLU
    # applied; the C++ path is cuDNN's convolution plus one more pass over the output.
    "conv": ("triton", "cpp"),
    # bn_act: the CUDA C++ kernels reduce channels_last tensors with coalesced row tiles and
    # warp-shuffle Welford merges and use 16-byte loads; the Triton reductions read
    # channels_last with a stride of C. Not yet measured on a GPU: revisit with figures.
    "bn_act": ("cpp", "triton"),
}
DEFAULT_CUDA_PRIORITY = ("cpp", "triton")


def has_extension() -> bool:
    return _C is not None


def has_cuda_kernels() -> bool:
    return _C is not None and bool(_C.with_cuda)


def has_triton() -> bool:
    return importlib.util.find_spec("triton") is not None


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
    forced = os.environ.get("SKIPFAST_BACKEND", "").strip()
    if forced:
        if forced not in BACKENDS:
            raise ValueError(f"SKIPFAST_BACKEND must be one of {BACKENDS}, got {forced!r}")
        why = _why_not(forced, device)
        if why is not None:
            raise RuntimeError(f"skipfast.{family}: SKIPFAST_BACKEND={forced} cannot run on {device}: {why}")
        return forced
    if device.type == "cuda":
        order = CUDA_PRIORITY.get(family, DEFAULT_CUDA_PRIORITY)
    else:
        order = ("cpp",)
    for backend in order:
        if _why_not(backend, device) is None:
            return backend
    return "reference"
