"""The measuring core: providers, correctness check, timing, memory.

Rules (issue 6, "honest results"):

- Every provider of a case starts from the same weights (copies of one reference
  module, or ``load_state_dict`` from it) and gets the same inputs.
- Before anything is timed, each provider runs once in each mode kind (training:
  output, input gradients and parameter gradients; inference: output) and is compared
  with the eager reference. A provider that disagrees is reported WRONG and not timed;
  one that raises is reported ERROR.
- Timing excludes warm-up and compilation. torch.compile's first calls are reported
  separately as ``compile_s`` (wall time of the first call per mode kind).
- Providers are timed round-robin (one call of each, then again), so a change of load
  on a shared machine hits all providers alike. The median is reported.
- CPU: ``time.perf_counter`` around one call. CUDA: CUDA events around one call, and
  inputs rotated through copies that together exceed twice the L2 cache when one copy
  would fit in it.
- Memory is measured in a separate, untimed call: on CUDA the allocator's peak above
  the starting level (``max_memory_allocated``); on CPU the peak of live tensor bytes
  allocated during the call, from the torch profiler's allocation events. "bwd" reports
  the memory of its whole training step. Bytes saved
  for backward (``saved_tensors_hooks``, each storage once, parameters excluded) are
  recorded for training modes on every device.
"""
from __future__ import annotations

import copy
import dataclasses
import math
import statistics
import time
from typing import Callable, Sequence

import torch
from torch import nn

MODES = ("fwd", "bwd", "fwd+bwd", "infer")
MODE_HELP = {
    "fwd": "training-mode forward (autograd graph built)",
    "bwd": "backward only (its forward runs untimed before each call)",
    "fwd+bwd": "training step without the optimizer: forward + backward",
    "infer": "eval mode, torch.no_grad() forward",
}
# Normalized max error (max |a - b| / max |eager|) a provider may show against eager.
TOLERANCE = {torch.float32: 1e-3, torch.float64: 1e-9, torch.float16: 2e-2, torch.bfloat16: 6e-2}


@dataclasses.dataclass
class Case:
    """One benchmark case: a reference module, the skipfast module, inputs, modes."""

    name: str
    make_reference: Callable[[], nn.Module]
    make_skipfast: Callable[[], nn.Module]
    input_shapes: Sequence[tuple[int, ...]]
    modes: Sequence[str] = ("fwd+bwd", "infer")
    description: str = ""
    # Minimum bytes a perfect kernel must move, per mode (for bandwidth figures).
    min_bytes: Callable[[str, int], int] | None = None

    def inputs(self, device, dtype, seed: int = 0) -> tuple[torch.Tensor, ...]:
        g = torch.Generator().manual_seed(seed)
        return tuple(torch.randn(s, generator=g).to(device=device, dtype=dtype) for s in self.input_shapes)


@dataclasses.dataclass
class Provider:
    """How a provider turns the case's reference module into the module it runs."""

    name: str
    make: Callable[[Case, nn.Module], nn.Module]
    channels_last: bool = False
    compiles: bool = False


def _copy_of_reference(case: Case, ref: nn.Module) -> nn.Module:
    return copy.deepcopy(ref)


def _skipfast(case: Case, ref: nn.Module) -> nn.Module:
    m = case.make_skipfast()
    m.load_state_dict(ref.state_dict(), strict=True)
    t = next(iter([*ref.parameters(), *ref.buffers()]), None)
    return m if t is None else m.to(device=t.device, dtype=t.dtype if t.is_floating_point() else None)


def _compiled(mode: str | None):
    def make(case: Case, ref: nn.Module) -> nn.Module:
        return torch.compile(copy.deepcopy(ref), mode=mode)

    return make


