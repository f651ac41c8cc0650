"""Output of a benchmark run: the table, JSON, CSV, PNG charts and the comparison with
an earlier JSON."""
from __future__ import annotations

import csv
import datetime
import json
import os
import platform
import subprocess
from pathlib import Path

import torch

CSV_FIELDS = ["case", "provider", "mode", "status", "median_ms", "min_ms", "max_ms", "reps", "speedup",
              "peak_bytes", "mem_ratio", "saved_bytes", "saved_ratio", "max_err", "compile_s", "flops",
              "min_bytes", "channels_last", "note"]


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _git_commit() -> str | None:
    root = Path(__file__).resolve().parents[2]
    try:
        out = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5)
        if out.returncode != 0:
            return None
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=5).stdout.strip()
        return out.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


def _nvidia_driver() -> str | None:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=10)
        return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None
    except (OSError, subprocess.SubprocessError, IndexError):
        return None


def load_avg() -> float | None:
    try:
        return os.getloadavg()[0]
    except OSError:
        return None


def machine_info(device: torch.device) -> dict:
    import skipfast
    from skipfast import _backend

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    try:
        import torchvision

        tv_version = torchvision.__version__
    except ImportError:
        tv_version = None
    info = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "git_commit": _git_commit(),
        "host": platform.node(),
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_avg_1min": load_avg(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "triton": triton_version,
        "torchvision": tv_version,
        "skipfast": skipfast.__version__,
        "skipfast_extension": _backend.has_extension(),
        "skipfast_add_relu_backend": _backend.select("add_relu", device),
        "device": str(device),
        "gpu": None,
        "gpu_driver": None,
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(gpu=props.name, gpu_capability=f"{props.major}.{props.minor}",
                    gpu_memory_bytes=props.total_memory, gpu_driver=_nvidia_driver())
    return info


# ---------------------------------------------------------------------------- formatting


def fmt_ms(ms: float | None) -> str:
    if ms is None:
        return "-"
    if ms >= 100:
        return f"{ms:.0f} ms"
    if ms >= 1:
        return f"{ms:.2f} ms"
    return f"{ms * 1e3:.0f} us"


def fmt_bytes(b: int | None) -> str:
    if b is None:
        return "-"
    if b >= 1 << 30:
        return f"{b / (1 << 30):.2f} GiB"
    if b >= 1 << 20:
        return f"{b / (1 << 20):.1f} MiB"
    return f"{b / 1024:.0f} KiB"


def fmt_ratio(r: float | None) -> str:
    return "-" if r is None else f"{r:.2f}x"


def memory_method(device: torch.device) -> str:
    if device.type == "cuda":
        return "peak mem = CUDA allocator peak above the starting level (max_memory_allocated) during one call"
    return "peak mem = peak live tensor bytes allocated during one call (torch profiler allocation events)"


def table(records: list[dict]) -> str:
    head = ["case", "provider", "mode", "median", "vs eager", "peak mem", "vs eager", "saved bwd", "vs eager"]
    rows = []
    for r in records:
        if r["status"] != "ok":
            rows.append([r["case"], r["provider"], r["mode"], r["status"], "", "", "", "", r["note"]])
            continue
        rows.append([r["case"], r["provider"], r["mode"], fmt_ms(r["median_ms"]), fmt_ratio(r["speedup"]),
                     fmt_bytes(r["peak_bytes"]), fmt_ratio(r["mem_ratio"]),
                     fmt_bytes(r["saved_bytes"]), fmt_ratio(r["saved_ratio"])])
    widths = [max(len(str(x)) for x in col) for col in zip(head, *[row[:-1] + [""] for row in rows])]
    align = ["<", "<", "<", ">", ">", ">", ">", ">", ">"]

    def line(cells):
        out = []
        for i, c in enumerate(cells):
            if i == len(cells) - 1 and cells[3] in ("WRONG", "ERROR"):
                out.append(str(c))  # the note, unpadded
            else:
                out.append(f"{str(c):{align[i]}{widths[i]}}")
        return "  ".join(out).rstrip()

    sep = "  ".join("-" * w for w in widths)
    return "\n".join([line(head), sep] + [line(r) for r in rows])


def reps_text(settings: dict) -> str:
    if settings.get("budget_s") is None:
        return f"{settings['max_reps']} calls"
    return (f"{settings['min_reps']}-{settings['max_reps']} calls (more while under {settings['budget_s']:g} s "
            "per case and mode)")


def header(info: dict, settings: dict) -> str:
    dev = info["gpu"] or info["cpu"]
    lines = [
        f"skipfast {info['skipfast']} ({'extension loaded' if info['skipfast_extension'] else 'NO extension: eager references'}"
        f", add_relu backend {info['skipfast_add_relu_backend']}) | torch {info['torch']} | triton {info['triton']}",
        f"device {info['device']} ({dev}) | {info['torch_threads']} threads | dtype {settings['dtype']} | "
        f"commit {info['git_commit'] or 'unknown'} | {info['date']}",
        f"time = median over {reps_text(settings)} after the correctness check's call and {settings['warmup']} "
        f"warm-up call(s); providers interleaved call by call; {settings['timer']}",
        settings["memory_method"] + "; saved bwd = bytes saved for backward (each storage once, parameters excluded)",
        "modes: fwd/bwd/fwd+bwd in training mode; infer = eval + no_grad. vs eager = eager time / provider time "
        "(higher is faster); memory vs eager = provider / eager (lower is leaner)",
    ]
    if settings.get("busy_note"):
        lines.append(settings["busy_note"])
    if settings.get("compile_note"):
        lines.append(settings["compile_note"])
    return "\n".join(lines)


