"""The GPU check's report (tests/gpu/run.sh's last step, standard library only): reads OUT/env.json
(tests/gpu/probe_env.py), OUT/junit.xml (pytest), OUT/parts.tsv (each part's exit code and seconds)
and OUT/run.log (the parts' output), and writes OUT/results.json and OUT/summary.md.

results.json: `env` (versions, GPU, driver, import failures, copy bandwidth, GEMM rate), `parts`,
`counts`, `tests` (one row per test: id, outcome passed|failed|error|skipped, seconds, reason, and what it
printed), `bench` (tools/bench_train_step.py: preset, layout, tokens/s, MFU), `memory` (planned against
measured GiB per phase, as test_plan_against_measured_memory_for_a_1b_model prints them). A missing
input leaves its part empty. Exits non-zero when it finds no junit.xml.

    python3 tests/gpu/results_to_json.py OUT
"""

from __future__ import annotations

import json
import re
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

MFU_GOAL = 0.40  # the update's MFU goal on a 1B-class model (issue 31)
BENCH_HEAD = re.compile(
    r"^(?P<preset>\S+) on (?P<device>\w+) \((?P<precision>[^,)]+)(?:, (?P<fp8>TE FP8))?, (?P<layout>\w+)\): "
    r"(?P<sequences>\d+) sequences, (?P<tokens>\d+) tokens in (?P<micro_batches>\d+) micro-batches "
    r"\((?P<padding>[\d.]+)% padding\)"
)
BENCH_SPEED = re.compile(r"^update: (?P<seconds>[\d.]+) s per optimizer step = (?P<tokens_s>[\d,]+) tokens/s")
BENCH_MFU = re.compile(
    r"^model FLOP/s (?P<model>[\d,.]+) G; reference GEMM .* (?P<gemm>[\d,.]+) G; "
    r"MFU against it (?P<mfu>[\d.]+)%"
)
MEMORY = re.compile(
    r"^(?P<phase>\w+)\s+plan\s+(?P<planned>[\d.]+) GiB\s+used\s+(?P<used>[\d.]+) GiB\s+"
    r"trainer peak\s+(?P<peak>[\d.]+) GiB"
)


def _num(s: str) -> float:
    return float(s.replace(",", ""))


def read_tests(junit: Path) -> list[dict]:
    rows = []
    for case in ET.parse(junit).getroot().iter("testcase"):
        path = case.get("classname", "").replace(".", "/")
        row = {"id": f"{path}.py::{case.get('name')}", "outcome": "passed"}
        row["seconds"] = float(case.get("time", 0))
        for tag in ("failure", "error", "skipped"):
            el = case.find(tag)
            if el is not None:
                row["outcome"] = "failed" if tag == "failure" else tag
                reason = el.get("message") or ""
                if tag != "skipped":
                    reason += "\n" + (el.text or "")[-3000:]
                row["reason"] = reason.strip()
                break
        out = case.findtext("system-out")
        if out and out.strip():
            row["output"] = out.strip()[-3000:]
        rows.append(row)
    return rows


def read_bench(log: str) -> list[dict]:
    rows: list[dict] = []
    for line in log.splitlines():
        if m := BENCH_HEAD.match(line):
            d = m.groupdict()
            rows.append(
                {
                    "preset": d["preset"],
                    "device": d["device"],
                    "precision": d["precision"],
                    "fp8": bool(d["fp8"]),
                    "layout": d["layout"],
                    "sequences": int(d["sequences"]),
                    "tokens": int(d["tokens"]),
                    "micro_batches": int(d["micro_batches"]),
                    "padding": _num(d["padding"]) / 100,
                }  # fmt: skip
            )
        elif rows and (m := BENCH_SPEED.match(line)):
            rows[-1].update(step_s=_num(m["seconds"]), tokens_per_s=_num(m["tokens_s"]))
        elif rows and (m := BENCH_MFU.match(line)):
            rows[-1].update(
                model_gflops=_num(m["model"]), reference_gemm_gflops=_num(m["gemm"]), mfu=_num(m["mfu"]) / 100
            )
    return rows


def read_memory(tests: list[dict]) -> list[dict]:
    rows = []
    for t in tests:
        for line in t.get("output", "").splitlines():
            if m := MEMORY.match(line.strip()):
                planned, used = _num(m["planned"]), _num(m["used"])
                rows.append(
                    {"test": t["id"], "phase": m["phase"], "planned_gib": planned, "used_gib": used,
                     "trainer_peak_gib": _num(m["peak"]), "within_plan": used <= planned}
                )  # fmt: skip
    return rows


