"""Drop-in modules: shapes, torchvision state_dict layout, bad-input errors."""
import subprocess
import sys

import pytest
import torch
import torchvision

from skipfast import BottleneckBlock, DenseBlock, DenseLayer, Highway, Highway2d, ResidualBlock, Transition, UNet


def test_residual_block_like_tutorial():
    blk = ResidualBlock(64)
    assert blk.downsample is None
    x = torch.randn(2, 64, 8, 8)
    assert blk(x).shape == x.shape


def test_residual_block_matches_basicblock():
    ds = torch.nn.Sequential(torch.nn.Conv2d(32, 64, 1, 2, bias=False), torch.nn.BatchNorm2d(64))
    tv = torchvision.models.resnet.BasicBlock(32, 64, 2, ds)
    sf = ResidualBlock(32, 64, stride=2)
    assert list(sf.state_dict()) == list(tv.state_dict())
    sf.load_state_dict(tv.state_dict(), strict=True)
    x = torch.randn(2, 32, 9, 9)
    torch.testing.assert_close(sf(x), tv(x))


def test_bottleneck_matches_torchvision():
    ds = torch.nn.Sequential(torch.nn.Conv2d(64, 128, 1, 2, bias=False), torch.nn.BatchNorm2d(128))
    tv = torchvision.models.resnet.Bottleneck(64, 32, 2, ds)
    sf = BottleneckBlock(64, 32, stride=2)
    assert list(sf.state_dict()) == list(tv.state_dict())
    sf.load_state_dict(tv.state_dict(), strict=True)
    x = torch.randn(2, 64, 9, 9)
    torch.testing.assert_close(sf(x), tv(x))
    assert BottleneckBlock(128, 32).downsample is None


