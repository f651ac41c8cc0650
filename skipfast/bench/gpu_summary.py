"""The summary of a ``benchmarks/gpu_suite.sh`` run: ``python -m skipfast.bench.gpu_summary OUTDIR``.

Reads what the suite left in OUTDIR (any part may be missing when a step failed):

- ``gpu.txt``        ``nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader``
- ``versions.json``  torch / CUDA / triton / skipfast versions and the git commit
- ``steps.tsv``      one line per step: name, exit status, seconds, log file
- ``pytest.xml``     JUnit XML of ``pytest -m gpu``
- ``ceilings.json``  ``python -m skipfast.bench.ceilings``
- ``bench-*/bench.json``  ``python -m skipfast.bench`` runs

and writes ``summary.md`` and ``summary.json``. Fused cases with a known minimum byte
count are reported as achieved bandwidth against the measured copy ceiling; the others
as achieved TFLOP/s (torch.utils.flop_counter) against the measured matmul rate of
their dtype (TF32 for float32, since cuDNN convolutions use TF32 by default).
"""
from __future__ import annotations

import json
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

from .report import fmt_bytes, fmt_ms, fmt_ratio


def _read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def read_steps(path: Path) -> list[dict]:
    steps = []
    if not path.exists():
        return steps
    for line in path.read_text().splitlines():
        parts = line.split("\t")
        if len(parts) < 3:
            continue
        name, rc, secs = parts[:3]
        rc_i = int(rc) if rc.lstrip("-").isdigit() else None
        status = {0: "ok", 124: "timed out", 137: "killed (timeout)", None: rc}.get(rc_i, f"failed (exit {rc})")
        if rc == "skipped":
            status = "skipped (no time left)"
        steps.append({"name": name, "rc": rc_i, "status": status, "seconds": float(secs or 0),
                      "log": parts[3] if len(parts) > 3 else ""})
    return steps


def read_pytest(path: Path) -> dict | None:
    try:
        root = ET.parse(path).getroot()
    except (OSError, ET.ParseError):
        return None
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    tot = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0}
    failed = []
    for s in suites:
        for k in tot:
            tot[k] += int(s.get(k, 0))
        for case in s.iter("testcase"):
            if case.find("failure") is not None or case.find("error") is not None:
                failed.append(f"{case.get('classname')}::{case.get('name')}")
    tot["passed"] = tot["tests"] - tot["failures"] - tot["errors"] - tot["skipped"]
    tot["failed_tests"] = failed
    return tot


def read_gpu(path: Path) -> dict:
    try:
        line = path.read_text().strip().splitlines()[0]
    except (OSError, IndexError):
        return {"name": None, "driver": None, "memory": None}
    parts = [p.strip() for p in line.split(",")]
    return {"name": parts[0] if parts else None, "driver": parts[1] if len(parts) > 1 else None,
            "memory": parts[2] if len(parts) > 2 else None}


def _ceiling_rate(ceilings: dict | None, dtype: str) -> tuple[float | None, str]:
    if not ceilings:
        return None, ""
    key = {"bfloat16": "matmul_bf16", "float16": "matmul_bf16", "float32": "matmul_tf32"}.get(dtype, "matmul_tf32")
    entry = ceilings.get(key)
    return (entry["TFLOPs"], key.replace("matmul_", "")) if entry else (None, "")


def efficiency(rec: dict, ceilings: dict | None, dtype: str) -> dict:
    """Achieved GB/s (cases with min_bytes) or TFLOP/s, and the fraction of the ceiling."""
    out = {"achieved": None, "unit": None, "of_ceiling": None, "ceiling": None}
    ms = rec.get("median_ms")
    if not ms or rec.get("status") != "ok":
        return out
    if rec.get("min_bytes"):
        gbps = rec["min_bytes"] / (ms * 1e-3) / 1e9
        out.update(achieved=gbps, unit="GB/s")
        copy_gbps = ((ceilings or {}).get("copy") or {}).get("GBps")
        if copy_gbps:
            out.update(of_ceiling=gbps / copy_gbps, ceiling="copy")
    elif rec.get("flops"):
        tflops = rec["flops"] / (ms * 1e-3) / 1e12
        out.update(achieved=tflops, unit="TFLOP/s")
        rate, name = _ceiling_rate(ceilings, dtype)
        if rate:
            out.update(of_ceiling=tflops / rate, ceiling=f"{name} matmul")
    return out