def standard_providers(device: torch.device, channels_last: bool = False) -> dict[str, Provider]:
    """eager (NCHW, the baseline), eager-cl, compile, compile-max (CUDA only), skipfast.
    ``channels_last`` runs compile and skipfast in channels_last too."""
    ps = {
        "eager": Provider("eager", _copy_of_reference),
        "eager-cl": Provider("eager-cl", _copy_of_reference, channels_last=True),
        "compile": Provider("compile", _compiled(None), channels_last=channels_last, compiles=True),
        "skipfast": Provider("skipfast", _skipfast, channels_last=channels_last),
    }
    if device.type == "cuda":
        ps["compile-max"] = Provider("compile-max", _compiled("max-autotune"), channels_last=channels_last,
                                     compiles=True)
    return ps


# ---------------------------------------------------------------------------- running


class _Runner:
    """One provider's module plus its inputs, with the four modes as (setup, run)."""

    def __init__(self, module: nn.Module, inputs: list[tuple[torch.Tensor, ...]], grad_out: torch.Tensor | None):
        self.module = module
        self.pool = inputs
        self.grad_out = grad_out
        self.i = 0
        self.out = None

    def _next_inputs(self, requires_grad: bool):
        xs = self.pool[self.i % len(self.pool)]
        self.i += 1
        for x in xs:
            x.grad = None
            x.requires_grad_(requires_grad)
        return xs

    def setup(self, mode: str) -> None:
        m = self.module
        if mode == "infer":
            m.eval()
            self.xs = self._next_inputs(False)
            return
        m.train()
        m.zero_grad(set_to_none=True)
        self.xs = self._next_inputs(True)
        if mode == "bwd":
            self.out = m(*self.xs)

    def run(self, mode: str):
        if mode == "infer":
            with torch.no_grad():
                return self.module(*self.xs)
        if mode == "fwd":
            return self.module(*self.xs)
        if mode == "fwd+bwd":
            self.out = self.module(*self.xs)
        out, self.out = self.out, None
        out.backward(self.grad_out)
        return out

    def step(self, mode: str):
        self.setup(mode)
        return self.run(mode)


def _named_params(module: nn.Module) -> dict[str, nn.Parameter]:
    inner = getattr(module, "_orig_mod", module)  # torch.compile's wrapper
    return dict(inner.named_parameters())


def check(runner: _Runner, kind: str) -> dict[str, torch.Tensor]:
    """Tensors to compare with eager: the output, and for training the gradients."""
    mode = "fwd+bwd" if kind == "train" else "infer"
    out = runner.step(mode)
    got = {"output": out.detach().contiguous()}
    if kind == "train":
        for j, x in enumerate(runner.xs):
            got[f"grad input{j}"] = x.grad.detach().contiguous()
        for name, p in _named_params(runner.module).items():
            if p.grad is not None:
                got[f"grad {name}"] = p.grad.detach().contiguous()
    return got


