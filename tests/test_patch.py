"""skipfast.patch on torchvision models and on users' own models."""
import copy

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn
from torch.nn.utils import parametrize, prune

import skipfast
from skipfast.patch import ConvBNAct


class MyBlock(nn.Module):
    """A user's block: its own class names, functional ReLU, `out = out + identity`."""

    def __init__(self, c):
        super().__init__()
        self.a = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.na = nn.BatchNorm2d(c)
        self.b = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.nb = nn.BatchNorm2d(c)

    def forward(self, x):
        out = F.relu(self.na(self.a(x)))
        out = self.nb(self.b(out))
        out = out + x
        return torch.relu(out)


class MyNet(nn.Module):
    def __init__(self, c=8):
        super().__init__()
        self.stem = nn.Conv2d(3, c, 3, padding=1)
        self.bn = nn.BatchNorm2d(c)
        self.act = nn.ReLU(inplace=True)
        self.blocks = nn.Sequential(MyBlock(c), MyBlock(c))
        self.post = nn.BatchNorm2d(c)  # BN -> iadd -> relu method
        self.head = nn.Linear(c, 4)

    def forward(self, x):
        x = self.act(self.bn(self.stem(x)))
        x = self.blocks(x)
        y = self.post(x)
        y += x
        y = y.relu()
        return self.head(y.mean((2, 3)))


class Untraceable(nn.Module):
    def __init__(self):
        super().__init__()
        self.block = torchvision.models.resnet.BasicBlock(8, 8)

    def forward(self, x):
        if x.sum() > 0:  # data-dependent control flow: fx cannot trace this
            x = self.block(x)
        return x


def _randomize_bn(model):
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 1.5)
                m.weight.normal_(1, 0.2)
                m.bias.normal_(0, 0.2)


def _check_equivalent(orig, patched, x):
    orig.eval(), patched.eval()
    with torch.no_grad():
        torch.testing.assert_close(patched(x), orig(x), rtol=1e-4, atol=1e-4)
    orig.train(), patched.train()
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya, yb = patched(xa), orig(xb)
    torch.testing.assert_close(ya, yb, rtol=1e-4, atol=1e-4)
    ya.square().sum().backward()
    yb.square().sum().backward()
    torch.testing.assert_close(xa.grad, xb.grad, rtol=1e-4, atol=1e-4)


def test_user_model_fx_path():
    torch.manual_seed(0)
    orig = MyNet()
    _randomize_bn(orig)
    ref = copy.deepcopy(orig)
    patched, rep = skipfast.patch(orig, report=True)
    assert rep.path == "fx"
    fused = [m for m in patched.modules() if isinstance(m, ConvBNAct)]
    # stem conv-bn-relu; per block: conv-bn-relu and conv-bn-add-relu; post bn-iadd-relu
    assert len(fused) == 6 and len(rep.replaced) == 6, rep
    assert sum(m.conv is None for m in fused) == 1
    assert rep.untouched == []
    x = torch.randn(2, 3, 9, 9)
    _check_equivalent(ref, patched, x)
    # the parameters are shared with the original model, the keys are the same
    assert patched.stem.weight is orig.stem.weight
    assert list(patched.state_dict()) == list(orig.state_dict())
    orig.load_state_dict(patched.state_dict())
    patched.load_state_dict(orig.state_dict())


def test_torchvision_resnet18_fx_path_channels_last():
    torch.manual_seed(0)
    orig = torchvision.models.resnet18(num_classes=10)
    _randomize_bn(orig)
    orig = orig.to(memory_format=torch.channels_last)
    ref = copy.deepcopy(orig)
    patched, rep = skipfast.patch(orig, report=True)
    assert rep.path == "fx"
    # stem + 8 blocks x 2 + 3 downsample conv-bn
    assert len(rep.replaced) == 1 + 16 + 3
    x = torch.randn(2, 3, 32, 32).to(memory_format=torch.channels_last)
    orig.eval(), ref.eval()
    with torch.no_grad():
        torch.testing.assert_close(patched(x), ref(x), rtol=1e-4, atol=1e-4)
    # Training: layer4's BN normalizes 2 values per channel here, which amplifies fp32
    # rounding differences; in float64 the patched model must agree to rounding.
    patched.double(), ref.double()
    _check_equivalent(ref, patched, x.double())


def test_untraceable_model_falls_back_to_class_swap():
    torch.manual_seed(0)
    orig = Untraceable()
    _randomize_bn(orig)
    ref = copy.deepcopy(orig)
    patched, rep = skipfast.patch(orig, report=True)
    assert rep.path == "classes" and "fx could not trace" in rep.reason
    assert patched is orig and isinstance(orig.block, skipfast.ResidualBlock)
    x = torch.randn(2, 8, 6, 6).abs()
    _check_equivalent(ref, patched, x)
    assert list(orig.state_dict()) == list(ref.state_dict())


def test_nothing_recognised_returns_model_unchanged(caplog):
    model = nn.Sequential(nn.Linear(4, 4), nn.Tanh())
    with caplog.at_level("WARNING", logger="skipfast"):
        out, rep = skipfast.patch(model, report=True)
    assert out is model and rep.path == "none" and rep.replaced == []
    assert "nothing recognised" in caplog.text


def test_not_a_module():
    with pytest.raises(TypeError, match="skipfast.patch: model must be an nn.Module, got str"):
        skipfast.patch("resnet")


