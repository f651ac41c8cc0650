"""DenseNet-121 training step: skipfast's concat-free dense blocks against torchvision
(``memory_efficient=False`` and ``True``) and, with SKIPFAST_BENCH_COMPILE=1, against
``torch.compile`` of torchvision's model. Step time, bytes saved for backward, and peak
memory (CPU: RSS high-water mark of one step in a fresh process; GPU: max_memory_allocated).

    pytest benchmarks/test_dense_bench.py --benchmark-columns=median,min,max
    python benchmarks/test_dense_bench.py            # the same, one side-by-side table
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
import torchvision

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))

import skipfast  # noqa: E402
from helpers import saved_bytes  # noqa: E402

PROVIDERS = ["torchvision", "torchvision_memory_efficient", "skipfast"]
if os.environ.get("SKIPFAST_BENCH_COMPILE") == "1":
    PROVIDERS.append("torchvision_compile")


def build(provider: str, device: str = "cpu", dtype=torch.float32):
    torch.manual_seed(0)
    ref = torchvision.models.densenet121()
    if provider == "skipfast":
        model = skipfast.models.densenet121()
        model.load_state_dict(ref.state_dict())
    elif provider == "torchvision_memory_efficient":
        model = torchvision.models.densenet121(memory_efficient=True)
        model.load_state_dict(ref.state_dict())
    else:
        model = ref
    model = model.to(device=device, dtype=dtype).train()
    if device == "cuda":
        model = model.to(memory_format=torch.channels_last)
    if provider == "torchvision_compile":
        model = torch.compile(model)
    return model


def make_step(model, x):
    def step():
        model.zero_grad(set_to_none=True)
        model(x).float().sum().backward()
        if x.is_cuda:
            torch.cuda.synchronize()
    return step


def _cpu_input(batch=8, size=112):
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(1))


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_rss_of(fn) -> float:
    """Peak RSS above the starting RSS while fn runs (sampled every millisecond)."""
    import threading
    import time

    start, peak, done = _rss_mib(), [0.0], threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], _rss_mib())
            time.sleep(0.001)

    t = threading.Thread(target=sample)
    t.start()
    try:
        fn()
    finally:
        done.set()
        t.join()
    return max(peak[0], _rss_mib()) - start


def _peak_rss_mib(provider: str) -> float:
    """Peak RSS growth of one training step (the first, so nothing is cached), in a fresh process."""
    code = (
        "import sys; sys.path.insert(0, %r); sys.path.insert(0, %r)\n"
        "from test_dense_bench import build, make_step, _cpu_input, peak_rss_of\n"
        "m = build(%r); x = _cpu_input(); step = make_step(m, x)\n"
        "print(peak_rss_of(step))\n"
    ) % (ROOT, os.path.dirname(os.path.abspath(__file__)), provider)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def _saved_mib(model, x) -> float:
    nbytes, out = saved_bytes(model, x)
    del out
    return nbytes / 2**20


@pytest.mark.parametrize("provider", PROVIDERS)
def test_densenet121_train_step_cpu(benchmark, provider):
    model, x = build(provider), _cpu_input()
    step = make_step(model, x)
    step()  # warm-up (and compilation)
    benchmark.extra_info["saved_MiB"] = round(_saved_mib(model, x), 1)
    benchmark.extra_info["peak_rss_step_MiB"] = round(_peak_rss_mib(provider), 1)
    benchmark.extra_info["threads"] = torch.get_num_threads()
    benchmark.pedantic(step, rounds=7, warmup_rounds=1)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("batch", [64, 128])
@pytest.mark.parametrize("provider", PROVIDERS)
def test_densenet121_train_step_gpu(benchmark, provider, batch):
    model = build(provider, "cuda", torch.bfloat16)
    x = torch.randn(batch, 3, 224, 224, device="cuda", dtype=torch.bfloat16).to(memory_format=torch.channels_last)
    step = make_step(model, x)
    step()
    benchmark.extra_info["saved_MiB"] = round(_saved_mib(model, x), 1)
    torch.cuda.reset_peak_memory_stats()
    step()
    benchmark.extra_info["max_memory_allocated_MiB"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    benchmark.extra_info["device"] = torch.cuda.get_device_name()
    benchmark.pedantic(step, rounds=10, warmup_rounds=2)


def main(rounds: int = 7):
    """One run, providers interleaved round by round so machine load hits them alike."""
    import time

    x = _cpu_input()
    models = {p: build(p) for p in PROVIDERS}
    steps = {p: make_step(m, x) for p, m in models.items()}
    for s in steps.values():
        s()
    times = {p: [] for p in PROVIDERS}
    for _ in range(rounds):
        for p, s in steps.items():
            t = time.perf_counter()
            s()
            times[p].append(time.perf_counter() - t)
    rows = []
    for p in PROVIDERS:
        med = sorted(times[p])[len(times[p]) // 2]
        rows.append(dict(provider=p, median_ms=round(med * 1e3, 1), min_ms=round(min(times[p]) * 1e3, 1),
                         saved_MiB=round(_saved_mib(models[p], x), 1), peak_rss_step_MiB=round(_peak_rss_mib(p), 1)))
    base = rows[0]
    print(f"DenseNet-121 training step, batch 8, 112x112, fp32, CPU, {torch.get_num_threads()} threads, "
          f"{rounds} rounds interleaved")
    print(f"{'provider':32s} {'median ms':>10s} {'min ms':>8s} {'x time':>7s} {'saved MiB':>10s} {'x saved':>8s} "
          f"{'peak RSS MiB':>13s}")
    for r in rows:
        print(f"{r['provider']:32s} {r['median_ms']:10.1f} {r['min_ms']:8.1f} {r['median_ms'] / base['median_ms']:7.3f} "
              f"{r['saved_MiB']:10.1f} {r['saved_MiB'] / base['saved_MiB']:8.3f} {r['peak_rss_step_MiB']:13.1f}")
    return rows


if __name__ == "__main__":
    rows = main()
    if len(sys.argv) > 1:
        with open(sys.argv[1], "w") as f:
            json.dump(rows, f, indent=1)