def compare(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> tuple[float, str]:
    """Worst normalized error ``max|a - b| / max|want|`` over all tensors, and where."""
    worst, where = 0.0, ""
    missing = sorted(set(want) - set(got))
    if missing:
        return float("inf"), f"missing {missing[0]}"
    for k, w in want.items():
        a = got[k]
        if a.shape != w.shape:
            return float("inf"), f"{k}: shape {tuple(a.shape)} != {tuple(w.shape)}"
        w64, a64 = w.double(), a.double()
        if not torch.isfinite(a64).all():
            return float("inf"), f"{k}: non-finite values"
        scale = w64.abs().max().item() or 1.0
        err = (a64 - w64).abs().max().item() / scale
        if err > worst:
            worst, where = err, k
    return worst, where


class Timer:
    """Milliseconds of one call of ``run`` after an untimed ``setup``."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def __call__(self, setup, run) -> float:
        setup()
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            run()
            end.record()
            end.synchronize()
            return start.elapsed_time(end)
        t0 = time.perf_counter()
        run()
        return (time.perf_counter() - t0) * 1e3


def cpu_peak_bytes(fn) -> int | None:
    """Peak of live tensor bytes allocated while ``fn`` runs (CPU), from the profiler's
    allocation events; tensors alive before the call are not counted."""
    from torch.profiler import ProfilerActivity, profile

    try:
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            fn()
        events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    except Exception:  # noqa: BLE001 - a profiler without memory events: say "n/a"
        return None
    events.sort(key=lambda e: e.start_ns())
    live = peak = 0
    for e in events:
        live += e.nbytes()
        peak = max(peak, live)
    return peak


def peak_bytes(fn, device: torch.device) -> int | None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - base
    return cpu_peak_bytes(fn)


class _SavedCounter:
    """``saved_tensors_hooks`` that count the bytes saved for backward, each storage
    once, the module's parameters excluded."""

    def __init__(self, module: nn.Module):
        self.params = {p.untyped_storage().data_ptr() for p in module.parameters()}
        self.seen: dict[int, int] = {}

    def pack(self, t):
        if isinstance(t, torch.Tensor):
            st = t.untyped_storage()
            if st.data_ptr() not in self.params:
                self.seen[st.data_ptr()] = max(self.seen.get(st.data_ptr(), 0), st.nbytes())
        return t

    def __enter__(self):
        self.ctx = torch.autograd.graph.saved_tensors_hooks(self.pack, lambda t: t)
        self.ctx.__enter__()
        return self

    def __exit__(self, *exc):
        self.ctx.__exit__(*exc)

    @property
    def total(self) -> int:
        return sum(self.seen.values())


def saved_bytes(runner: _Runner) -> int:
    """Bytes saved for backward by one training forward, each storage once, parameters
    excluded."""
    runner.setup("fwd")
    with _SavedCounter(runner.module) as counter:
        out = runner.run("fwd")
    del out
    return counter.total


def memory(runner: _Runner, mode: str, device: torch.device) -> tuple[int | None, int | None]:
    """(peak bytes, bytes saved for backward) of one untimed call; saved bytes are None
    for inference. The setup (which frees the previous call's gradients) runs before
    the measured window, so frees of older tensors cannot hide allocations. "bwd" is
    measured as its whole training step (forward + backward), like "fwd+bwd"."""
    step = "fwd+bwd" if mode == "bwd" else mode
    runner.setup(step)
    with _SavedCounter(runner.module) as counter:
        peak = peak_bytes(lambda: runner.run(step), device)
    return peak, (None if mode == "infer" else counter.total)


def flops(runner: _Runner, mode: str) -> int | None:
    """FLOPs of one call (torch.utils.flop_counter, counts matmuls/convolutions)."""
    from torch.utils.flop_counter import FlopCounterMode

    try:
        counter = FlopCounterMode(display=False)
        runner.setup(mode)
        with counter:
            runner.run(mode)
        return int(counter.get_total_flops())
    except Exception:  # noqa: BLE001
        return None


# ---------------------------------------------------------------------------- one case


@dataclasses.dataclass
class Settings:
    device: torch.device
    dtype: torch.dtype = torch.float32
    warmup: int = 2
    min_reps: int = 3
    max_reps: int = 30
    budget_s: float | None = 2.0  # timed seconds per (case, mode), all providers together; None: max_reps
    memory: bool = True
    flops: bool = True
    seed: int = 0
    slack: float = 25.0  # the fp64-oracle rule (see check_provider)


def _l2_bytes(device: torch.device) -> int:
    if device.type != "cuda":
        return 0
    return int(getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 50 << 20))


