"""Every GPU path of Tessera checked in one command, within a time budget, on a machine lent for minutes.

    tools/gpu/check.sh OUTDIR                 # on the GPU machine, with .gpu-bundle/ beside the tree
    tools/gpu/check.sh --dry-run OUTDIR       # the same script on CPU: tiny shapes, gloo, fp32 (CI runs it)

Stages, in order, each a subprocess with its own timeout (never more than what is left of ``--budget-s``):

1. ``install``: the bundle's wheels (`tools/gpu/bundle.sh`) into ``OUTDIR/site`` offline (``pip --no-index
   --no-deps``, the explicit list in the bundle's manifest); later stages import from there.
2. ``env``: device, versions, the attention backend and kernels a bf16 run chooses.
3. ``gpu_tests``: ``pytest -m gpu`` (fused kernels and flash attention against their references, CUDA RNG).
4. ``smoke``: the smoke recipe trained in bf16 with each available attention kernel (SDPA math as the reference,
   SDPA flash / memory-efficient / cuDNN, flash-attn when installed) and with the fused liger kernels on (plus the
   fused linear cross-entropy), each loss curve against the reference's within a bf16 tolerance.
5. ``configs``: the smoke recipe trained with each shipped GPU DeepSpeed config (``rtx3060``: bf16, ZeRO-2, the
   optimizer offloaded to CPU, whose CPU Adam op compiles at first use since the bundle's deepspeed has no ops;
   ``rtx4090``: bf16, ZeRO-0; ``h100``: bf16, ZeRO-3) and in fp16 (Tessera's fp16 path is a DeepSpeed config
   with ``fp16.enabled``; none ships, so ``rtx4090.json`` with fp16 instead of bf16, dynamic loss scaling, is
   written to ``OUTDIR/work/ds_fp16.json``): each must give finite losses, the last below the first; the ops each
   run built or loaded are reported with their seconds.
6. ``qlora``: a few QLoRA SFT steps (`train/configs/sft_lora.yaml` with ``hf.quantization=4bit``) on a tiny random
   Llama built from a config, with an evaluation halfway: the loss finite and falling, the gradient norm (only
   the adapters train) non-zero at every step, every ``lora_B`` moved from zero. Skipped when bitsandbytes is not
   installed (the bundle carries it when it fits).
7. ``bench``: ``tools/bench.py train-step`` on ``llama3-1b`` at sequence 2048 in bf16 ``--compare hf bare``
   (tokens/s, MFU, time shares, peak memory).
8. ``memory``: the same model alone with no / full / selective activation checkpointing: tokens/s, MFU, and
   the measured peak against `tools/estimate_memory.py`'s estimate (a correctness check: within 25%).
9. ``nccl``: with two or more GPUs, the smoke recipe on 2 processes (torchrun, nccl, ZeRO-2); its loss curve
   against the one-process run's.
10. ``compile``: ``train-step`` with ``perf.compile=true`` against HF eager and compiled.

The correctness stages come first, the figures after, so a spent budget costs figures, not checks. Expected
seconds on one H100 (estimates: no GPU has run this yet; each tiny training costs ~8-10 s of start-up, imports and
data, and a few seconds of steps) against each stage's own timeout: install 15 (90), env 10 (45), gpu_tests 40
(90), smoke 7 runs x 10 = 70 (120), configs 4 x 10 + ~35 for the CPU Adam build on 16 cores = 75 (150), qlora 20
(60), bench 50 (100), memory 30 (90), nccl skipped on one GPU (60), compile 80 (120): about 390 of the 480 s
budget. Should a stage overrun, the later ones get what is left and are reported as skipped once it is gone.
In the dry run (2 CPU cores, quiet), configs trains 2 fp32 stand-ins (the rtx3060 one offloads torch AdamW
instead of compiling CPU Adam, ~45 s here; rtx4090 in fp32 is the smoke stage's run; fp16 needs CUDA) in ~20 s and
qlora takes ~15 s (bitsandbytes' CPU backend).

Writes ``OUTDIR/report.json`` (every stage's status, seconds, figures and checks), ``OUTDIR/report.txt`` (the
table it prints) and ``OUTDIR/check.log`` (every stage's output, one after the other). Exits 1 when a correctness
check failed (a stage that crashed or timed out, a test, a loss curve, an estimate, the install); slow figures
are reported against their targets but never fail it.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path[0] = str(Path(__file__).resolve().parents[2])

from tools.gpu.results import TARGETS, below_targets, bench_figures, junit_counts, run_rows, table

REPO = Path(__file__).resolve().parents[2]
BF16_TOLERANCE = 0.05  # |loss - reference| / reference per logged step, bf16 with different kernels
FP32_TOLERANCE = 1e-4  # the same on CPU (dry run), where every variant runs the same math
ESTIMATE_RANGE = (0.75, 1.25)  # estimate / measured peak accepted as correct
PLAIN = "sdpa (torch's choice)"  # the smoke variant the 2-process run is compared with
GPU_CONFIGS = {"rtx3060": "bf16, ZeRO-2, optimizer offloaded to CPU (DeepSpeed's CPU Adam, compiled at first use)",
               "rtx4090": "bf16, ZeRO-0", "h100": "bf16, ZeRO-3"}  # ds_configs/ each stage `configs` trains with


@dataclass
class Shapes:
    """What the stages run: the real sizes on a GPU, tiny ones in the dry run."""

    preset: str
    model_set: list[str]
    batch: int
    seq: int
    bench_steps: int
    bench_warmup: int
    smoke_steps: int  # the smoke and configs stages' runs
    qlora_steps: int
    memory_batch: int
    memory_seq: int
    compile_compare: list[str]
    budget_s: float
    timeouts: dict[str, float] = field(default_factory=dict)


GPU = Shapes("llama3-1b", [], 2, 2048, 10, 3, 16, 8, 2, 2048, ["hf"], 480,
             {"install": 90, "env": 45, "gpu_tests": 90, "smoke": 120, "configs": 150, "qlora": 60, "bench": 100,
              "memory": 90, "nccl": 60, "compile": 120})
# the dry run proves the script, not the figures: the fewest steps and blocks that still run every code path
DRY = Shapes("test-1m", ["n_layers=2"], 2, 32, 2, 1, 6, 6, 4, 128, [], 480,
             {"install": 60, "env": 60, "gpu_tests": 90, "smoke": 150, "configs": 120, "qlora": 90, "bench": 90,
              "memory": 90, "nccl": 90, "compile": 120})


class Check:
    """Runs the stages, keeps the report, writes it out."""

    def __init__(self, out: Path, bundle: Path, data_cache: Path | None, dry_run: bool) -> None:
        self.out, self.bundle, self.dry = out, bundle, dry_run
        self.shapes = DRY if dry_run else GPU
        self.start = time.monotonic()
        self.log = out / "check.log"
        self.site = out / "site"
        self.work = out / "work"
        self.data_cache = data_cache
        self.stages: dict[str, dict[str, Any]] = {}
        self.env = dict(os.environ)
        self.env.update(PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", WANDB_MODE="disabled",
                        TOKENIZERS_PARALLELISM="false")
        self.env.setdefault("HF_HOME", str(self.work / "hf"))  # compile / extension caches stay where they are
        self.curves: dict[str, list[float]] = {}  # smoke variants' loss curves (nccl reuses the plain one)
        if dry_run:
            self.env["DS_ACCELERATOR"] = "cpu"
            self.env["CUDA_VISIBLE_DEVICES"] = ""
        self.env["PYTHONPATH"] = os.pathsep.join([str(self.site), str(REPO)])

    # -- running ---------------------------------------------------------------------------------------------

    def left(self) -> float:
        return self.shapes.budget_s - (time.monotonic() - self.start)

    def run(self, stage: str, cmd: list[str], *, timeout: float | None = None) -> tuple[int, str]:
        """Run ``cmd`` with the stage's timeout (or what is left), its output appended to check.log."""
        limit = max(1.0, min(timeout or self.shapes.timeouts[stage], self.left()))
        header = f"\n===== {stage}: {' '.join(cmd)} (timeout {limit:.0f} s)\n"
        started = time.monotonic()
        try:
            proc = subprocess.run(cmd, cwd=REPO, env=self.env, capture_output=True, text=True, timeout=limit,
                                  check=False)
            code, text = proc.returncode, proc.stdout + proc.stderr
        except subprocess.TimeoutExpired as e:
            code = 124
            text = _text(e.stdout) + _text(e.stderr) + f"\n[timed out after {limit:.0f} s]\n"
        with open(self.log, "a") as f:
            f.write(header + text + f"\n===== {stage}: exit {code} in {time.monotonic() - started:.1f} s\n")
        return code, text

    def stage(self, name: str, fn: Any) -> None:
        """Run one stage function; record its status (pass / fail / skip / timeout), seconds and result."""
        started = time.monotonic()
        if self.left() < 5:
            self.stages[name] = {"status": "skip", "why": "the time budget is spent", "seconds": 0.0}
            return
        try:
            result = fn()
        except StageFailed as e:
            result = {"status": "timeout" if e.timed_out else "fail", "why": str(e)}
        except Exception as e:  # noqa: BLE001 - a bug in a stage must not lose the other stages' results
            result = {"status": "fail", "why": f"{type(e).__name__}: {e}"}
        result["seconds"] = round(time.monotonic() - started, 1)
        self.stages[name] = result
        print(f"tessera: check: {name}: {result['status']} ({result['seconds']} s)"
              + (f": {result['why']}" if result.get("why") else ""), flush=True)

    def python(self, stage: str, *args: str, timeout: float | None = None) -> str:
        code, text = self.run(stage, [sys.executable, *args], timeout=timeout)
        if code != 0:
            tail = text.strip().splitlines()[-1] if text.strip() else ""
            raise StageFailed(f"exit {code}: {tail[:300]}", timed_out=code == 124)
        return text

    # -- stages ------------------------------------------------------------------------------------------------

    def install(self) -> dict[str, Any]:
        self.prepare_data()
        manifest = self.bundle / "bundle.json"
        if not manifest.exists():
            if self.dry:
                return {"status": "skip", "why": f"no bundle at {self.bundle} (tools/gpu/bundle.sh makes it); the "
                                                 f"dry run uses this machine's packages"}
            raise StageFailed(f"no bundle at {self.bundle}: run tools/gpu/bundle.sh on a machine with a package "
                              f"registry and carry .gpu-bundle/ along")
        meta = json.loads(manifest.read_text())
        wheels = [str(self.bundle / "wheels" / w["file"]) for w in meta["wheels"]]
        if self.dry:  # the wheels are for the GPU machine's Python: only check they are all there
            missing = [w for w in wheels if not Path(w).exists()]
            if missing:
                raise StageFailed(f"the bundle lacks {', '.join(Path(m).name for m in missing)}")
            return {"status": "pass", "why": f"dry run: {len(wheels)} wheels present, not installed",
                    "wheels": len(wheels)}
        self.run_pip(wheels)
        return {"status": "pass", "wheels": len(wheels), "site": str(self.site)}

    def run_pip(self, wheels: list[str]) -> None:
        cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
               "--no-cache-dir", "--disable-pip-version-check", "--target", str(self.site), *wheels]
        code, text = self.run("install", cmd)
        if code != 0:
            raise StageFailed(f"pip install from the bundle failed (exit {code}): {text.strip()[-300:]}",
                              timed_out=code == 124)

    def prepare_data(self) -> None:
        """The bundle's tokenized corpus, copied where the runs may write their index caches."""
        cache = self.work / "data_cache"
        if not cache.exists() and (self.bundle / "data_cache").exists():
            shutil.copytree(self.bundle / "data_cache", cache)
        self.data_cache = cache if cache.exists() else self.data_cache

    def probe_env(self) -> dict[str, Any]:
        path = self.work / "env.json"
        self.python("env", "-m", "tools.gpu.probes", "env", "--json", str(path))
        env = json.loads(path.read_text())
        self.gpus = env["gpus"]
        self.device_env = env
        if not self.dry and not self.gpus:
            raise StageFailed("torch sees no CUDA device")
        missing = [k for k in ("deepspeed", "pydantic") if env["packages"][k].startswith("missing")]
        if missing:
            raise StageFailed(f"{', '.join(missing)} does not import: {env['packages'][missing[0]]}")
        return {"status": "pass", **env}

    def gpu_tests(self) -> dict[str, Any]:
        junit = self.work / "gpu_tests.xml"
        code, text = self.run("gpu_tests", [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-p",
                                            "no:cacheprovider", "-rs", f"--junitxml={junit}", "tests/unit"])
        counts = junit_counts(junit)
        if code == 124:
            raise StageFailed("pytest timed out", timed_out=True)
        ok = code == 0 or (code == 5 and self.dry)  # 5: nothing collected/selected
        skipped = [line.strip() for line in text.splitlines() if line.startswith("SKIPPED")][:20]
        return {"status": "pass" if ok else "fail", **counts, "skipped_reasons": skipped,
                **({} if ok else {"why": f"pytest exit {code}: {counts.get('failures', 0)} failed, "
                                         f"{counts.get('errors', 0)} errors (see check.log)"})}

    def _train(self, stage: str, name: str, sdpa: str, overrides: list[str], nproc: int = 1,
               ds_config: str | None = None, ops_json: Path | None = None) -> list[float]:
        """The smoke recipe's logged training losses for one variant (``ds_config``: a DeepSpeed config to train
        with instead of zero0 / zero2 on a GPU and cpu in the dry run; ``ops_json``: where the DeepSpeed ops the
        run loads are noted with their seconds)."""
        out_dir = self.work / "runs" / name
        shutil.rmtree(out_dir, ignore_errors=True)
        args = ["--config", "train/configs/smoke.yaml", f"train.out_dir={out_dir}",
                f"train.steps={self.shapes.smoke_steps}",
                "train.save_interval=0", "train.eval_interval=0", "sample.max_new_tokens=0", "log.wandb=disabled",
                "log.progress=false", *overrides]
        if self.data_cache is not None:
            args.append(f"data.cache_dir={self.data_cache}")
        if ds_config is not None:
            args += ["--ds_config", ds_config]
        elif not self.dry:
            args += ["--ds_config", "zero2" if nproc > 1 else "zero0"]
        probe = ["train", "--sdpa", sdpa, *(["--ops-json", str(ops_json)] if ops_json else []), "--"]
        if nproc > 1:
            cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
                   "--master_port", str(_free_port()), "tools/gpu/probes.py", *probe, *args]
            code, text = self.run(stage, cmd)
        else:
            code, text = self.run(stage, [sys.executable, "-m", "tools.gpu.probes", *probe, *args])
        if code != 0:
            tail = text.strip().splitlines()[-1] if text.strip() else ""
            raise StageFailed(f"{name}: exit {code}: {tail[:300]}", timed_out=code == 124)
        return [r["loss"] for r in run_rows(out_dir) if "loss" in r and "event" not in r and "val_loss" not in r]

    def smoke(self) -> dict[str, Any]:
        cuda = bool(getattr(self, "gpus", 0))
        packages = getattr(self, "device_env", {}).get("packages", {})
        plain = ["perf.fused_rms_norm=false", "perf.fused_swiglu=false", "perf.fused_rope=false"]
        variants: dict[str, tuple[str, list[str]]] = {"reference (SDPA math, no fused ops)": ("math", plain),
                                                      PLAIN: ("default", plain)}
        if cuda:
            variants.update({"sdpa flash": ("flash", plain), "sdpa memory-efficient": ("efficient", plain),
                             "sdpa cudnn": ("cudnn", plain)})
            if not packages.get("flash_attn", "missing").startswith("missing"):
                variants["flash-attn"] = ("default", plain)  # attention() prefers it on CUDA in bf16
            if not packages.get("liger_kernel", "missing").startswith("missing"):
                variants["liger (all fused ops + fused linear CE)"] = (
                    "default", ["perf.fused_linear_cross_entropy=true"])
        tol = BF16_TOLERANCE if cuda else FP32_TOLERANCE
        curves: dict[str, Any] = {}
        failed: list[str] = []
        reference: list[float] | None = None
        for i, (name, (sdpa, overrides)) in enumerate(variants.items()):
            try:
                losses = self._train("smoke", f"smoke{i}", sdpa, overrides)
            except StageFailed as e:
                curves[name] = {"status": "fail", "why": str(e)}
                failed.append(name)
                continue
            self.curves[name] = losses
            if reference is None:
                reference = losses
            worst = max((abs(a - b) / abs(b) for a, b in zip(losses, reference, strict=False)), default=0.0)
            ok = len(losses) == len(reference) and worst <= tol and losses[-1] < losses[0]
            curves[name] = {"status": "pass" if ok else "fail", "first_loss": losses[0], "last_loss": losses[-1],
                            "max_rel_diff": round(worst, 6), "steps": len(losses)}
            failed += [] if ok else [name]
        return {"status": "fail" if failed else "pass", "tolerance": tol, "variants": curves,
                **({"why": f"differs from the reference or did not train: {', '.join(failed)}"} if failed else {})}

    def ds_variants(self) -> dict[str, tuple[Path | None, str]]:
        """Each shipped GPU config and an fp16 one: the DeepSpeed JSON to train with (None: skipped) and what it
        checks (or why it is skipped). On a GPU the shipped files as they are; in the dry run fp32 copies where
        DeepSpeed on CPU runs them."""
        fp16 = _ds_json("rtx4090")
        fp16.pop("bf16")
        fp16["fp16"] = {"enabled": True}  # DeepSpeed's dynamic loss scaling, its defaults
        fp16["_comment"] = "ds_configs/rtx4090.json in fp16 instead of bf16 (tools/gpu/check.py)"
        paths = {"fp16": _write_json(self.work / "ds_fp16.json", fp16)}
        if not self.dry:
            paths.update({name: REPO / "ds_configs" / f"{name}.json" for name in GPU_CONFIGS})
            return {name: (paths[name], GPU_CONFIGS.get(name, "fp16 with dynamic loss scaling, ZeRO-0"))
                    for name in (*GPU_CONFIGS, "fp16")}
        h100, rtx3060 = _ds_json("h100"), _ds_json("rtx3060")
        for cfg in (h100, rtx3060):
            cfg["bf16"] = {"enabled": "auto"}  # fp32 on CPU, where Tessera refuses bf16.enabled=true
        rtx3060.pop("optimizer")  # DeepSpeed's CPU Adam would compile (~45 s on 2 cores): torch AdamW offloaded
        rtx3060["zero_force_ds_cpu_optimizer"] = False
        offload = "ZeRO-2, optimizer state offloaded to CPU (fp32, torch AdamW instead of DeepSpeed's CPU Adam)"
        fp16_why = f"fp16 needs CUDA (Tessera refuses fp16.enabled on CPU); {paths['fp16'].name} is written"
        return {"rtx3060": (_write_json(self.work / "ds_rtx3060_cpu.json", rtx3060), offload),
                "rtx4090": (None, "on CPU it is ZeRO-0 in fp32, as ds_configs/cpu.json, which the smoke stage trains"),
                "h100": (_write_json(self.work / "ds_h100_cpu.json", h100), "ZeRO-3 (fp32)"),
                "fp16": (None, fp16_why)}

    def configs(self) -> dict[str, Any]:
        """The smoke recipe trained with each shipped GPU DeepSpeed config and in fp16: finite losses that fall,
        and the DeepSpeed ops each run built (or loaded) with their seconds."""
        runs: dict[str, Any] = {}
        failed: list[str] = []
        for name, (path, what) in self.ds_variants().items():
            if path is None:
                runs[name] = {"status": "skip", "why": what}
                continue
            ops_json = self.work / "runs" / f"cfg_{name}_ops.json"
            try:
                losses = self._train("configs", f"cfg_{name}", "default", [], ds_config=str(path), ops_json=ops_json)
            except StageFailed as e:
                runs[name] = {"status": "fail", "config": str(path), "why": str(e)}
                failed.append(name)
                continue
            ops = json.loads(ops_json.read_text()) if ops_json.exists() else []
            skipped = sum(1 for r in run_rows(self.work / "runs" / f"cfg_{name}") if r.get("event") == "skipped")
            ok = bool(losses) and all(math.isfinite(x) for x in losses) and losses[-1] < losses[0]
            shown = path.relative_to(REPO) if path.is_relative_to(REPO) else path
            runs[name] = {"status": "pass" if ok else "fail",
                          **({} if ok else {"why": "losses not finite and falling"}), "config": str(shown),
                          "what": what, "first_loss": losses[0] if losses else None,
                          "last_loss": losses[-1] if losses else None, "steps": len(losses), "skipped_steps": skipped,
                          "ops": ops, "op_seconds": round(sum(o["seconds"] for o in ops), 1)}
            failed += [] if ok else [name]
        return {"status": "fail" if failed else "pass", "runs": runs,
                **({"why": "; ".join(f"{n}: {runs[n]['why']}" for n in failed)} if failed else {})}

    def qlora(self) -> dict[str, Any]:
        """A few QLoRA SFT steps (4-bit base, bitsandbytes) on a tiny random Llama: LoRA gradients non-zero, the
        loss finite and falling; skipped when bitsandbytes is not there."""
        path = self.work / "qlora.json"
        self.python("qlora", "-m", "tools.gpu.probes", "qlora", "--out", str(self.work / "qlora"), "--steps",
                    str(self.shapes.qlora_steps), "--json", str(path))
        r = json.loads(path.read_text())
        if r.get("status") == "skip":
            return r
        losses, norms = r["losses"], r["grad_norms"]
        problems = []
        if not losses or not all(math.isfinite(x) for x in losses) or not losses[-1] < losses[0]:
            problems.append(f"losses not finite and falling: {losses}")
        if not norms or not all(n is not None and n > 0 for n in norms):
            problems.append(f"a step had no LoRA gradient (grad norms {norms})")
        if not r["lora_b_matrices"] or r["lora_b_zero"]:
            problems.append(f"{len(r['lora_b_zero'])} of {r['lora_b_matrices']} lora_B matrices never moved from zero")
        if not r["evaluations"]:
            problems.append("no evaluation ran halfway")
        return {"status": "fail" if problems else "pass", **r, **({"why": "; ".join(problems)} if problems else {})}

    def _bench(self, stage: str, perf: list[str], compare: list[str]) -> dict[str, Any]:
        s = self.shapes
        path = self.work / f"{stage}.json"
        args = ["tools/bench.py", "train-step", "--preset", s.preset, "--batch", str(s.batch), "--seq", str(s.seq),
                "--steps", str(s.bench_steps), "--warmup", str(s.bench_warmup), "--json", str(path)]
        args += (["--set", *s.model_set] if s.model_set else []) + (["--perf", *perf] if perf else [])
        args += ["--compare", *compare] if compare else []
        self.python(stage, *args)
        result = json.loads(path.read_text())
        figures = bench_figures(result)
        below = [] if self.dry else below_targets(figures)
        return {"status": "pass", "device_name": result["device_name"], "dtype": result["dtype"],
                "peak_source": result["peak_source"], "figures": figures, "below_target": below}

    def bench(self) -> dict[str, Any]:
        return self._bench("bench", [], ["hf", "bare"])

    def compile(self) -> dict[str, Any]:
        return self._bench("compile", ["compile=true"], self.shapes.compile_compare)

    def memory(self) -> dict[str, Any]:
        s = self.shapes
        path = self.work / "memory.json"
        self.python("memory", "-m", "tools.gpu.probes", "memory", "--preset", s.preset, "--batch",
                    str(s.memory_batch), "--seq", str(s.memory_seq), "--steps", "3", "--json", str(path))
        result = json.loads(path.read_text())
        lo, hi = ESTIMATE_RANGE
        off = [f"{ac}: estimate/measured {r['estimate_over_measured']}" for ac, r in result["modes"].items()
               if not lo <= r["estimate_over_measured"] <= hi]
        return {"status": "fail" if off else "pass", **result, "accepted_range": ESTIMATE_RANGE,
                **({"why": "; ".join(off)} if off else {})}

    def nccl(self) -> dict[str, Any]:
        gpus = getattr(self, "gpus", 0)
        if not self.dry and gpus < 2:
            return {"status": "skip", "why": f"{gpus} GPU(s): the 2-process nccl run needs 2"}
        plain = ["perf.fused_rms_norm=false", "perf.fused_swiglu=false", "perf.fused_rope=false"]
        one = self.curves.get(PLAIN) or self._train("nccl", "dp1", "default", plain)
        two = self._train("nccl", "dp2", "default", plain, nproc=2)
        tol = FP32_TOLERANCE * 10 if self.dry else BF16_TOLERANCE
        worst = max((abs(a - b) / abs(b) for a, b in zip(two, one, strict=False)), default=0.0)
        ok = len(one) == len(two) and worst <= tol
        return {"status": "pass" if ok else "fail", "backend": "gloo" if self.dry else "nccl",
                "max_rel_diff": round(worst, 6), "tolerance": tol, "last_loss_1proc": one[-1],
                "last_loss_2proc": two[-1],
                **({} if ok else {"why": f"2-process losses differ from 1 process by {worst:.3g} (> {tol})"})}

    # -- report ------------------------------------------------------------------------------------------------

    def report(self) -> int:
        failed = [n for n, r in self.stages.items() if r["status"] in ("fail", "timeout")]
        out = {"what": "gpu-check", "dry_run": self.dry, "shapes": self.shapes.__dict__,
               "seconds": round(time.monotonic() - self.start, 1), "failed": failed, "stages": self.stages,
               "targets": TARGETS}
        (self.out / "report.json").write_text(json.dumps(out, indent=2, default=str) + "\n")
        text = table(out)
        (self.out / "report.txt").write_text(text + "\n")
        print(text, flush=True)
        return 1 if failed else 0