# ---------------------------------------------------------------------------- files


def write_json(path: Path, info: dict, settings: dict, cases: list[dict], records: list[dict],
               compare: list[dict] | None = None) -> None:
    doc = {"schema": "skipfast-bench/1", "machine": info, "settings": settings, "cases": cases,
           "results": records}
    if compare is not None:
        doc["compare"] = compare
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(doc, indent=1, default=str))
    tmp.replace(path)


def write_csv(path: Path, records: list[dict]) -> None:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_FIELDS, extrasaction="ignore")
        w.writeheader()
        for r in records:
            w.writerow(r)


def write_charts(out: Path, records: list[dict], title: str) -> list[Path]:
    """speedup.png and memory.png: one bar per provider, grouped by case/mode."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    groups = []
    for r in records:
        key = f"{r['case']}\n{r['mode']}"
        if key not in groups:
            groups.append(key)
    providers = []
    for r in records:
        if r["provider"] not in providers:
            providers.append(r["provider"])
    written = []
    for field, fname, ylabel in (("speedup", "speedup.png", "speedup vs eager (higher is faster)"),
                                 ("mem_ratio", "memory.png", "peak memory vs eager (lower is leaner)")):
        fig, ax = plt.subplots(figsize=(max(6, 0.9 * len(groups) * max(1, len(providers)) * 0.35 + 2), 4.5))
        width = 0.8 / max(1, len(providers))
        for j, p in enumerate(providers):
            xs, ys = [], []
            for i, g in enumerate(groups):
                for r in records:
                    if f"{r['case']}\n{r['mode']}" == g and r["provider"] == p and r.get(field) is not None:
                        xs.append(i + (j - (len(providers) - 1) / 2) * width)
                        ys.append(r[field])
            bars = ax.bar(xs, ys, width, label=p)
            color = bars.patches[0].get_facecolor() if bars.patches else None
            for i, g in enumerate(groups):
                for r in records:
                    if f"{r['case']}\n{r['mode']}" == g and r["provider"] == p and r["status"] != "ok":
                        ax.text(i + (j - (len(providers) - 1) / 2) * width, 0.02, r["status"], rotation=90,
                                fontsize=6, ha="center", va="bottom", color=color)
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_xticks(range(len(groups)))
        ax.set_xticklabels(groups, fontsize=7)
        ax.set_ylabel(ylabel)
        ax.set_title(title, fontsize=9)
        ax.legend(fontsize=7)
        fig.tight_layout()
        path = out / fname
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


# ---------------------------------------------------------------------------- compare


def compare(records: list[dict], old_doc: dict) -> list[dict]:
    """Per (case, provider, mode) present in both runs: time and memory now / before."""
    old = {(r["case"], r["provider"], r["mode"]): r for r in old_doc.get("results", [])}
    rows = []
    for r in records:
        o = old.get((r["case"], r["provider"], r["mode"]))
        if o is None:
            continue
        row = {"case": r["case"], "provider": r["provider"], "mode": r["mode"],
               "old_ms": o.get("median_ms"), "new_ms": r.get("median_ms"), "time_ratio": None,
               "old_peak_bytes": o.get("peak_bytes"), "new_peak_bytes": r.get("peak_bytes"), "mem_ratio": None,
               "old_status": o.get("status"), "new_status": r.get("status")}
        if row["old_ms"] and row["new_ms"]:
            row["time_ratio"] = row["new_ms"] / row["old_ms"]
        if row["old_peak_bytes"] and row["new_peak_bytes"] is not None:
            row["mem_ratio"] = row["new_peak_bytes"] / row["old_peak_bytes"]
        rows.append(row)
    return rows


def compare_table(rows: list[dict], old_info: dict) -> str:
    title = (f"change against {old_info.get('date', '?')} (commit {old_info.get('git_commit') or '?'}, "
             f"{old_info.get('gpu') or old_info.get('cpu', '?')}): now / before, below 1.00x is faster / leaner")
    if not rows:
        return title + "\n(no case/provider/mode in common)"
    head = ["case", "provider", "mode", "before", "now", "time", "mem before", "mem now", "mem"]
    body = []
    for r in rows:
        if r["old_status"] != "ok" or r["new_status"] != "ok":
            body.append([r["case"], r["provider"], r["mode"], r["old_status"], r["new_status"], "", "", "", ""])
            continue
        body.append([r["case"], r["provider"], r["mode"], fmt_ms(r["old_ms"]), fmt_ms(r["new_ms"]),
                     fmt_ratio(r["time_ratio"]), fmt_bytes(r["old_peak_bytes"]), fmt_bytes(r["new_peak_bytes"]),
                     fmt_ratio(r["mem_ratio"])])
    widths = [max(len(str(x)) for x in col) for col in zip(head, *body)]
    fmt = lambda cells: "  ".join(f"{str(c):{'<' if i < 3 else '>'}{widths[i]}}" for i, c in enumerate(cells))  # noqa: E731
    return "\n".join([title, fmt(head), "  ".join("-" * w for w in widths)] + [fmt(b).rstrip() for b in body])