@pytest.mark.parametrize("kind", ["basic", "bottleneck"])
def test_residual_blocks_with_pruned_modules_match_torchvision(kind):
    """A pruned BN, conv and shortcut conv are read through their own forward (the pruning
    pre-hook), also after their weights change: training outputs and gradients, and eval
    (where the BNs would otherwise be folded), match torchvision's block pruned alike."""
    from torch.nn.utils import prune
    torch.manual_seed(0)
    if kind == "basic":
        ds = torch.nn.Sequential(torch.nn.Conv2d(8, 16, 1, 2, bias=False), torch.nn.BatchNorm2d(16))
        tv, sf = torchvision.models.resnet.BasicBlock(8, 16, 2, ds), ResidualBlock(8, 16, stride=2)
    else:
        ds = torch.nn.Sequential(torch.nn.Conv2d(8, 16, 1, 2, bias=False), torch.nn.BatchNorm2d(16))
        tv, sf = torchvision.models.resnet.Bottleneck(8, 4, 2, ds), BottleneckBlock(8, 4, stride=2)
    sf.load_state_dict(tv.state_dict(), strict=True)
    for blk in (tv, sf):
        for name in ("bn1", "conv2", "downsample.0"):
            prune.l1_unstructured(blk.get_submodule(name), "weight", amount=0.5)
        with torch.no_grad():  # a training step's change, after the pre-hooks last ran
            for name in ("bn1", "conv2", "downsample.0"):
                blk.get_submodule(name).weight_orig.mul_(-1.5)
    x = torch.randn(2, 8, 7, 7)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya, yb = sf(xa), tv(xb)
    torch.testing.assert_close(ya, yb, rtol=1e-4, atol=1e-5)
    ya.square().sum().backward(), yb.square().sum().backward()
    torch.testing.assert_close(xa.grad, xb.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(sf.bn1.weight_orig.grad, tv.bn1.weight_orig.grad, rtol=1e-4, atol=1e-5)
    sf.eval(), tv.eval()
    with torch.no_grad():
        for blk in (tv, sf):
            blk.conv2.weight_orig.mul_(-1)
        torch.testing.assert_close(sf(x), tv(x), rtol=1e-4, atol=1e-5)


def test_dense_block_matches_torchvision():
    tv = torchvision.models.densenet._DenseBlock(3, 16, 4, 8, 0.0)
    sf = DenseBlock(16, 8, 3, bn_size=4)
    sf.load_state_dict(tv.state_dict(), strict=True)
    x = torch.randn(2, 16, 6, 6)
    torch.testing.assert_close(sf(x), tv(x))
    assert sf.out_channels == 16 + 3 * 8


def test_dense_block_with_pruned_modules_matches_torchvision():
    from torch.nn.utils import prune
    torch.manual_seed(0)
    tv = torchvision.models.densenet._DenseBlock(3, 16, 4, 8, 0.0)
    sf = DenseBlock(16, 8, 3, bn_size=4)
    sf.load_state_dict(tv.state_dict(), strict=True)
    for blk in (tv, sf):
        for name in ("denselayer2.norm1", "denselayer3.conv2"):
            prune.l1_unstructured(blk.get_submodule(name), "weight", amount=0.5)
            with torch.no_grad():
                blk.get_submodule(name).weight_orig.mul_(-1.5)
    x = torch.randn(2, 16, 6, 6)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya, yb = sf(xa), tv(xb)
    torch.testing.assert_close(ya, yb)
    ya.square().sum().backward(), yb.square().sum().backward()
    torch.testing.assert_close(xa.grad, xb.grad, rtol=1e-4, atol=1e-5)
    # the same through a preallocated block buffer (2 spare channels), after the pruned
    # weights changed (as a training step changes them)
    buf = torch.zeros(2, 42, 6, 6).to(memory_format=torch.channels_last)
    with torch.no_grad():
        for blk in (tv, sf):
            for name in ("denselayer2.norm1", "denselayer3.conv2"):
                blk.get_submodule(name).weight_orig.add_(0.25)
        yc, yd = sf(x, out=buf), tv(x)
    torch.testing.assert_close(yc, yd)
    assert yc.data_ptr() == buf.data_ptr() and (buf[:, 40:] == 0).all()
    for (name, a), b in zip(sf.named_buffers(), tv.buffers()):
        torch.testing.assert_close(a, b, msg=name)


def test_tutorial_dense_layer_and_transition():
    blk = DenseBlock(8, 4, 3)  # BN-ReLU-Conv3x3 layers
    assert blk(torch.randn(1, 8, 5, 5)).shape == (1, 20, 5, 5)
    assert Transition(20, 10)(torch.randn(1, 20, 6, 6)).shape == (1, 10, 3, 3)


@pytest.mark.parametrize("hw", [(16, 16), (13, 21), (1, 3)])
def test_unet_any_size(hw):
    m = UNet(in_channels=3, out_channels=2, base_channels=4, depth=3)
    assert m(torch.randn(2, 3, *hw)).shape == (2, 2, *hw)
    assert m.eval()(torch.randn(1, 3, *hw)).shape == (1, 2, *hw)


def test_highway_starts_carrying_input():
    hw = Highway(16)
    assert torch.all(hw.gate.bias == -2.0)
    x = torch.randn(4, 16)
    y = hw(x)
    t = torch.sigmoid(hw.gate(x))
    torch.testing.assert_close(y, torch.relu(hw.transform(x)) * t + x * (1 - t))
    h2 = Highway2d(6)
    assert h2(torch.randn(2, 6, 5, 5)).shape == (2, 6, 5, 5)


MODULES = [
    (lambda: ResidualBlock(8), 8),
    (lambda: BottleneckBlock(16, 4), 16),
    (lambda: DenseLayer(8, 4, bn_size=2), 8),
    (lambda: DenseBlock(8, 4, 2), 8),
    (lambda: Transition(8, 4), 8),
    (lambda: UNet(3, 1, 4, 2), 3),
    (lambda: Highway2d(8), 8),
]


@pytest.mark.parametrize("make, channels", MODULES)
def test_bad_inputs(make, channels):
    m = make()
    name = type(m).__name__
    with pytest.raises(ValueError, match=f"{name}: x must be a 4-D tensor .*got 3-D"):
        m(torch.randn(channels, 8, 8))
    with pytest.raises(ValueError, match=f"{name}: x must have {channels} channels, got {channels + 1}"):
        m(torch.randn(1, channels + 1, 8, 8))
    with pytest.raises(TypeError, match=f"{name}: x must be a floating-point tensor, got dtype torch.int64"):
        m(torch.ones(1, channels, 8, 8, dtype=torch.long))


def test_highway_bad_input():
    with pytest.raises(ValueError, match=r"Highway: x must be a tensor \[\.\.\., 16\]"):
        Highway(16)(torch.randn(4, 8))


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: ResidualBlock(0), "ResidualBlock: in_channels must be a positive integer, got 0"),
        (lambda: ResidualBlock(8, stride=0), "ResidualBlock: stride must be a positive integer"),
        (lambda: BottleneckBlock(8, -1), "BottleneckBlock: bottleneck_channels"),
        (lambda: DenseBlock(8, 0, 3), "DenseBlock: growth_rate must be a positive integer, got 0"),
        (lambda: DenseBlock(8, 4, 0), "DenseBlock: num_layers must be a positive integer, got 0"),
        (lambda: DenseLayer(8, 4, drop_rate=1.5), r"DenseLayer: drop_rate must be in \[0, 1\)"),
        (lambda: UNet(depth=0), "UNet: depth must be a positive integer"),
    ],
)
def test_bad_constructor_arguments(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_import_without_extension_warns_once_and_runs_references():
    code = r"""
import sys, warnings, importlib.abc
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name == "skipfast._C":
            raise ImportError("blocked for this test")
sys.meta_path.insert(0, Block())
with warnings.catch_warnings(record=True) as w:
    warnings.simplefilter("always")
    import skipfast
    import skipfast.ops
import torch
msgs = [str(x.message) for x in w if "compiled extension" in str(x.message)]
assert len(msgs) == 1, msgs
assert not skipfast._backend.has_extension()
x, r = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
torch.testing.assert_close(skipfast.ops.add_relu(x, r), torch.relu(x + r))
y = skipfast.ResidualBlock(3)(x)
assert y.shape == x.shape
print("ok")
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().endswith("ok")
