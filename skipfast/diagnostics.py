"""Training diagnostics for skip-connection networks."""
from __future__ import annotations

import torch
from torch import nn


def gradient_norms(model: nn.Module, loss: torch.Tensor, *, retain_graph: bool = False) -> dict[str, float]:
    """L2 norm of ``d loss / d p`` for every parameter ``p`` of ``model`` that requires grad,
    keyed by parameter name in ``model.named_parameters()`` order (so weights appear in
    layer order for sequential models). Parameters the loss does not reach get ``0.0``.

    Uses ``torch.autograd.grad``: the parameters' ``.grad`` fields are left untouched.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"gradient_norms: model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
        got = f"shape {tuple(loss.shape)}" if isinstance(loss, torch.Tensor) else type(loss).__name__
        raise ValueError(f"gradient_norms: loss must be a scalar tensor, got {got}")
    if not loss.requires_grad:
        raise ValueError("gradient_norms: loss does not require grad (computed under no_grad, or from a model "
                         "without trainable parameters?)")
    named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    if not named:
        raise ValueError(f"gradient_norms: {type(model).__name__} has no parameters that require grad")
    grads = torch.autograd.grad(loss.reshape(()), [p for _, p in named], retain_graph=retain_graph, allow_unused=True)
    return {name: (0.0 if g is None else g.detach().double().norm().item()) for (name, _), g in zip(named, grads)}
