"""The benchmark harness itself (fast, CPU): the report runs and writes its files, the
correctness gate flags wrong providers, --compare works, the GPU suite's CPU-checkable
parts (argument handling, summary writer) behave."""
from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torchvision
from torch import nn

import skipfast
from skipfast.bench import __main__ as cli
from skipfast.bench import core, gpu_summary, report
from skipfast.bench.cases import select_modes, standard_cases

ROOT = Path(__file__).resolve().parents[1]
SUITE = ROOT / "benchmarks" / "gpu_suite.sh"
PNG = b"\x89PNG\r\n\x1a\n"


def tiny_cases():
    return [
        core.Case("tinyblock", lambda: torchvision.models.resnet.BasicBlock(8, 8), lambda: skipfast.ResidualBlock(8),
                  [(2, 8, 6, 6)], ("fwd+bwd", "infer")),
        core.Case("tinyop", lambda: nn.ReLU(), lambda: nn.ReLU(), [(4, 8, 5, 5)], ("fwd", "bwd", "infer")),
    ]


class _ScaleGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, g):
        return g * 1.5


def wrong_forward(case, ref):
    """Output off by 1% (hooks keep the parameter names the gate compares by)."""
    m = copy.deepcopy(ref)
    m.register_forward_hook(lambda mod, args, out: out * 1.01)
    return m


def wrong_backward(case, ref):
    """Right forward, input gradient off by 50%."""
    m = copy.deepcopy(ref)
    m.register_forward_pre_hook(lambda mod, args: tuple(_ScaleGrad.apply(a) for a in args))
    return m


def broken(case, ref):
    raise RuntimeError("no kernel for this input")


def _run(tmp_path, *args, **kw):
    return cli.main(["--out", str(tmp_path), "--no-progress", "--reps", "3", "--warmup", "1", *args], **kw)


def test_quick_report_writes_json_csv_png(tmp_path, capsys):
    doc = _run(tmp_path, "--quick", case_list=tiny_cases())
    out = capsys.readouterr().out
    assert "case" in out and "tinyblock" in out and "torch.compile is not in --quick" in out
    for name in ("bench.json", "bench.csv", "speedup.png", "memory.png"):
        assert (tmp_path / name).stat().st_size > 0
    assert (tmp_path / "speedup.png").read_bytes()[:8] == PNG
    m = doc["machine"]
    for key in ("cpu", "torch", "triton", "date", "git_commit", "device"):
        assert key in m
    assert m["torch"] == torch.__version__
    res = doc["results"]
    assert {r["provider"] for r in res} == {"eager", "eager-cl", "skipfast"}
    assert len(res) == 3 * (2 + 3)  # providers x (tinyblock modes + tinyop modes)
    for r in res:
        assert r["status"] == "ok", r
        assert r["reps"] == 3 and 0 < r["min_ms"] <= r["median_ms"] <= r["max_ms"]
        assert r["peak_bytes"] is not None and r["peak_bytes"] > 0
    eager = [r for r in res if r["provider"] == "eager"]
    assert all(r["speedup"] == 1.0 and r["mem_ratio"] == 1.0 for r in eager)
    # training modes record bytes saved for backward; inference does not
    assert all((r["saved_bytes"] is None) == (r["mode"] == "infer") for r in res)
    rows = (tmp_path / "bench.csv").read_text().splitlines()
    assert rows[0].startswith("case,provider,mode,status,median_ms") and len(rows) == 1 + len(res)


def test_wrong_and_failing_providers_are_reported_not_timed(tmp_path, capsys):
    extra = {
        "wrong-fwd": core.Provider("wrong-fwd", wrong_forward),
        "wrong-bwd": core.Provider("wrong-bwd", wrong_backward),
        "broken": core.Provider("broken", broken),
    }
    doc = _run(tmp_path, "--providers", "eager,wrong-fwd,wrong-bwd,broken,skipfast", "--cases", "tinyblock",
               case_list=tiny_cases(), extra_providers=extra)
    by = {(r["provider"], r["mode"]): r for r in doc["results"]}
    for mode in ("fwd+bwd", "infer"):
        assert by[("eager", mode)]["status"] == "ok"
        assert by[("skipfast", mode)]["status"] == "ok"
        for p, status in (("wrong-fwd", "WRONG"), ("wrong-bwd", "WRONG"), ("broken", "ERROR")):
            r = by[(p, mode)]
            assert r["status"] == status, r
            assert r["median_ms"] is None and r["reps"] == 0 and r["speedup"] is None
    assert by[("wrong-fwd", "infer")]["max_err"] == pytest.approx(0.01, rel=1e-3)
    assert "grad input0" in by[("wrong-bwd", "infer")]["note"]
    assert "no kernel" in by[("broken", "infer")]["note"]
    out = capsys.readouterr().out
    assert "WRONG" in out and "ERROR" in out


