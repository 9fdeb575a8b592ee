"""The GPU check's results read, judged and shown: a run's metrics rows, pytest's junit counts, the benchmark's
figures against their targets, and the report as the table `tools/gpu/check.py` prints (one line per stage, then
the benchmark and memory figures)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any
from xml.etree import ElementTree

TARGETS = {"mfu": 0.50, "tessera_speed_over_hf_min": 1.2}  # figures reported against, never failing the check


def run_rows(run_dir: Path) -> list[dict[str, Any]]:
    """A run's metrics.jsonl rows."""
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


def bench_figures(result: dict[str, Any]) -> dict[str, Any]:
    """What the report keeps of a `tools/bench.py train-step --json` result: the ratios and each variant's figures."""
    figures = {k: v for k, v in result.items() if k.startswith("tessera_")}
    for name in ("tessera", "hf", "hf_compiled", "bare"):
        if name in result:
            r = result[name]
            figures[name] = {k: r[k] for k in ("step_s_min", "step_s_median", "tokens_per_s", "mfu", "time_share",
                                               "peak_memory_gb", "first_step_loss")}
    return figures


def below_targets(figures: dict[str, Any]) -> list[str]:
    """The figures under their targets (MFU, speed over HF), as lines for the report; never a failure."""
    below = []
    mfu = figures.get("tessera", {}).get("mfu")
    if mfu is not None and mfu < TARGETS["mfu"]:
        below.append(f"MFU {mfu:.1%} < {TARGETS['mfu']:.0%}")
    speed = figures.get("tessera_speed_over_hf_min")
    if speed is not None and speed < TARGETS["tessera_speed_over_hf_min"]:
        below.append(f"{speed:.2f}x HF < {TARGETS['tessera_speed_over_hf_min']}x")
    return below


def junit_counts(path: Path) -> dict[str, int]:
    if not path.exists():
        return {}
    root = ElementTree.parse(path).getroot()
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    return {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")} if suite is not None else {}


def table(report: dict[str, Any]) -> str:
    """The report as lines a person reads: one per stage, then the figures."""
    verdict = f"FAILED: {', '.join(report['failed'])}" if report["failed"] else "all checks passed"
    where = " (dry run on CPU)" if report["dry_run"] else ""
    lines = [f"Tessera GPU check{where}: {report['seconds']} s, {verdict}", "",
             f"{'stage':<11} {'status':<8} {'s':>6}  detail"]
    for name, r in report["stages"].items():
        lines.append(f"{name:<11} {r['status']:<8} {r['seconds']:>6}  {_detail(name, r)}")
    for name in ("bench", "compile"):
        figures = report["stages"].get(name, {}).get("figures", {})
        if figures:
            lines += ["", f"{name}: variant      step (min)   tokens/s    MFU    peak GB  fwd/bwd/opt"]
            for v in ("tessera", "hf", "hf_compiled", "bare"):
                if v in figures:
                    f = figures[v]
                    share = "/".join(f"{f['time_share'][k]:.0%}" for k in ("forward", "backward", "optimizer"))
                    lines.append(f"  {v:<18} {f['step_s_min']:>9.4f} {f['tokens_per_s']:>10,.0f} {f['mfu']:>6.1%} "
                                 f"{f['peak_memory_gb'] if f['peak_memory_gb'] is not None else '-':>8}  {share}")
    mem = report["stages"].get("memory", {}).get("modes", {})
    if mem:
        lines += ["", "memory: checkpointing  tokens/s    MFU    measured GB  estimated GB  est/meas"]
        for ac, r in mem.items():
            lines.append(f"  {ac:<20} {r['tokens_per_s']:>9,.0f} {r['mfu']:>6.1%} {r['measured_peak_gb']:>12} "
                         f"{r['estimated_peak_gb']:>13} {r['estimate_over_measured']:>9}")
    return "\n".join(lines)


def _detail(name: str, r: dict[str, Any]) -> str:
    if r.get("why") and r["status"] != "pass":
        return r["why"]
    if name == "env":
        return f"{r.get('device_name')}, torch {r.get('torch')}, attention {r.get('attention_bf16')}"
    if name == "gpu_tests":
        return f"{r.get('tests', 0)} tests, {r.get('failures', 0)} failed, {r.get('skipped', 0)} skipped"
    if name == "smoke":
        return "; ".join(f"{k}: {v['status']} ({v.get('max_rel_diff', '-')})" for k, v in r["variants"].items())
    if name == "configs":
        return "; ".join(f"{k}: {v['status']}" + (f" ({v['first_loss']:.3f} -> {v['last_loss']:.3f}{_ops(v['ops'])})"
                                                   if v["status"] == "pass" else "") for k, v in r["runs"].items())
    if name == "qlora":
        return (f"{r['device']}: loss {r['losses'][0]:.3f} -> {r['losses'][-1]:.3f}, grad norm >= "
                f"{min(r['grad_norms']):.3g}, {r['lora_b_matrices']} lora_B moved")
    if name == "memory":
        return "estimate / measured peak: " + ", ".join(f"{ac} {m['estimate_over_measured']}"
                                                          for ac, m in r["modes"].items())
    if name in ("bench", "compile"):
        f = r["figures"]
        ratios = ", ".join(f"{k.removeprefix('tessera_')} {v}" for k, v in f.items() if k.startswith("tessera_")
                           and k.endswith("_min")) or f"tessera {f['tessera']['tokens_per_s']:,.0f} tokens/s"
        return ratios + (f"  below target: {'; '.join(r['below_target'])}" if r.get("below_target") else "")
    if name == "nccl":
        return f"{r['backend']}: max rel. diff {r['max_rel_diff']} (tolerance {r['tolerance']})"
    return r.get("why", "")


def _ops(ops: list[dict[str, Any]]) -> str:
    """The DeepSpeed ops a run built or loaded, with their seconds."""
    return (", ops " + ", ".join(f"{o['op']} {o['seconds']} s" for o in ops)) if ops else ""
