"""pytest-benchmark suites: ``pytest benchmarks/ --benchmark-only``.

Each benchmark is one (case, provider, mode) of skipfast's standard set
(skipfast/bench/cases.py), measured with the same rules as ``python -m skipfast.bench``:
all providers of a case are built from one reference's weights and checked against
eager before anything is timed (a WRONG or failing skipfast fails its benchmarks; any
other WRONG provider is skipped with the reason), warm-up rounds are not timed, and
torch.compile's compilation happens in that check, not in the timed rounds.
Groups are "case mode", so pytest-benchmark's table sets providers side by side.
``extra_info`` holds peak memory, bytes saved for backward, the error against eager and
torch.compile's first-call time.

On CPU the shapes are the --quick ones and torch.compile runs only for the elementwise
cases (compiling a block's training graph takes ~40 s on 2 cores); SKIPFAST_BENCH_COMPILE=1
adds it everywhere. On CUDA: the full shapes, every provider (max-autotune included),
and each timed round ends with a synchronize. SKIPFAST_BENCH_ROUNDS sets the rounds.

On CPU the heap is kept in a steady state (see ``_steady_heap``);
SKIPFAST_BENCH_MALLOC=default leaves glibc's allocator settings as they are.
"""
from __future__ import annotations

import ctypes
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from skipfast.bench import cases, core  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _steady_heap() -> None:
    """glibc gives freed pages at the top of its heap back to the OS once they exceed a
    (moving) trim threshold, and the next round faults every page in again. At ResNet
    activation sizes that can be ~1000 page faults a round, each several microseconds in a
    VM, present or absent depending on which provider ran before: the same code measured
    up to 2x apart. The CPU benchmarks keep freed pages (M_TRIM_THRESHOLD) and take
    allocations up to 32 MiB from the heap (M_MMAP_THRESHOLD), for every provider alike,
    as jemalloc or tcmalloc (recommended by PyTorch's CPU performance guide) reuse freed
    memory. Benchmark processes only; skipfast itself never changes allocator settings."""
    if DEVICE.type != "cpu" or os.environ.get("SKIPFAST_BENCH_MALLOC") == "default":
        return
    try:
        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_mmap_threshold = -1, -3  # glibc's malloc.h
        libc.mallopt(m_trim_threshold, 2**31 - 1)
        libc.mallopt(m_mmap_threshold, 32 << 20)
    except (OSError, AttributeError):  # not glibc
        pass


_steady_heap()
CASES = {c.name: c for c in cases.standard_cases("cuda" if DEVICE.type == "cuda" else "quick")}
PROVIDERS = core.standard_providers(DEVICE)
ROUNDS = int(os.environ.get("SKIPFAST_BENCH_ROUNDS", 20 if DEVICE.type == "cuda" else 5))
WARMUP = 3 if DEVICE.type == "cuda" else 1
CHEAP_TO_COMPILE = {"add_relu", "bn_add_relu"}


def providers_for(case: str) -> list[str]:
    names = ["eager", "eager-cl", "compile", "compile-max", "skipfast"]
    if DEVICE.type != "cuda" and case not in CHEAP_TO_COMPILE and os.environ.get("SKIPFAST_BENCH_COMPILE") != "1":
        names.remove("compile")
    return [n for n in names if n in PROVIDERS]


def params(case_names):
    """(case, provider, mode) parameters for the given cases."""
    return [pytest.param(c, p, m, id=f"{c}-{p}-{m}") for c in case_names for m in CASES[c].modes
            for p in providers_for(c)]


_prepared: dict[str, tuple] = {}


def _prepare(case_name: str):
    if case_name not in _prepared:
        case = CASES[case_name]
        kinds = sorted({"train" if m != "infer" else "infer" for m in case.modes}, reverse=True)
        s = core.Settings(device=DEVICE)
        _prepared.clear()  # one case's modules alive at a time
        _prepared[case_name] = core.prepare(case, [PROVIDERS[n] for n in providers_for(case_name)], s, kinds) + (s,)
    return _prepared[case_name]


@pytest.fixture
def run_case_bench(benchmark):
    def run(case_name: str, provider: str, mode: str) -> None:
        runners, info, s = _prepare(case_name)
        d = info[provider]
        benchmark.group = f"{case_name} {mode}"
        benchmark.extra_info.update(case=case_name, provider=provider, mode=mode, device=str(DEVICE), **d)
        if d["status"] != "ok":
            msg = f"{provider} is {d['status']}: {d['note']}"
            if provider == "skipfast":
                pytest.fail(msg)
            pytest.skip(msg)
        r = runners[provider]
        sync = torch.cuda.synchronize if DEVICE.type == "cuda" else (lambda: None)

        def setup():
            r.setup(mode)
            sync()
            return (), {}

        def call():
            r.run(mode)
            sync()

        benchmark.pedantic(call, setup=setup, rounds=ROUNDS, warmup_rounds=WARMUP, iterations=1)
        peak, saved = core.memory(r, mode, DEVICE)
        benchmark.extra_info.update(peak_bytes=peak, saved_bytes=saved, memory_method="cuda max_memory_allocated"
                                    if DEVICE.type == "cuda" else "torch profiler allocation events")

    return run
