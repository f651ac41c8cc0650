"""``python -m skipfast.bench``: eager PyTorch vs torch.compile vs skipfast, side by side.

Prints the table (case, provider, mode, median time, speedup vs eager, peak memory,
memory vs eager, bytes saved for backward) and writes bench.json, bench.csv,
speedup.png and memory.png into --out. See skipfast/bench/core.py for the
measurement rules."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from . import cases as cases_mod
from . import core, report

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
QUICK_COMPILE_NOTE = ("torch.compile is not in --quick: compiling one block's forward+backward takes ~40 s on a "
                      "2-core CPU; run without --quick, or add it with --providers eager,eager-cl,compile,skipfast")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m skipfast.bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="small shapes, few repetitions, no torch.compile (under a minute on a 2-core CPU)")
    p.add_argument("--device", default=None, help="cpu or cuda[:N] (default: cuda if available, else cpu)")
    p.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    p.add_argument("--channels-last", action="store_true",
                   help="run torch.compile and skipfast in channels_last (eager stays NCHW; eager-cl is always run)")
    p.add_argument("--cases", default=None,
                   help="comma-separated case names (default: all): " +
                        ",".join(c.name for c in cases_mod.standard_cases("quick")))
    p.add_argument("--modes", default=None,
                   help="comma-separated modes to run where a case has them (fwd, bwd, fwd+bwd, infer; default: all)")
    p.add_argument("--batch", type=int, default=None,
                   help="batch size of the whole-model cases (resnet*, densenet*, unet; default per size)")
    p.add_argument("--providers", default=None,
                   help="comma-separated providers, eager first (default: eager,eager-cl,compile[,compile-max on "
                        "CUDA],skipfast; --quick: eager,eager-cl,skipfast)")
    p.add_argument("--out", default="bench-out", help="output folder for bench.json/.csv and charts (default bench-out)")
    p.add_argument("--compare", default=None, metavar="FILE", help="an earlier bench.json: print the change per case")
    p.add_argument("--reps", type=int, default=None, help="timed calls per provider (default 5 quick, 10 full)")
    p.add_argument("--warmup", type=int, default=None, help="untimed calls before timing, besides the correctness check's (default 0 quick, 3 full)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p.parse_args(argv)


def main(argv=None, extra_providers: dict | None = None, case_list: list | None = None) -> dict:
    """Run the benchmark; returns the JSON document. ``extra_providers`` and ``case_list``
    let tests add providers (e.g. a deliberately wrong one) and tiny cases."""
    args = parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("python -m skipfast.bench: --device cuda, but torch sees no CUDA device")
    dtype = DTYPES[args.dtype]
    if args.threads:
        torch.set_num_threads(args.threads)
    size = "quick" if args.quick else device.type
    if args.batch is not None and args.batch < 1:
        sys.exit(f"python -m skipfast.bench: --batch must be a positive integer, got {args.batch}")
    all_cases = case_list if case_list is not None else cases_mod.standard_cases(size, batch=args.batch)
    try:
        selected = cases_mod.select(all_cases, args.cases)
        selected = cases_mod.select_modes(selected, args.modes)
    except ValueError as exc:
        sys.exit(f"python -m skipfast.bench: {exc}")

    available = core.standard_providers(device, args.channels_last)
    available.update(extra_providers or {})
    if args.providers:
        names = [n.strip() for n in args.providers.split(",") if n.strip()]
    elif args.quick:
        names = ["eager", "eager-cl", "skipfast"]
    else:
        names = [n for n in ("eager", "eager-cl", "compile", "compile-max", "skipfast") if n in available]
    unknown = [n for n in names if n not in available]
    if unknown or not names or names[0] != "eager":
        sys.exit(f"python -m skipfast.bench: --providers must start with eager and name only {sorted(available)}, "
                 f"got {names}")
    providers = [available[n] for n in names]

    if args.reps is not None:
        reps = dict(min_reps=args.reps, max_reps=args.reps, budget_s=None)
    elif args.quick:
        reps = dict(min_reps=3, max_reps=20, budget_s=0.3)
    else:
        reps = dict(min_reps=10, max_reps=50, budget_s=5.0)
    # --quick: the correctness check's calls (one per mode kind) are the warm-up
    warmup = args.warmup if args.warmup is not None else (0 if args.quick else 3)
    s = core.Settings(device=device, dtype=dtype, warmup=warmup, flops=device.type == "cuda" or not args.quick, **reps)
    settings = {
        "quick": args.quick, "size": size, "dtype": args.dtype, "channels_last": args.channels_last,
        "providers": names, "warmup": s.warmup, "min_reps": s.min_reps, "max_reps": s.max_reps,
        "budget_s": s.budget_s,
        "timer": "CUDA events per call, inputs rotated past L2" if device.type == "cuda" else "perf_counter per call",
        "memory_method": report.memory_method(device),
        "tolerance": core.TOLERANCE.get(dtype),
        "cudnn_benchmark": torch.backends.cudnn.benchmark,
        "compile_note": QUICK_COMPILE_NOTE if args.quick and not any(p.compiles for p in providers) else "",
        "modes": core.MODE_HELP,
    }
    info = report.machine_info(device)
    if device.type == "cpu" and info["load_avg_1min"] is not None and info["load_avg_1min"] > (info["cpu_count"] or 1):
        settings["busy_note"] = (f"WARNING: load average {info['load_avg_1min']:.1f} > {info['cpu_count']} cores: other "
                                 "processes share these CPUs, timings are noisy (try --threads 1)")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    case_docs = [{"name": c.name, "description": c.description, "input_shapes": [list(x) for x in c.input_shapes],
                  "modes": list(c.modes)} for c in selected]

    total = sum(len(c.modes) for c in selected)
    bar = None
    if not args.no_progress:
        try:
            from tqdm import tqdm

            bar = tqdm(total=total, file=sys.stderr, unit="case-mode", dynamic_ncols=True, leave=False)
        except ImportError:
            bar = None

    def tick(msg: str, done: bool = False) -> None:
        if bar is not None:
            bar.set_description(msg[:50], refresh=not done)
            if done:
                bar.update(1)

    print(report.header(info, settings), flush=True)
    records: list[dict] = []
    json_path, csv_path = out / "bench.json", out / "bench.csv"
    for c in selected:
        records += core.run_case(c, providers, s, progress=tick)
        # written after every case, so a run cut short still leaves its results
        report.write_json(json_path, info, settings, case_docs, records)
        report.write_csv(csv_path, records)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    if bar is not None:
        bar.close()

    print()
    info["load_avg_1min_end"] = report.load_avg()
    for c in selected:
        print(f"  {c.name}: {c.description}; input {' + '.join(str(list(x)) for x in c.input_shapes)}")
    compile_times = {(r["case"], r["provider"]): r["compile_s"] for r in records if r["compile_s"] is not None}
    if compile_times:
        print("  torch.compile first-call time (compilation, not in the medians): " +
              ", ".join(f"{c}/{p} {t:.1f} s" for (c, p), t in compile_times.items()))
    print()
    print(report.table(records))

    cmp_rows = None
    if args.compare:
        old = json.loads(Path(args.compare).read_text())
        cmp_rows = report.compare(records, old)
        print()
        print(report.compare_table(cmp_rows, old.get("machine", {})))
    report.write_json(json_path, info, settings, case_docs, records, cmp_rows)
    charts = report.write_charts(out, records, f"{info['gpu'] or info['cpu']} | {args.dtype} | torch {info['torch']}")
    print(f"\nwrote {json_path}, {csv_path}" + "".join(f", {p}" for p in charts))
    return json.loads(json_path.read_text())


if __name__ == "__main__":
    main()