def test_torchvision_densenet_swaps_dense_blocks():
    torch.manual_seed(0)
    orig = torchvision.models.DenseNet(growth_rate=8, block_config=(2, 3), num_init_features=16, num_classes=5)
    _randomize_bn(orig)
    ref = copy.deepcopy(orig)
    conv = orig.features.denseblock1.denselayer2.conv1
    patched, rep = skipfast.patch(orig, report=True)
    assert rep.path == "fx"
    assert isinstance(orig.features.denseblock1, skipfast.DenseBlock)
    assert patched.features.denseblock1.denselayer2.conv1 is conv  # the model's own modules
    assert any("denseblock2 (_DenseBlock -> DenseBlock)" in r for r in rep.replaced), rep
    x = torch.randn(2, 3, 32, 32)
    orig.eval(), ref.eval()
    with torch.no_grad():
        torch.testing.assert_close(patched(x), ref(x), rtol=1e-4, atol=1e-4)
    patched.double(), ref.double()
    _check_equivalent(ref, patched, x.double())
    assert list(patched.state_dict()) == list(ref.state_dict())


def _prune_bn(bn):
    prune.l1_unstructured(bn, "weight", amount=0.5)


class _Doubled(nn.Module):
    def forward(self, w):
        return 2 * w


def test_pruned_or_parametrized_modules_run_as_themselves():
    """A BN pruned before patching stays unfused (reported untouched); one pruned or
    parametrized after patching runs as itself inside the fused chain; a conv pruned after
    patching is called, not folded from stale tensors. Outputs and gradients match the
    model run eagerly."""
    torch.manual_seed(0)
    orig = MyNet()
    _randomize_bn(orig)
    _prune_bn(orig.blocks[0].na)
    patched, rep = skipfast.patch(orig, report=True)
    assert rep.path == "fx" and len(rep.replaced) == 5
    assert any(u.startswith("blocks.0.na ") for u in rep.untouched), rep
    x = torch.randn(2, 3, 9, 9)
    _check_equivalent(orig, patched, x)
    _prune_bn(orig.blocks[1].nb)
    parametrize.register_parametrization(orig.post, "weight", _Doubled())
    prune.l1_unstructured(orig.blocks[0].b, "weight", amount=0.5)
    _check_equivalent(orig, patched, x)
    with torch.no_grad():  # the pruned conv's weight changes: nothing may read it stale
        orig.blocks[0].b.weight_orig.mul_(-1)
    orig.eval(), patched.eval()
    with torch.no_grad():
        torch.testing.assert_close(patched(x), orig(x), rtol=1e-4, atol=1e-4)


def test_class_swap_leaves_blocks_with_pruned_modules():
    torch.manual_seed(0)
    orig = Untraceable()
    _randomize_bn(orig)
    ref = copy.deepcopy(orig)
    _prune_bn(orig.block.bn2), _prune_bn(ref.block.bn2)
    patched, rep = skipfast.patch(orig, report=True)
    assert rep.path == "none" and type(patched.block) is torchvision.models.resnet.BasicBlock
    x = torch.rand(2, 8, 6, 6)
    _check_equivalent(ref, patched, x)


class _OddResidual(nn.Module):
    """conv -> BN -> + r -> ReLU where r broadcasts (a per-channel tensor) or has another
    dtype: torch broadcasts and promotes; the fused ops take neither."""

    def __init__(self, kind):
        super().__init__()
        self.kind = kind
        self.conv = nn.Conv2d(4, 4, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(4)
        self.bn2 = nn.BatchNorm2d(4)
        self.register_buffer("shift", torch.randn(4, 1, 1))

    def forward(self, x):
        r = self.shift if self.kind == "broadcast" else x.double()
        y = self.bn(self.conv(x)) + r  # conv + BN + add + ReLU
        z = self.bn2(x)
        z += r  # BN + in-place add + ReLU, no conv: z keeps its dtype
        return torch.relu(y) + torch.relu(z)


@pytest.mark.parametrize("kind", ["broadcast", "dtype"])
def test_residual_that_broadcasts_or_promotes_runs_the_models_add(kind):
    torch.manual_seed(0)
    orig = _OddResidual(kind)
    _randomize_bn(orig)
    ref = copy.deepcopy(orig)
    patched, rep = skipfast.patch(orig, report=True)
    assert rep.path == "fx" and len(rep.replaced) == 2, rep
    x = torch.randn(2, 4, 5, 5)
    for training in (False, True):
        ref.train(training), patched.train(training)
        want, got = ref(x), patched(x)
        assert got.dtype == want.dtype
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    bufs = dict(patched.named_buffers())
    for name, buf in ref.named_buffers():
        if name.startswith("bn"):  # running statistics updated alike
            torch.testing.assert_close(bufs[name], buf)


class _AddIntoResidual(nn.Module):
    """`r.add_(bn(conv(x)))` writes into r, which the model also returns under another name.
    (fx records `r += ...` on a traced tensor as an out-of-place add; a method call stays in
    place.)"""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        r = x * 2
        alias = r
        r.add_(self.bn(self.conv(x)))
        return torch.relu(r), alias


def test_inplace_add_into_the_residual_is_not_fused_away():
    torch.manual_seed(0)
    orig = _AddIntoResidual()
    _randomize_bn(orig)
    ref = copy.deepcopy(orig)
    patched, rep = skipfast.patch(orig, report=True)
    assert rep.replaced == ["conv -> bn"], rep  # the add and the ReLU stay the model's
    x = torch.randn(2, 4, 5, 5)
    for training in (False, True):
        ref.train(training), patched.train(training)
        for got, want in zip(patched(x), ref(x)):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