class StageFailed(RuntimeError):
    """A stage's own failure; ``timed_out`` when its subprocess ran past its limit."""

    def __init__(self, message: str, *, timed_out: bool = False) -> None:
        super().__init__(message)
        self.timed_out = timed_out


def _ds_json(name: str) -> dict[str, Any]:
    return json.loads((REPO / "ds_configs" / f"{name}.json").read_text())


def _write_json(path: Path, obj: dict[str, Any]) -> Path:
    path.write_text(json.dumps(obj, indent=2) + "\n")
    return path


def _text(b: bytes | str | None) -> str:
    return b.decode(errors="replace") if isinstance(b, bytes) else (b or "")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path, help="output folder (report.json, report.txt, check.log)")
    parser.add_argument("--dry-run", action="store_true", help="on CPU: tiny shapes, gloo, no install")
    parser.add_argument("--bundle", type=Path, default=REPO / ".gpu-bundle", help="what tools/gpu/bundle.sh made")
    parser.add_argument("--data-cache", type=Path, default=None,
                        help="a data.cache_dir holding the smoke corpus (default: the bundle's, else the recipe's)")
    parser.add_argument("--budget-s", type=float, default=None, help="total seconds (default 480, also in the dry run)")
    parser.add_argument("--only", nargs="*", default=None, help="run only these stages (install and env always run)")
    ns = parser.parse_args(argv)
    if ns.out.exists() and any(ns.out.iterdir()):
        print(f"tessera: error: {ns.out} is not empty: give a new or empty output folder", file=sys.stderr)
        return 2
    ns.out.mkdir(parents=True, exist_ok=True)
    check = Check(ns.out, ns.bundle, ns.data_cache, ns.dry_run)
    if ns.budget_s:
        check.shapes.budget_s = ns.budget_s
    check.work.mkdir(parents=True, exist_ok=True)
    order = {"install": check.install, "env": check.probe_env, "gpu_tests": check.gpu_tests, "smoke": check.smoke,
             "configs": check.configs, "qlora": check.qlora, "bench": check.bench, "memory": check.memory,
             "nccl": check.nccl, "compile": check.compile}
    unknown = sorted(set(ns.only or []) - set(order))
    if unknown:
        print(f"tessera: error: --only {unknown[0]}: use some of {', '.join(order)}", file=sys.stderr)
        return 2
    for name, fn in order.items():
        if ns.only is None or name in ns.only or name in ("install", "env"):
            check.stage(name, fn)
    return check.report()


if __name__ == "__main__":
    sys.exit(main())
