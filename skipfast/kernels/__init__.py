"""Triton kernels and their launchers (no autograd here; see skipfast/ops)."""