def test_check_rule_float64_oracle():
    """Past the plain tolerance, a provider passes only if it is as close to float64 as
    eager is (within slack), or within tolerance of float64."""
    s = core.Settings(device=torch.device("cpu"))
    truth = torch.linspace(-1, 1, 101, dtype=torch.float64)

    class Fixed:
        def get(self):
            return {"train": {"t": truth}}

    eager = {"train": {"t": truth + 0.01}}  # ill-conditioned: eager itself is off by 1e-2
    near = {"train": {"t": truth - 0.02}}  # 3e-2 from eager, as far from truth as eager x2
    far = {"train": {"t": truth + 0.5}}
    assert core.check_provider(near, eager, Fixed(), ["train"], s)[0]
    assert not core.check_provider(far, eager, Fixed(), ["train"], s)[0]
    ok, err, where = core.check_provider(eager, eager, Fixed(), ["train"], s)
    assert ok and err == 0.0
    assert core.compare({"t": truth[:5]}, {"t": truth})[0] == float("inf")
    assert core.compare({"t": truth * float("nan")}, {"t": truth})[0] == float("inf")


def test_memory_measures():
    n = 1 << 18  # 1 MiB of float32
    peak = core.cpu_peak_bytes(lambda: torch.ones(n).add_(1).sum())
    assert peak >= 4 * n
    lin = nn.Linear(64, 64)
    runner = core._Runner(nn.Sequential(lin, nn.Sigmoid()), [(torch.randn(32, 64),)], None)
    # Linear saves its input (weight excluded, a parameter); sigmoid saves its output
    assert core.saved_bytes(runner) == 2 * 32 * 64 * 4


def test_compare_against_earlier_json(tmp_path, capsys):
    first = _run(tmp_path / "a", "--cases", "tinyop", "--providers", "eager,skipfast", case_list=tiny_cases())
    second = _run(tmp_path / "b", "--cases", "tinyop", "--providers", "eager,skipfast",
                  "--compare", str(tmp_path / "a" / "bench.json"), case_list=tiny_cases())
    rows = second["compare"]
    assert len(rows) == len(first["results"]) == 2 * 3
    for row in rows:
        assert row["time_ratio"] == pytest.approx(row["new_ms"] / row["old_ms"])
    assert "change against" in capsys.readouterr().out


def test_cli_rejects_bad_arguments(tmp_path):
    with pytest.raises(SystemExit, match="unknown case"):
        _run(tmp_path, "--cases", "nosuchcase")
    with pytest.raises(SystemExit, match="must start with eager"):
        _run(tmp_path, "--providers", "skipfast,eager")
    with pytest.raises(SystemExit, match="--modes"):
        _run(tmp_path, "--modes", "sideways")
    with pytest.raises(SystemExit, match="--batch must be a positive integer"):
        _run(tmp_path, "--batch", "0")


def test_modes_and_batch_select():
    cases = standard_cases("quick", batch=3)
    assert [c.input_shapes for c in cases if c.name == "resnet18"] == [[(3, 3, 64, 64)]]
    assert [c.input_shapes for c in cases if c.name == "unet"] == [[(3, 3, 64, 64)]]
    assert [c.input_shapes for c in cases if c.name == "add_relu"] == [standard_cases("quick")[0].input_shapes]
    kept = select_modes(cases, "infer")
    assert {m for c in kept for m in c.modes} == {"infer"}
    assert "unet" not in [c.name for c in kept]  # only fwd+bwd


def test_standard_set_names_and_tail_label():
    names = [c.name for c in standard_cases("quick")]
    assert names == ["add_relu", "bn_add_relu", "ResidualBlock", "BottleneckBlock", "DenseBlock", "resnet18",
                     "resnet50", "densenet121", "unet"]
    tail = standard_cases("quick")[1]
    fused = hasattr(skipfast.nn, "BatchNormAct2d")
    assert ("BatchNormAct2d(x, residual)" in tail.description) == fused
    # the reference and skipfast modules share the state_dict layout, so weights transfer
    for c in standard_cases("quick"):
        if c.name in ("resnet50", "densenet121"):
            continue  # same builders as resnet18 / DenseBlock, slower to construct
        c.make_skipfast().load_state_dict(c.make_reference().state_dict(), strict=True)


