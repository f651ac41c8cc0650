"""Each example runs with --quick as a user would run it (a subprocess, one thread so a
busy machine does not oversubscribe its cores) and prints the metric it promises; the
checks are on those printed values, never on speed."""
import math
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_example(name, tmp_path, *extra):
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    env.pop("SKIPFAST_BACKEND", None)
    env.pop("TRITON_INTERPRET", None)
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "examples", name), "--quick", "--threads", "1", *extra],
                          capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, f"{name} failed:\n{proc.stdout}\n{proc.stderr[-3000:]}"
    return proc.stdout


def number(pattern, text):
    m = re.search(pattern, text)
    assert m, f"{pattern!r} not found in:\n{text}"
    return float(m.group(1).replace(",", ""))


def test_gradient_flow(tmp_path):
    out = run_example("gradient_flow.py", tmp_path, "--out", str(tmp_path))
    ratio = {name: number(rf"{re.escape(name)}\s+gradient norm first/last layer: (\S+)", out)
             for name in ("plain", "plain + BN", "residual")}
    assert ratio["plain"] < 1e-3, out  # early layers orders of magnitude below the late ones
    assert 1e-2 <= ratio["residual"] <= 1e2, out  # within one to two orders
    assert ratio["plain + BN"] > 1, out  # BatchNorm turns vanishing into exploding
    assert (tmp_path / "gradient_flow.png").stat().st_size > 0


def test_degradation(tmp_path):
    out = run_example("degradation.py", tmp_path, "--out", str(tmp_path))
    losses = {name: number(rf"{name}\s+final training loss (\S+) \(eval-mode pass over the 1024 training", out)
              for name in ("plain-20", "plain-56", "residual-20", "residual-56")}
    for name, v in losses.items():  # no upper bound: an untrained plain-56 in eval mode can sit far above ln(10)
        assert math.isfinite(v) and v > 0, (name, v, out)
    m = re.search(r"plain: 56 layers (worse|NOT worse) than 20 \((\S+) vs (\S+)\); "
                  r"residual: 56 layers (at or below|ABOVE) 20 \((\S+) vs (\S+)\)", out)
    assert m, out  # the verdict line: the four losses it compares, and verdicts that follow from them
    p56, p20, r56, r20 = (losses[n] for n in ("plain-56", "plain-20", "residual-56", "residual-20"))
    assert [float(v) for v in m.group(2, 3, 5, 6)] == [p56, p20, r56, r20], out
    assert p56 == p20 or (m[1] == "worse") == (p56 > p20), out  # equal when printed: either verdict may hold
    assert r56 == r20 or (m[4] == "at or below") == (r56 < r20), out
    assert (tmp_path / "degradation.png").stat().st_size > 0


def test_resnet_variants(tmp_path):
    out = run_example("resnet_variants.py", tmp_path)
    assert number(r"ResNet-50\s+([\d,]+)", out) == 25_557_032
    assert number(r"ResNet-101\s+([\d,]+)", out) == 44_549_160
    assert "25.6M" in out and "44.5M" in out
    assert number(r"ResNet-50\s+[\d,]+\s+\S+\s+([\d.]+)G", out) == pytest.approx(4.09, abs=0.01)
    assert number(r"ResNet-101\s+[\d,]+\s+\S+\s+([\d.]+)G", out) == pytest.approx(7.80, abs=0.01)
    for name in ("ResNet-50", "ResNet-101"):  # the timing row: two positive times and their ratio
        m = re.search(rf"^{name}\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)x$", out, re.M)
        assert m and all(float(v) > 0 for v in m.groups()), out


def test_train_unet_cells(tmp_path):
    out = run_example("train_unet_cells.py", tmp_path, "--out", str(tmp_path))
    dice = number(r"final validation Dice (\S+)", out)
    iou = number(r"final validation Dice \S+, IoU (\S+)", out)
    assert 0 <= iou <= dice <= 1, out
    assert len(re.findall(r"^epoch\s+\d+: train loss [\d.]+", out, re.M)) == 2, out
    assert (tmp_path / "unet_cells.png").stat().st_size > 0


def test_gradient_norms_matches_backward_and_leaves_grad_alone():
    import torch

    from skipfast.diagnostics import gradient_norms

    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU(), torch.nn.Linear(3, 2), torch.nn.Linear(5, 5))
    x = torch.randn(6, 4)
    norms = gradient_norms(model, model[:3](x).square().sum(), retain_graph=False)
    assert list(norms) == [n for n, _ in model.named_parameters()]
    assert all(p.grad is None for p in model.parameters())
    model[:3](x).square().sum().backward()
    for name, p in model.named_parameters():
        expected = 0.0 if p.grad is None else p.grad.norm().item()
        assert norms[name] == pytest.approx(expected, rel=1e-6), name
    assert norms["3.weight"] == 0.0  # not reached by the loss
    with pytest.raises(ValueError, match="gradient_norms: loss must be a scalar tensor, got shape"):
        gradient_norms(model, model[:3](x))
    with pytest.raises(ValueError, match="gradient_norms: loss does not require grad"):
        with torch.no_grad():
            gradient_norms(model, model[:3](x).sum())
    with pytest.raises(TypeError, match="gradient_norms: model must be a torch.nn.Module"):
        gradient_norms(lambda t: t, torch.ones((), requires_grad=True))
