"""In-process measurements for `tools/gpu/check.py`, each run as its own subprocess (own timeout, own log).

    python -m tools.gpu.probes memory --preset llama3-1b --batch 2 --seq 2048 --json out.json
    python -m tools.gpu.probes env --json out.json
    python -m tools.gpu.probes train --sdpa math [--ops-json ops.json] -- --config train/configs/smoke.yaml ...
    python -m tools.gpu.probes qlora --out DIR --steps 8 --json out.json

``memory``: for each activation-checkpointing mode (none, full, selective), Tessera's training step (the
DeepSpeed engine `train/main.py` builds, ZeRO-0, bf16 on CUDA) run for a few steps, alone in the process: its
tokens/s and MFU, and its measured peak (the allocator's ``max_memory_allocated`` on CUDA; on CPU the live tensor
bytes that `tools/live_memory.py` counts) against `tools/estimate_memory.py`'s estimate of the same layout.

``env``: the device, torch / CUDA versions, what each package that Tessera uses reports (or why it did not import),
and which attention backend and fused kernels a bf16 run chooses.

``train``: `train/main.py` with SDPA restricted to one backend (``math``, ``flash``, ``efficient``, ``cudnn``,
or ``default``: torch's own choice), so the smoke trainings compare attention kernels on the same recipe. With
``--ops-json``, every DeepSpeed op the run loads (e.g. the CPU Adam of an offloaded optimizer, compiled at its first
use where deepspeed was installed without ops) is written there with the seconds its build or load took.

``qlora``: the LoRA SFT recipe (`train/configs/sft_lora.yaml`) with ``hf.quantization=4bit`` on a tiny random
Llama built from a config (`tools/tiny_hf_models.py`) and a short instruction set, through `train/main.py`, with an
evaluation halfway (after an evaluation's no-grad forward, bitsandbytes' CPU backend can repack the 4-bit weights
and silently zero the LoRA gradients). Reports the losses, the gradient norms (only the adapters train, so a
non-zero norm is theirs) and, from the last checkpoint's adapter, how many ``lora_B`` matrices are still zero (they
start at zero and move only when their gradients are non-zero).
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import importlib
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path[0] = str(Path(__file__).resolve().parents[2])

import torch
from torch.nn.attention import sdpa_kernel

from model import get_preset
from model.attention import describe_attention
from tools import bench_step
from tools.estimate_memory import Layout, estimate
from tools.live_memory import LiveBytes
from tools.tiny_hf_models import write_model
from train.distributed import device_for, init_distributed, read_env
from train.main import main as train_main
from train.research.qa_data import synthetic_qa

AC = ("none", "full", "selective")
PACKAGES = ("deepspeed", "transformers", "peft", "datasets", "liger_kernel", "flash_attn", "flash_attn_interface",
            "bitsandbytes", "submitit", "triton", "pydantic", "tokenizers", "safetensors", "accelerate")


def _version(name: str) -> str:
    try:
        return str(getattr(importlib.import_module(name), "__version__", "installed"))
    except Exception as e:  # noqa: BLE001 - any import failure is the answer
        return f"missing ({type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''})"


def probe_env() -> dict[str, Any]:
    """What the machine has: device, versions, the attention backend and kernels a bf16 run picks."""
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    out: dict[str, Any] = {
        "python": sys.version.split()[0], "torch": torch.__version__, "cuda": torch.version.cuda,
        "gpus": torch.cuda.device_count() if cuda else 0,
        "device_name": torch.cuda.get_device_name(0) if cuda else bench_step._device_name(device),
        "memory_gb": round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1) if cuda else None,
        "bf16": bool(cuda and torch.cuda.is_bf16_supported()),
        "packages": {name: _version(name) for name in PACKAGES},
        "attention_bf16": describe_attention(device, torch.bfloat16 if cuda else torch.float32),
    }
    return out


def _sdpa_backends(name: str) -> list[Any] | None:
    from torch.nn.attention import SDPBackend

    table = {"math": [SDPBackend.MATH], "flash": [SDPBackend.FLASH_ATTENTION],
             "efficient": [SDPBackend.EFFICIENT_ATTENTION], "cudnn": [SDPBackend.CUDNN_ATTENTION], "default": None}
    if name not in table:
        raise SystemExit(f"tessera: error: --sdpa {name}: use one of {', '.join(table)}")
    return table[name]


def _record_op_loads(path: Path) -> None:
    """Time every DeepSpeed op load from now on (a JIT build on first use, a cached load after); each one is
    written to ``path`` as it finishes, so a run that fails later still reports its builds."""
    from deepspeed.ops.op_builder.builder import OpBuilder

    loads: list[dict[str, Any]] = []
    original = OpBuilder.jit_load

    def timed(self: Any, verbose: bool = True) -> Any:
        start = time.perf_counter()
        try:
            return original(self, verbose)
        finally:
            loads.append({"op": self.name, "seconds": round(time.perf_counter() - start, 2)})
            path.write_text(json.dumps(loads, indent=2) + "\n")

    OpBuilder.jit_load = timed
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("[]\n")


def run_train(sdpa: str, argv: list[str], ops_json: Path | None = None) -> int:
    """`train.main.main(argv)` with SDPA limited to one backend (forward and the backward it implies)."""
    if ops_json is not None:
        _record_op_loads(ops_json)
    backends = _sdpa_backends(sdpa)
    if backends is None:
        return train_main(argv)
    with sdpa_kernel(backends):
        return train_main(argv)


def run_qlora(out: Path, steps: int) -> dict[str, Any]:
    """A few QLoRA SFT steps on a tiny random Llama; losses, gradient norms and the adapters' ``lora_B``."""
    if importlib.util.find_spec("bitsandbytes") is None:
        return {"status": "skip", "why": "bitsandbytes is not installed (the bundle carries it only when it fits: "
                                         "see left_out in bundle.json)"}
    from safetensors.torch import load_file

    model = write_model(out / "models", "llama", 300)
    sft = out / "sft.jsonl"
    sft.write_text("".join(json.dumps({"prompt": f"{e.prompt}\nAnswer:", "response": f" {e.answers[0]}."})
                           + "\n" for e in synthetic_qa(64)))
    run = out / "run"
    code = train_main(["--config", "train/configs/sft_lora.yaml", f"hf.path={model}", "hf.quantization=4bit",
                       f"data.files=[{sft}]", "data.seq_len=192", "data.val_fraction=0.25", f"train.steps={steps}",
                       "train.global_batch_size=8", "train.micro_batch_size=4", "train.lr=3e-3",
                       "train.warmup_steps=1", "train.log_interval=1", f"train.eval_interval={max(1, steps // 2)}",
                       "train.eval_batches=2", f"train.save_interval={steps}", f"train.out_dir={run}",
                       "lora.dropout=0", "log.wandb=disabled", "log.progress=false", "sample.max_new_tokens=0"])
    if code != 0:
        raise SystemExit(code)
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    steps_rows = [r for r in rows if "loss" in r and "event" not in r and "val_loss" not in r]
    adapters = sorted(run.glob("checkpoints/step_*/adapter/adapter_model.safetensors"))
    lora_b = {k: v for k, v in load_file(str(adapters[-1])).items() if "lora_B" in k} if adapters else {}
    return {"device": "cuda" if torch.cuda.is_available() else "cpu",
            "losses": [r["loss"] for r in steps_rows], "grad_norms": [r.get("grad_norm") for r in steps_rows],
            "evaluations": sum(1 for r in rows if "val_loss" in r), "skipped_steps": sum(1 for r in rows
                                                                                        if r.get("event") == "skipped"),
            "lora_b_matrices": len(lora_b), "lora_b_zero": sorted(k for k, v in lora_b.items() if not v.any())}