def test_main_job_subprocess(tmp_path):
    """The README's main-job entry point, as a process: progress bar on stderr, table on stdout."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    p = subprocess.run([sys.executable, "-m", "skipfast.bench", "--quick", "--cases", "add_relu", "--reps", "3",
                        "--out", str(tmp_path)], capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
    assert p.returncode == 0, p.stderr
    assert [ln.split()[:3] for ln in p.stdout.splitlines() if ln.startswith("add_relu ")][-1] == \
        ["add_relu", "skipfast", "infer"]
    assert "case-mode" in p.stderr  # tqdm's bar
    doc = json.loads((tmp_path / "bench.json").read_text())
    assert {r["mode"] for r in doc["results"]} == {"fwd", "bwd", "fwd+bwd", "infer"}


def test_host_time_script(tmp_path):
    """benchmarks/host_time.py runs and writes one row per (what, mode) with both providers timed."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    out = tmp_path / "host.json"
    p = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "host_time.py"), "--rounds", "1", "--calls", "3",
                        "--json", str(out)], capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
    assert p.returncode == 0, p.stderr
    rows = json.loads(out.read_text())["rows"]
    assert [(r["what"], r["mode"]) for r in rows] == [
        (what, mode) for what in ("BN + add + relu", "residual block")
        for mode in ("eval", "train fwd (no grad)", "train fwd", "train fwd+bwd")]
    assert all(r["eager_us"] > 0 and r["skipfast_us"] > 0 for r in rows)
    assert "| residual block | train fwd+bwd |" in p.stdout


# ------------------------------------------------------------------ GPU suite, CPU parts


def test_gpu_suite_syntax_and_arguments(tmp_path):
    assert subprocess.run(["bash", "-n", str(SUITE)]).returncode == 0
    p = subprocess.run(["bash", str(SUITE)], capture_output=True, text=True)
    assert p.returncode == 2 and "usage" in p.stderr
    p = subprocess.run(["bash", str(SUITE), "a", "b"], capture_output=True, text=True)
    assert p.returncode == 2 and "usage" in p.stderr
    f = tmp_path / "afile"
    f.write_text("x")
    p = subprocess.run(["bash", str(SUITE), str(f)], capture_output=True, text=True)
    assert p.returncode == 2 and "not a folder" in p.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU path")
def test_gpu_suite_without_gpu_writes_summary(tmp_path):
    env = dict(os.environ, PYTHON=sys.executable, PYTHONPATH=str(ROOT))
    p = subprocess.run(["bash", str(SUITE), str(tmp_path / "out")], capture_output=True, text=True, env=env,
                       timeout=120)
    assert p.returncode == 1 and "no CUDA device" in p.stderr
    md = (tmp_path / "out" / "summary.md").read_text()
    assert "gpu-check | failed (exit 1)" in md


def _sample_suite_outdir(d: Path) -> None:
    (d / "bench-ops").mkdir(parents=True)
    (d / "gpu.txt").write_text("NVIDIA H100 80GB HBM3, 550.54.15, 81559 MiB\n")
    (d / "versions.json").write_text(json.dumps({"torch": "2.14.1", "torch_cuda": "13.0", "triton": "3.8.0",
                                                 "skipfast": "0.1.0", "git_commit": "abc123", "date": "2026-01-01"}))
    (d / "steps.tsv").write_text("build\t0\t95\tbuild.log\ngpu-tests\t1\t40\tgpu-tests.log\n"
                                 "bench-models\t124\t150\tbench-models.log\nlate\tskipped\t0\t\n")
    (d / "pytest.xml").write_text(
        '<testsuites><testsuite name="pytest" tests="3" failures="1" errors="0" skipped="0">'
        '<testcase classname="tests.test_x" name="test_a"/><testcase classname="tests.test_x" name="test_b">'
        '<failure message="boom"/></testcase><testcase classname="tests.test_x" name="test_c"/>'
        '</testsuite></testsuites>')
    (d / "ceilings.json").write_text(json.dumps({"copy": {"bytes": 1 << 30, "ms": 1.0, "GBps": 3000.0},
                                                 "matmul_bf16": {"n": 8192, "TFLOPs": 700.0},
                                                 "matmul_tf32": {"n": 8192, "TFLOPs": 350.0}}))
    base = {"status": "ok", "note": "", "peak_bytes": 1 << 20, "mem_ratio": 1.0, "flops": None, "min_bytes": None}
    results = [
        # 3 GB in 1.25 ms = 2400 GB/s = 80% of the 3000 GB/s copy ceiling
        {**base, "case": "bn_add_relu", "provider": "skipfast", "mode": "fwd", "median_ms": 1.25, "speedup": 2.0,
         "min_bytes": 3 * 10**9},
        # 7e12 FLOPs in 40 ms = 175 TFLOP/s = 50% of the tf32 ceiling (float32 run)
        {**base, "case": "resnet50", "provider": "eager", "mode": "fwd+bwd", "median_ms": 40.0, "speedup": 1.0,
         "flops": 7 * 10**12},
        {**base, "case": "resnet50", "provider": "compile", "mode": "fwd+bwd", "status": "WRONG",
         "median_ms": None, "speedup": None, "note": "max normalized error vs eager 3e-01"},
    ]
    (d / "bench-ops" / "bench.json").write_text(json.dumps({"settings": {"dtype": "float32"}, "results": results}))