def _input_pool(case: Case, s: Settings, channels_last: bool, dtype=None) -> list[tuple[torch.Tensor, ...]]:
    base = case.inputs(s.device, dtype or s.dtype, s.seed)
    nbytes = sum(x.numel() * x.element_size() for x in base)
    copies = 1
    l2 = _l2_bytes(s.device)
    if l2 and nbytes < 2 * l2:
        copies = min(64, -(-2 * l2 // max(nbytes, 1)))
    pool = []
    for _ in range(copies):
        xs = tuple(x.clone() for x in base)
        if channels_last:
            xs = tuple(x.contiguous(memory_format=torch.channels_last) if x.dim() == 4 else x for x in xs)
        pool.append(xs)
    return pool


class _Oracle:
    """The eager reference run in float64 on the same weights and inputs, computed only
    when a provider misses the plain tolerance against eager (e.g. BatchNorm over a
    handful of values per channel, where any two correct fp32 implementations differ)."""

    def __init__(self, case: Case, ref: nn.Module, s: Settings, grad_out, kinds):
        self.args = case, ref, s, grad_out, kinds
        self.results = None

    def get(self) -> dict[str, dict]:
        if self.results is None:
            case, ref, s, grad_out, kinds = self.args
            m = copy.deepcopy(ref).double()
            r = _Runner(m, _input_pool(case, dataclasses.replace(s, device=s.device), False, torch.float64),
                        None if grad_out is None else grad_out.double())
            self.results = {k: check(r, k) for k in kinds}
        return self.results


def check_provider(got, want, oracle: _Oracle, kinds, s: Settings) -> tuple[bool, float, str]:
    """A provider is right when every compared tensor is within ``TOLERANCE[dtype]``
    (normalized max error) of eager. Failing that, each tensor is compared with the
    float64 oracle: right if its error there is within the tolerance, or at most
    ``slack`` x eager's own error (gradients of weights feeding a training-mode BN over
    few values per channel are ill-conditioned: correct fp32 implementations differ
    from float64 by 1e-2..1e-1 there, and from each other by up to 10x). A kernel that
    is wrong by 1% where eager is accurate is still caught. Returns (ok, worst error
    against eager, where)."""
    tol = TOLERANCE.get(s.dtype, 1e-3)
    worst, where = 0.0, ""
    for kind in kinds:
        err, at = compare(got[kind], want[kind])
        if err > worst:
            worst, where = err, f"{kind} {at}"
    if worst <= tol:
        return True, worst, where
    if not math.isfinite(worst):
        return False, worst, where
    ref64 = oracle.get()
    for kind in kinds:
        for k in want[kind]:
            e_p, _ = compare({k: got[kind][k]}, {k: ref64[kind][k]})
            e_e, _ = compare({k: want[kind][k]}, {k: ref64[kind][k]})
            if e_p > max(tol, s.slack * e_e):
                return False, worst, f"{kind} {k} (vs float64: {e_p:.1e}, eager's {e_e:.1e})"
    return True, worst, where


def prepare(case, providers, s, kinds, tick=lambda msg, done=False: None):
    """Build every provider from the same reference weights and check it against eager."""
    torch.manual_seed(s.seed)
    ref = case.make_reference().to(device=s.device, dtype=s.dtype)
    grad_out = None
    if "train" in kinds:
        with torch.no_grad():
            out = copy.deepcopy(ref).eval()(*case.inputs(s.device, s.dtype, s.seed))
        g = torch.Generator().manual_seed(s.seed + 1)
        grad_out = torch.randn(out.shape, generator=g).to(device=s.device, dtype=s.dtype)
    oracle = _Oracle(case, ref, s, grad_out, kinds)
    runners, info, want = {}, {}, None
    for p in providers:
        tick(f"{case.name}: check {p.name}")
        d = info[p.name] = {"status": "ok", "note": "", "max_err": None, "compile_s": None}
        try:
            src = copy.deepcopy(ref).to(memory_format=torch.channels_last) if p.channels_last else ref
            m = p.make(case, src)
            if p.channels_last:
                m = m.to(memory_format=torch.channels_last)
            runner = _Runner(m, _input_pool(case, s, p.channels_last), grad_out)
            t0 = time.perf_counter()
            got = {kind: check(runner, kind) for kind in kinds}
            if p.compiles:
                d["compile_s"] = time.perf_counter() - t0
        except Exception as exc:  # noqa: BLE001 - reported in the table, not raised
            d.update(status="ERROR", note=f"{type(exc).__name__}: {exc}".splitlines()[0][:200])
            continue
        if want is None:
            want = got  # the baseline (eager) is the reference for everyone else
        ok, worst, where = check_provider(got, want, oracle, kinds, s)
        d["max_err"] = worst
        if not ok:
            d.update(status="WRONG", note=f"max normalized error vs eager {worst:.1e} at {where}")
            continue
        runners[p.name] = runner
    return runners, info


def _time_mode(runners: dict[str, _Runner], mode: str, s: Settings, tick, label: str) -> dict[str, list[float]]:
    """Warm-up calls, then rounds of one timed call per provider until ``min_reps``
    rounds and ``budget_s`` seconds (or ``max_reps`` rounds) are done."""
    timer = Timer(s.device)
    times: dict[str, list[float]] = {n: [] for n in runners}
    tick(f"{label}: warm-up")
    for name, r in runners.items():
        for _ in range(s.warmup):
            timer(lambda: r.setup(mode), lambda: r.run(mode))
    t0 = time.perf_counter()
    for i in range(s.max_reps):
        if i >= s.min_reps and s.budget_s is not None and time.perf_counter() - t0 >= s.budget_s:
            break
        tick(f"{label}: round {i + 1}")
        for name, r in runners.items():
            times[name].append(timer(lambda: r.setup(mode), lambda: r.run(mode)))
    return times


def run_case(case: Case, providers: Sequence[Provider], s: Settings, modes: Sequence[str] | None = None,
             progress: Callable[..., None] | None = None) -> list[dict]:
    """Measure ``case`` for each provider and mode. The first provider is the baseline
    ("eager"); speedups and memory ratios are relative to it. Returns one record per
    (provider, mode). ``progress(message, done=False)`` is called as it goes; ``done``
    marks the end of one mode."""
    tick = progress or (lambda msg, done=False: None)
    modes = list(modes or case.modes)
    kinds = sorted({"train" if m != "infer" else "infer" for m in modes}, reverse=True)  # train first
    runners, info = prepare(case, providers, s, kinds, tick)
    baseline = providers[0].name
    elem = torch.finfo(s.dtype).bits // 8
    records = []
    for mode in modes:
        label = f"{case.name} {mode}"
        times = _time_mode(runners, mode, s, tick, label)
        mem: dict[str, int | None] = {}
        saved: dict[str, int | None] = {}
        if s.memory:
            tick(f"{label}: memory")
            for name, r in runners.items():
                mem[name], saved[name] = memory(r, mode, s.device)
        n_flops = flops(runners[baseline], mode) if s.flops and baseline in runners else None
        tick(f"{label}: done", True)
        base_t = statistics.median(times[baseline]) if times.get(baseline) else None
        base_m, base_sv = mem.get(baseline), saved.get(baseline)
        for p in providers:
            rec = {"case": case.name, "provider": p.name, "mode": mode, **info[p.name],
                   "channels_last": p.channels_last, "median_ms": None, "min_ms": None, "max_ms": None, "reps": 0,
                   "speedup": None, "peak_bytes": None, "mem_ratio": None, "saved_bytes": None, "saved_ratio": None,
                   "flops": n_flops, "min_bytes": case.min_bytes(mode, elem) if case.min_bytes else None}
            ts = times.get(p.name)
            if ts:
                rec.update(median_ms=statistics.median(ts), min_ms=min(ts), max_ms=max(ts), reps=len(ts),
                           peak_bytes=mem.get(p.name), saved_bytes=saved.get(p.name))
                if base_t:
                    rec["speedup"] = base_t / rec["median_ms"]
                if base_m and rec["peak_bytes"] is not None:
                    rec["mem_ratio"] = rec["peak_bytes"] / base_m
                if base_sv and rec["saved_bytes"] is not None:
                    rec["saved_ratio"] = rec["saved_bytes"] / base_sv
            records.append(rec)
    return records
