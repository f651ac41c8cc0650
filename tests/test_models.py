"""skipfast.models against torchvision: same state_dict keys (strict load) and the same
outputs and gradients in eval and train mode."""
import copy

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


def _close(a, b, rel=1e-5):
    scale = max(b.abs().max().item(), 1.0)
    assert (a - b).abs().max().item() <= rel * scale


# Gradients are compared for one model of each block type; the deeper variants repeat
# the same blocks, so for them outputs and running stats in train mode are compared.
WITH_GRADS = {"resnet18", "resnet50", "densenet121"}


@pytest.mark.parametrize("name", MODELS)
def test_matches_torchvision(name):
    tv, sf = _pair(name, num_classes=7)
    x = torch.randn(2, 3, 32, 32)
    tv.eval(), sf.eval()
    with torch.no_grad():
        _close(sf(x), tv(x))
    sf64, tv64 = copy.deepcopy(sf).double(), copy.deepcopy(tv).double()
    tv.train(), sf.train(), tv64.train(), sf64.train()
    if name in WITH_GRADS:
        # Train mode in fp32, DESIGN.md's rule: skipfast's error against the float64 model
        # is at most twice torchvision's own fp32 error. (The input is larger than below:
        # batch statistics over 2 values per channel make fp32 rounding chaotic.)
        xl = torch.randn(4, 3, 64, 64)
        with torch.no_grad():
            ref = copy.deepcopy(tv64)(xl.double())
            err_sf = (sf(xl).double() - ref).abs().max().item()
            err_tv = (tv(xl).double() - ref).abs().max().item()
        assert err_sf <= 2 * err_tv + 1e-6 * ref.abs().max().item()
    # Train mode in float64: the same function (outputs, running stats, gradients). The
    # input is 64x64: at 32x32 the last BN sees 2 values per channel, which makes deep
    # networks ill-conditioned even in float64 (input gradients reach 1e8).
    x = torch.randn(2, 3, 64, 64)
    x64, xb = x.double().requires_grad_(), x.double().requires_grad_()
    y_tv = tv64(xb)  # each model runs once here: train mode updates the running stats
    ref = y_tv.detach()
    y_sf = sf64(x64)
    _close(y_sf, ref, rel=1e-8)
    for (n, ba), (_, bb) in zip(sf64.named_buffers(), tv64.named_buffers()):
        _close(ba.double(), bb.double(), rel=1e-8)
    if name not in WITH_GRADS:
        return
    g = torch.randn_like(y_sf)
    y_sf.backward(g), y_tv.backward(g)
    _close(x64.grad, xb.grad, rel=1e-8)
    for (n, pa), (_, pb) in zip(sf64.named_parameters(), tv64.named_parameters()):
        _close(pa.grad, pb.grad, rel=1e-8)


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