def test_gpu_summary_writer(tmp_path):
    _sample_suite_outdir(tmp_path)
    gpu_summary.main([str(tmp_path)])
    md = (tmp_path / "summary.md").read_text()
    for text in ("NVIDIA H100 80GB HBM3", "driver 550.54.15", "torch 2.14.1", "triton 3.8.0", "commit abc123",
                 "| build | ok | 95 |", "| gpu-tests | failed (exit 1) |", "| bench-models | timed out |",
                 "| late | skipped (no time left) |", "2 passed, 1 failed", "FAILED tests.test_x::test_b",
                 "copy: 3000 GB/s", "bf16 matmul 8192^3: 700.0 TFLOP/s",
                 "2400.0 GB/s | 80% copy", "175.0 TFLOP/s | 50% tf32 matmul", "**WRONG**"):
        assert text in md, text
    s = json.loads((tmp_path / "summary.json").read_text())
    assert s["results"][0]["of_ceiling"] == pytest.approx(0.8)
    with pytest.raises(SystemExit):
        gpu_summary.main([str(tmp_path / "missing")])


def test_ceilings_code_path_on_cpu():
    from skipfast.bench import ceilings

    res = ceilings.measure(torch.device("cpu"), copy_bytes=1 << 20, n=64)
    assert res["copy"]["GBps"] > 0 and res["matmul_bf16"]["TFLOPs"] > 0
    assert res["copy"]["bytes"] == 1 << 20


def test_report_formatting():
    assert report.fmt_ms(0.5) == "500 us" and report.fmt_ms(12.345) == "12.35 ms" and report.fmt_ms(250) == "250 ms"
    assert report.fmt_bytes(3 << 20) == "3.0 MiB" and report.fmt_ratio(None) == "-"


@pytest.mark.parametrize("value", ["foo", "bn_act,bogus", ","])
def test_kernels_rejects_unknown_families(value, capsys):
    from skipfast.bench import kernels

    with pytest.raises(SystemExit) as exc:
        kernels.main(["--families", value])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "--families" in err and "bn_act, conv" in err and repr(value) in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message of a machine without CUDA")
def test_kernels_needs_cuda():
    from skipfast.bench import kernels

    with pytest.raises(SystemExit, match="needs a CUDA device"):
        kernels.main(["--families", "bn_act"])


def test_kernels_table_reports_both_copy_ceilings_and_kernel_shares():
    from skipfast.bench import kernels

    doc = {"device": "card", "copy_GBps": 4000.0, "calls": 20, "rows": [
        {"case": "bn_act train fwd [2, 8, 4, 4] NCHW", "min_bytes": 3e6, "us": {"eager": 3.0, "cpp": 2.0, "triton": 4.0},
         "copy_us": 1.0, "copy_at_size_GBps": 2000.0, "cpp_kernels": {"partial_nchw_kernel": 0.5, "apply_kernel": 1.5}},
        {"case": "conv 64->64", "flops": 1e9, "us": {"eager": 3.0, "cpp": 4.0, "triton": 2.0}}]}
    text = kernels.table(doc)
    bn = next(line for line in text.splitlines() if line.startswith("| bn_act"))
    # best fused 2 us: 3e6 B / 2 us = 1500 GB/s, 38% of the 1 GiB copy, 75% of the copy at its size
    assert "1.50x" in bn and "1500 GB/s (38% of copy)" in bn and "75% of 2000 GB/s" in bn
    conv = next(line for line in text.splitlines() if line.startswith("| conv"))
    assert "1.50x" in conv and "500 TFLOP/s" in conv
    assert "- cpp bn_act train fwd [2, 8, 4, 4] NCHW: partial_nchw_kernel 0.5, apply_kernel 1.5 us" in text
