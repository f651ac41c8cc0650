"""skipfast.models against torchvision: same state_dict keys (strict load) and the same
outputs and gradients in eval and train mode."""
import pytest
import torch
import torchvision

import skipfast

MODELS = ["resnet18", "resnet34", "resnet50", "resnet101", "resnet152",
          "densenet121", "densenet161", "densenet169", "densenet201"]


def _pair(name, **kw):
    tv = getattr(torchvision.models, name)(**kw)
    sf = getattr(skipfast.models, name)(**kw)
    sf.load_state_dict(tv.state_dict(), strict=True)
    return tv, sf


def _close(a, b):
    scale = max(b.abs().max().item(), 1.0)
    assert (a - b).abs().max().item() <= 1e-5 * scale


# Gradients are compared for one model of each block type; the deeper variants repeat
# the same blocks, so for them outputs in eval and train mode are compared.
WITH_GRADS = {"resnet18", "resnet50", "densenet121"}


@pytest.mark.parametrize("name", MODELS)
def test_matches_torchvision(name):
    tv, sf = _pair(name, num_classes=7)
    x = torch.randn(2, 3, 32, 32)
    tv.eval(), sf.eval()
    with torch.no_grad():
        _close(sf(x), tv(x))
    tv.train(), sf.train()
    if name not in WITH_GRADS:
        with torch.no_grad():
            _close(sf(x), tv(x))
        for ba, bb in zip(sf.buffers(), tv.buffers()):
            _close(ba.double(), bb.double())
        return
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya, yb = sf(xa), tv(xb)
    _close(ya, yb)
    g = torch.randn_like(ya)
    ya.backward(g), yb.backward(g)
    _close(xa.grad, xb.grad)
    for (n, pa), (_, pb) in zip(sf.named_parameters(), tv.named_parameters()):
        _close(pa.grad, pb.grad)
    for (n, ba), (_, bb) in zip(sf.named_buffers(), tv.named_buffers()):
        _close(ba.double(), bb.double())


def test_state_dict_keys_identical():
    for name in ("resnet18", "resnet50", "densenet121"):
        tv, sf = _pair(name)
        assert list(sf.state_dict()) == list(tv.state_dict())


def test_zero_init_residual_and_num_classes():
    m = skipfast.models.resnet50(num_classes=5, zero_init_residual=True)
    assert m.fc.out_features == 5
    assert all((b.bn3.weight == 0).all() for layer in (m.layer1, m.layer4) for b in layer)


def test_densenet_bc_100():
    m = skipfast.models.densenet_bc_100()
    n_params = sum(p.numel() for p in m.parameters())
    assert 0.75e6 < n_params < 0.82e6  # DenseNet-BC (L=100, k=12): 0.8M in Huang et al.
    assert m(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_unet_builder():
    m = skipfast.models.unet(in_channels=1, out_channels=2, base_channels=4, depth=2)
    assert m(torch.randn(1, 1, 13, 17)).shape == (1, 2, 13, 17)
