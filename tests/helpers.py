"""Shared test oracles: the fp64 reference and DESIGN.md's tolerance rules."""
from __future__ import annotations

import torch


def assert_close_fp32(actual, expected, *, rtol=1e-5, atol=1e-5):
    torch.testing.assert_close(actual.double(), expected.double(), rtol=rtol, atol=atol)


def assert_low_precision_ok(actual, eager_same_dtype, reference_fp64, *, slack=2.0, floor=None):
    """The relative rule: the kernel's error against the fp64 reference is at most
    `slack` x the error of eager PyTorch run in the same dtype (plus a floor of one
    ulp-scale so exact eager results do not demand exact kernels)."""
    ref = reference_fp64.double()
    err = (actual.double() - ref).abs().max().item()
    eager_err = (eager_same_dtype.double() - ref).abs().max().item()
    if floor is None:
        floor = torch.finfo(actual.dtype).eps * ref.abs().max().item()
    assert err <= slack * eager_err + floor, f"error {err:.3g} > {slack} x eager's {eager_err:.3g} + {floor:.3g}"


def saved_bytes(fn, *args, **kwargs):
    """Bytes of tensors saved for backward while running fn, each storage counted once."""
    seen: dict[int, int] = {}

    def pack(t):
        if isinstance(t, torch.Tensor):
            st = t.untyped_storage()
            seen[st.data_ptr()] = max(seen.get(st.data_ptr(), 0), st.nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn(*args, **kwargs)
    return sum(seen.values()), out


def backend(name):
    """Force a backend within a ``with`` block (``skipfast._backend.forced``)."""
    from skipfast import _backend

    return _backend.forced(name)