def summary(r: dict) -> str:
    env, c = r["env"], r["counts"]
    v = env.get("versions", {})
    gpu = env.get("gpu", {}).get("name") or "no CUDA device"
    smi = env.get("nvidia_smi") or {}
    lines = [
        f"# GPU check, {r['date']}",
        "",
        f"- GPU: {gpu}; driver {smi.get('driver', 'n/a')}; torch {v.get('torch')} "
        f"(CUDA {env.get('torch_cuda')}), transformers {v.get('transformers')}, "
        f"megatron-core {v.get('megatron-core')}, Python {env.get('python')}",
        f"- tests: {c['passed']} passed, {c['failed']} failed, {c['error']} errors, {c['skipped']} skipped",
        f"- modules imported: {env.get('modules', 'n/a')}, failures: {len(env.get('import_failures', {}))}",
    ]
    if figs := env.get("device_figures"):
        lines.append(
            f"- pinned copies: host to device {figs['pinned_h2d_gb_s']:.1f} GB/s, device to host "
            f"{figs['pinned_d2h_gb_s']:.1f} GB/s; bf16 GEMM 8192^3 "
            f"{figs['gemm_bf16_8192_tflops']:.0f} TFLOP/s"
        )
    for mod, err in env.get("import_failures", {}).items():
        lines.append(f"  - import {mod}: {err}")
    lines += ["", "| part | exit code | seconds (cap) |", "| --- | --- | --- |"]
    lines += [f"| {p['name']} | {p['rc']} | {p['seconds']} ({p['limit']}) |" for p in r["parts"]]
    lines += ["", "| test | outcome | s | reason |", "| --- | --- | --- | --- |"]
    for t in r["tests"]:
        reason = t.get("reason", "").splitlines()[0][:160] if t.get("reason") else ""
        lines.append(f"| `{t['id']}` | {t['outcome']} | {t['seconds']:.1f} | {reason.replace('|', '/')} |")
    if r["bench"]:
        big = (figs or {}).get("gemm_bf16_8192_tflops")
        lines += [
            "",
            f"tools/bench_train_step.py (goal: MFU {MFU_GOAL:.0%} on a 1B-class model). MFU: against a GEMM "
            "of the model's shape in this run; MFU 8192: against the probe's bf16 8192^3 GEMM.",
            "",
            "| preset | device | precision | layout | tokens | padding | s/step | tokens/s | MFU | MFU 8192 "
            "|",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
        ]
        for b in r["bench"]:
            prec = b["precision"] + (" + TE FP8" if b["fp8"] else "")
            vs_big = f"{b['model_gflops'] / (big * 1e3):.1%}" if big and "model_gflops" in b else "n/a"
            lines.append(
                f"| {b['preset']} | {b['device']} | {prec} | {b['layout']} | {b['tokens']} | "
                f"{b['padding']:.1%} | {b.get('step_s', float('nan')):.3f} | "
                f"{b.get('tokens_per_s', 0):,.0f} | {b.get('mfu', float('nan')):.1%} | {vs_big} |"
            )
    if r["memory"]:
        lines += ["", "| test | phase | planned GiB | used GiB | trainer peak GiB | within plan |"]
        lines.append("| --- | --- | --- | --- | --- | --- |")
        for m in r["memory"]:
            lines.append(
                f"| `{m['test'].split('::')[-1]}` | {m['phase']} | {m['planned_gib']:.2f} | "
                f"{m['used_gib']:.2f} | {m['trainer_peak_gib']:.2f} | {'yes' if m['within_plan'] else 'NO'} |"
            )
    return "\n".join(lines) + "\n"


def main() -> int:
    out = Path(sys.argv[1])
    env_file, junit, parts_file, log = (out / n for n in ("env.json", "junit.xml", "parts.tsv", "run.log"))
    tests = read_tests(junit) if junit.exists() else []
    parts = []
    if parts_file.exists():
        for line in parts_file.read_text().splitlines():
            name, rc, seconds, limit = line.split("\t")
            parts.append({"name": name, "rc": int(rc), "seconds": int(seconds), "limit": int(limit)})
    counts = {k: sum(t["outcome"] == k for t in tests) for k in ("passed", "failed", "error", "skipped")}
    r = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        "env": json.loads(env_file.read_text()) if env_file.exists() else {},
        "parts": parts,
        "counts": counts,
        "tests": tests,
        "bench": read_bench(log.read_text()) if log.exists() else [],
        "memory": read_memory(tests),
    }
    (out / "results.json").write_text(json.dumps(r, indent=1) + "\n")
    text = summary(r)
    (out / "summary.md").write_text(text)
    print(text)
    return 0 if junit.exists() else 1


if __name__ == "__main__":
    sys.exit(main())