def build(outdir: Path) -> dict:
    outdir = Path(outdir)
    benches = []
    for p in sorted(outdir.glob("bench-*/bench.json")):
        doc = _read_json(p)
        if doc:
            benches.append({"name": p.parent.name, "doc": doc})
    versions = _read_json(outdir / "versions.json") or {}
    if not versions and benches:
        m = benches[0]["doc"].get("machine", {})
        versions = {k: m.get(k) for k in ("torch", "torch_cuda", "triton", "skipfast", "git_commit", "date")}
    ceilings = _read_json(outdir / "ceilings.json")
    rows = []
    for b in benches:
        dtype = b["doc"].get("settings", {}).get("dtype", "float32")
        for r in b["doc"].get("results", []):
            rows.append({**r, "run": b["name"], "dtype": dtype, **efficiency(r, ceilings, dtype)})
    return {"gpu": read_gpu(outdir / "gpu.txt"), "versions": versions, "steps": read_steps(outdir / "steps.tsv"),
            "pytest": read_pytest(outdir / "pytest.xml"), "ceilings": ceilings, "results": rows}


def markdown(s: dict) -> str:
    g, v = s["gpu"], s["versions"]
    lines = [f"# skipfast GPU suite: {g.get('name') or 'unknown GPU'}", "",
             f"- card: {g.get('name')} ({g.get('memory')}), driver {g.get('driver')}",
             f"- torch {v.get('torch')} (CUDA {v.get('torch_cuda')}), triton {v.get('triton')}, "
             f"skipfast {v.get('skipfast')}, commit {v.get('git_commit')}",
             f"- date {v.get('date')}", "", "## Steps", "", "| step | status | seconds | log |", "|---|---|---:|---|"]
    for st in s["steps"]:
        lines.append(f"| {st['name']} | {st['status']} | {st['seconds']:.0f} | {st['log']} |")
    if not s["steps"]:
        lines.append("| (none recorded) | | | |")
    lines += ["", "## GPU tests (`pytest -m gpu`)", ""]
    t = s["pytest"]
    if t is None:
        lines.append("no test report (the step failed or did not run)")
    else:
        lines.append(f"{t['passed']} passed, {t['failures']} failed, {t['errors']} errors, {t['skipped']} skipped")
        lines += [f"- FAILED {name}" for name in t["failed_tests"]]
    lines += ["", "## Measured ceilings", ""]
    c = s["ceilings"]
    if not c:
        lines.append("not measured (the step failed or did not run)")
    else:
        cp = c.get("copy", {})
        lines.append(f"- device-to-device copy: {cp.get('GBps', 0):.0f} GB/s (read + write, {fmt_bytes(cp.get('bytes'))})")
        for k in ("matmul_bf16", "matmul_tf32", "matmul_fp32"):
            if c.get(k):
                lines.append(f"- {k.replace('matmul_', '')} matmul {c[k]['n']}^3: {c[k]['TFLOPs']:.1f} TFLOP/s")
    lines += ["", "## Benchmarks (median, CUDA events; speed and memory vs eager)", ""]
    if not s["results"]:
        lines.append("no benchmark results (the step failed or did not run)")
    else:
        lines += ["| run | case | provider | mode | median | vs eager | peak mem | vs eager | achieved | of ceiling |",
                  "|---|---|---|---|---:|---:|---:|---:|---:|---:|"]
        for r in s["results"]:
            if r["status"] != "ok":
                lines.append(f"| {r['run']} | {r['case']} | {r['provider']} | {r['mode']} | **{r['status']}** | "
                             f"{r.get('note', '')} | | | | |")
                continue
            ach = "-" if r["achieved"] is None else f"{r['achieved']:.1f} {r['unit']}"
            frac = "-" if r["of_ceiling"] is None else f"{100 * r['of_ceiling']:.0f}% {r['ceiling']}"
            lines.append(f"| {r['run']} | {r['case']} | {r['provider']} | {r['mode']} | {fmt_ms(r['median_ms'])} | "
                         f"{fmt_ratio(r['speedup'])} | {fmt_bytes(r['peak_bytes'])} | {fmt_ratio(r['mem_ratio'])} | "
                         f"{ach} | {frac} |")
        lines += ["", "Achieved bandwidth counts the minimum unique bytes a fused kernel must read and write "
                  "(see skipfast/bench/cases.py); TFLOP/s counts convolution and matmul FLOPs only."]
    return "\n".join(lines) + "\n"


def write(outdir: Path) -> dict:
    outdir = Path(outdir)
    s = build(outdir)
    (outdir / "summary.md").write_text(markdown(s))
    (outdir / "summary.json").write_text(json.dumps(s, indent=1, default=str))
    return s


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1 or not Path(argv[0]).is_dir():
        sys.exit("usage: python -m skipfast.bench.gpu_summary OUTDIR  (an existing folder written by gpu_suite.sh)")
    write(Path(argv[0]))
    print(f"wrote {Path(argv[0]) / 'summary.md'} and summary.json")


if __name__ == "__main__":
    main()