def probe_memory(preset: str, overrides: dict[str, Any], batch: int, seq: int, steps: int) -> dict[str, Any]:
    """Tokens/s, MFU and the measured peak against the estimate, per activation-checkpointing mode."""
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if torch.cuda.is_available() else "cpu")
    env = read_env()
    init_distributed(env)
    device = device_for(env)
    cuda = device.type == "cuda"
    args = dataclasses.replace(get_preset(preset), **overrides).validate()
    torch.manual_seed(0)
    pool = torch.randint(0, args.vocab_size, (4, batch, seq + 1))
    state = bench_step._reference_state(args)
    fused = cuda and importlib.util.find_spec("liger_kernel") is not None
    peak_flops, peak_source = bench_step.peak_flops(device, None)
    rows: dict[str, Any] = {}
    for ac in AC:
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
            base = torch.cuda.memory_allocated(device)
        mem = LiveBytes() if not cuda else None
        if mem is not None:
            mem.__enter__()
        try:
            step = bench_step._tessera(args, batch, seq, pool, device, "zero0" if cuda else "cpu",
                                       [f"activation_checkpointing={ac}"], state)
            times = []
            for _ in range(steps):
                start = time.perf_counter()
                loss = step()["loss"]
                times.append(time.perf_counter() - start)
        finally:
            if mem is not None:
                mem.__exit__(None, None, None)
        measured = torch.cuda.max_memory_allocated(device) - base if cuda else mem.peak
        lay = Layout(micro_batch=batch, seq=seq, ac=ac, dtype="bf16" if cuda else "fp32", fused=fused)
        est = estimate(args, lay)["peak"]
        step_s = min(times[1:] or times)
        tok_s = batch * seq / step_s
        rows[ac] = {"step_s_min": round(step_s, 5), "tokens_per_s": round(tok_s, 1),
                    "mfu": round(args.flops_per_token(seq) * tok_s / peak_flops, 4), "last_loss": round(loss, 6),
                    "measured_peak_gb": round(measured / 1e9, 3), "estimated_peak_gb": round(est / 1e9, 3),
                    "estimate_over_measured": round(est / max(measured, 1), 4),
                    "step_s_median": round(statistics.median(times), 5)}
        del step
    return {"preset": preset, "overrides": overrides, "params": args.num_params(), "batch": batch, "seq": seq,
            "device": str(device), "fused_kernels": fused, "peak_flops": peak_flops, "peak_source": peak_source,
            "measured_with": "torch.cuda.max_memory_allocated" if cuda else "tools/live_memory.py LiveBytes",
            "modes": rows}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="what", required=True)
    env = sub.add_parser("env", help="device, versions, chosen kernels")
    env.add_argument("--json", type=Path, required=True)
    mem = sub.add_parser("memory", help="measured peak vs estimate, tokens/s and MFU per checkpointing mode")
    mem.add_argument("--preset", default="llama3-1b")
    mem.add_argument("--set", nargs="*", default=[], metavar="FIELD=INT", help="integer ModelArgs overrides")
    mem.add_argument("--batch", type=int, default=2)
    mem.add_argument("--seq", type=int, default=2048)
    mem.add_argument("--steps", type=int, default=3)
    mem.add_argument("--json", type=Path, required=True)
    tr = sub.add_parser("train", help="train/main.py with SDPA limited to one backend")
    tr.add_argument("--sdpa", default="default", help="math | flash | efficient | cudnn | default")
    tr.add_argument("--ops-json", type=Path, default=None, help="write the DeepSpeed ops loaded and their seconds")
    tr.add_argument("rest", nargs=argparse.REMAINDER, help="-- then train/main.py's arguments")
    ql = sub.add_parser("qlora", help="a few QLoRA SFT steps on a tiny random Llama")
    ql.add_argument("--out", type=Path, required=True, help="a folder for the model, the data and the run")
    ql.add_argument("--steps", type=int, default=8)
    ql.add_argument("--json", type=Path, required=True)
    ns = parser.parse_args(argv)
    if ns.what == "train":
        return run_train(ns.sdpa, ns.rest[1:] if ns.rest[:1] == ["--"] else ns.rest, ns.ops_json)
    if ns.what == "env":
        result = probe_env()
    elif ns.what == "qlora":
        result = run_qlora(ns.out, ns.steps)
    else:
        overrides = {k: int(v) for k, v in (item.split("=", 1) for item in ns.set)}
        result = probe_memory(ns.preset, overrides, ns.batch, ns.seq, ns.steps)
    ns.json.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
