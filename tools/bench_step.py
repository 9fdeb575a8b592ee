"""``bench.py train-step``: time Tessera's real training step, and optionally HF Llama and a bare loop beside it.

    python tools/bench.py train-step --preset tiny --set vocab_size=2048 --batch 16 --seq 256 --compare hf bare

**Tessera** is the training loop's own step (`train.loop.trainer.Trainer._step`) on a DeepSpeed engine built
as `train/main.py` builds it (the recipe's DeepSpeed config resolution, `parallelize` with the recipe's perf
options, which also chooses the loss, torch AdamW, gradient clipping 1.0): a batch from the stream, forward +
loss, `engine.backward`, `engine.step`, the loss read back and averaged over ranks. **hf** is
`transformers.LlamaForCausalLM` of the same shape and weights (`model.hf.to_hf_llama_config`, SDPA attention; a MoE
model: its Mixtral / Qwen3-MoE / Qwen2-MoE of `model.hf.to_hf_config`)
with `labels`, torch AdamW and `clip_grad_norm_`; with ``--perf compile=true`` also **hf_compiled**, each of
its decoder layers `torch.compile`d as Tessera's blocks are, so a compiled Tessera is compared with both
(HF never checkpoints activations here). **bare** is Tessera's `Transformer` in a hand-written loop (logits,
`F.cross_entropy`, backward, `clip_grad_norm_`, AdamW, `zero_grad`), with the perf section's activation
checkpointing and compile applied as Tessera applies them (its fused kernels are not), so the overhead over
it is the loop's own. All see the same batches, in the
same process; variants take turns step by step, so a machine whose speed drifts (shared, throttled) affects
each alike.

**dense** (``--compare dense``, a MoE model) is Tessera's step on the dense model whose FFNs are as wide as the
MoE layers' active experts (`dense_equivalent`): MoE against dense at the same active parameters.

Reported per variant: median and fastest step time, tokens/s (per device and in total, with the data-parallel size, here 1),
MFU, the time shares of data / forward (with the loss) / backward / optimizer (the rest is the loss read-back
and bookkeeping), peak memory. MFU = ``flops_per_token(T) * tokens/s / peak`` with
``flops_per_token = 6 * N_matmul + 12 * L * H * D * T`` (`ModelArgs.flops_per_token`; for a MoE model N_matmul
counts the router, the top_k active experts and the shared expert of each MoE layer); the peak is the
device's dense bf16 tensor-core figure on known GPUs, an estimate from the CPU's vector width and clock
on CPUs (``--peak-tflops`` overrides either). Peak memory is the allocator's on CUDA; on CPU only the
process's peak resident set is reported (all variants together).
"""

from __future__ import annotations

import dataclasses
import os
import platform
import resource
import statistics
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.nn.functional as F

from model import ModelArgs, Transformer
from model.hf import to_hf_config, to_hf_llama_config, to_hf_state_dict
from model.model import build_model
from parallel.dims import ParallelDims
from parallel.groups import build_process_groups
from parallel.parallelize import parallelize
from parallel.perf import apply_activation_checkpointing, apply_compile
from tools import report_error
from train.config.deepspeed import load_ds_config, resolve_ds_config
from train.config.load import load_config
from train.config.schema import PerfSection
from train.distributed import device_for, init_distributed, read_env
from train.loop.optim import build_optimizer, build_scheduler, param_groups
from train.loop.trainer import Trainer, TrainState

# Dense (no sparsity) bf16 tensor-core peaks, FLOP/s, by a substring of torch.cuda.get_device_name().
GPU_PEAKS = {"H200": 989.4e12, "H100 PCIe": 756.0e12, "H100": 989.4e12, "A100": 312.0e12,
             "RTX 4090": 165.2e12, "RTX 3090": 71.0e12, "RTX 3060": 25.6e12}


def peak_flops(device: torch.device, override_tflops: float | None) -> tuple[float, str]:
    """(peak FLOP/s, where the figure comes from) for ``device``."""
    if override_tflops:
        return override_tflops * 1e12, "--peak-tflops"
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, peak in GPU_PEAKS.items():
            if key in name:
                return peak, f"{name}: dense bf16 tensor-core peak"
        raise SystemExit(report_error(f"no peak FLOP/s known for {name!r}: pass --peak-tflops"))
    flags, mhz = "", 0.0
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("flags") and not flags:
                flags = line
            elif line.startswith("cpu MHz"):
                mhz = max(mhz, float(line.split(":")[1]))
    per_cycle = 64 if " avx512f" in flags else 32 if " avx2" in flags and " fma" in flags else 8
    cores = torch.get_num_threads()
    return cores * mhz * 1e6 * per_cycle, (f"estimate: {cores} threads x {mhz:.0f} MHz x {per_cycle} fp32 FLOP/cycle "
                                           f"({'AVX-512' if per_cycle == 64 else 'AVX2'} FMA x 2)")


class _Clock:
    """Phase timestamps of one step; on CUDA each mark waits for the device first."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.marks: dict[str, float] = {}

    def mark(self, name: str) -> None:
        if self.cuda:
            torch.cuda.synchronize()
        self.marks[name] = time.perf_counter()

    def phases(self) -> dict[str, float]:
        m = self.marks
        return {"data": m["data_end"] - m["start"], "forward": m["backward_start"] - m["data_end"],
                "backward": m["backward_end"] - m["backward_start"], "optimizer": m["step_end"] - m["step_start"],
                "step": m["end"] - m["start"]}


class _TimedEngine:
    """The DeepSpeed engine as the trainer sees it, with the phase boundaries marked."""

    def __init__(self, engine: Any, clock: _Clock) -> None:
        self._engine, self._clock = engine, clock

    def __getattr__(self, name: str) -> Any:
        return getattr(self._engine, name)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._engine(*args, **kwargs)

    def backward(self, loss: torch.Tensor) -> Any:
        self._clock.mark("backward_start")
        out = self._engine.backward(loss)
        self._clock.mark("backward_end")
        return out

    def step(self) -> Any:
        self._clock.mark("step_start")
        out = self._engine.step()
        self._clock.mark("step_end")
        return out


def _batches(pool: torch.Tensor, clock: _Clock) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    i = 0
    while True:
        seq = pool[i % len(pool)]  # (B, T + 1)
        i += 1
        x, y = seq[:, :-1], seq[:, 1:]
        clock.mark("data_end")
        yield x, y


def build_trainer(args: ModelArgs, batch: int, seq: int, stream: Iterator[Any], device: torch.device,
                  ds_name: str, perf: list[str], state: dict[str, torch.Tensor], *, grad_accum: int = 1,
                  wrap: Callable[[Any], Any] = lambda engine: engine) -> Trainer:
    """A ``Trainer`` over a DeepSpeed engine built as ``train/main.py`` builds it (``wrap`` wraps the engine the
    trainer sees), with ``batch`` sequences per micro-batch and ``grad_accum`` micro-batches per step."""
    import deepspeed

    overrides = [f"data.seq_len={seq}", f"train.micro_batch_size={batch}",
                 f"train.global_batch_size={batch * grad_accum}", "train.warmup_steps=0", "train.steps=1000000",
                 *(f"perf.{p}" for p in perf)]
    cfg = load_config(None, overrides)
    bf16_ok = device.type == "cuda" and torch.cuda.is_bf16_supported()
    ds_config = resolve_ds_config(load_ds_config(ds_name), cfg, dp_size=1, bf16_supported=bf16_ok)
    model = build_model(args, device, 0)
    model.load_state_dict(state)
    bf16 = bool(ds_config.get("bf16", {}).get("enabled"))
    loss_fn = parallelize(model, build_process_groups(ParallelDims(1)), parallel=cfg.parallel, perf=cfg.perf,
                          device=device, dtype=torch.bfloat16 if bf16 else torch.float32).loss_fn
    optimizer = build_optimizer(model, cfg.train, ds_config)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config,
                                      model_parameters=None if optimizer else param_groups(model, 0.1),
                                      lr_scheduler=lambda opt: build_scheduler(opt, cfg.train))
    engine.train()
    return Trainer(cfg, wrap(engine), TrainState(), batches=lambda consumed: stream, val_batches=lambda: iter(()),
                   grad_accum=grad_accum, logger=None, device=device, checkpoints=None, loss_fn=loss_fn)


def _tessera(args: ModelArgs, batch: int, seq: int, pool: torch.Tensor, device: torch.device, ds_name: str,
             perf: list[str], state: dict[str, torch.Tensor]) -> Callable[[], dict[str, float]]:
    clock = _Clock(device)
    trainer = build_trainer(args, batch, seq, _batches(pool, clock), device, ds_name, perf, state,
                            wrap=lambda engine: _TimedEngine(engine, clock))

    def step() -> dict[str, float]:
        clock.mark("start")
        loss, _ = trainer._step(want_grad_norm=False)
        trainer.state.consumed_samples += batch
        clock.mark("end")
        return {**clock.phases(), "loss": loss}

    return step


def _plain_loop(model: torch.nn.Module, loss_of: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                pool: torch.Tensor, device: torch.device) -> Callable[[], dict[str, float]]:
    """The hand-written loop: forward + loss, backward, clip, AdamW, zero_grad."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95), weight_decay=0.1)
    clock = _Clock(device)
    stream = _batches(pool, clock)
    model.train()

    def step() -> dict[str, float]:
        clock.mark("start")
        x, y = next(stream)
        x, y = x.to(device), y.to(device)
        loss = loss_of(x, y)
        clock.mark("backward_start")
        loss.backward()
        clock.mark("backward_end")
        clock.mark("step_start")
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        clock.mark("step_end")
        value = loss.item()
        clock.mark("end")
        return {**clock.phases(), "loss": value}

    return step


def _bare(args: ModelArgs, pool: torch.Tensor, device: torch.device, state: dict[str, torch.Tensor],
          dtype: torch.dtype, perf: PerfSection) -> Callable[[], dict[str, float]]:
    with torch.device(device):
        model = Transformer(args)
    model.load_state_dict(state)
    model.to(dtype)
    # like for like: the blocks checkpointed and compiled as Tessera's perf section does it (no fused kernels)
    apply_activation_checkpointing(model, perf.activation_checkpointing, every=perf.ac_every)
    if perf.compile:
        apply_compile(model)

    def loss_of(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(model(x).flatten(0, 1).float(), y.flatten())

    return _plain_loop(model, loss_of, pool, device)


def _hf(args: ModelArgs, pool: torch.Tensor, device: torch.device, state: dict[str, torch.Tensor],
        dtype: torch.dtype, compiled: bool) -> Callable[[], dict[str, float]]:
    from transformers import AutoModelForCausalLM

    config = to_hf_config(args) if args.n_moe_layers else to_hf_llama_config(args)  # MoE: Mixtral / Qwen3-MoE
    config._attn_implementation = "sdpa"
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config)
    model.load_state_dict(to_hf_state_dict(state))  # transformers 5 holds MoE experts stacked, as Tessera does
    model.to(dtype)
    if compiled:  # each decoder layer, as Tessera's perf.compile does with its blocks
        for layer in model.model.layers:
            layer.compile()

    def loss_of(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        logits = model(input_ids=x).logits  # the same loss as the others (HF's own would shift the labels)
        return F.cross_entropy(logits.flatten(0, 1).float(), y.flatten())

    return _plain_loop(model, loss_of, pool, device)


def _summary(samples: list[dict[str, float]], tokens: int, flops_per_token: int, peak: float,
             peak_mem: float | None) -> dict[str, Any]:
    step = statistics.median(s["step"] for s in samples)
    total = sum(s["step"] for s in samples)
    shares = {k: round(sum(s[k] for s in samples) / total, 4) for k in ("data", "forward", "backward", "optimizer")}
    tok_s = tokens / step
    return {"steps": len(samples), "step_s_median": round(step, 5),
            "step_s_min": round(min(s["step"] for s in samples), 5),
            "tokens_per_s": round(tok_s, 1), "tokens_per_s_per_device": round(tok_s, 1),
            "model_tflops_per_s": round(flops_per_token * tok_s / 1e12, 4),
            "mfu": round(flops_per_token * tok_s / peak, 4), "time_share": shares,
            "first_loss": round(samples[0]["loss"], 6), "peak_memory_gb": peak_mem}


def bench_train_step(args: ModelArgs, *, batch: int, seq: int, steps: int, warmup: int, compare: list[str],
                     ds_name: str | None, perf: list[str], peak_tflops: float | None, rounds_of: int = 1,
                     seed: int = 0) -> dict[str, Any]:
    """Warm up each variant, then run ``steps`` measured steps each, ``rounds_of`` at a time in turn."""
    os.environ.setdefault("DS_ACCELERATOR", "cpu" if not torch.cuda.is_available() else "cuda")
    env = read_env()
    init_distributed(env)
    device = device_for(env)
    ds_name = ds_name or ("zero0" if device.type == "cuda" else "cpu")
    torch.manual_seed(seed)
    pool = torch.randint(0, args.vocab_size, (8, batch, seq + 1))
    state = {k: v.detach().clone() for k, v in _reference_state(args).items()}
    runners: dict[str, Callable[[], dict[str, float]]] = {
        "tessera": _tessera(args, batch, seq, pool, device, ds_name, perf, state)}
    dtype = torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else torch.float32
    perf_cfg = load_config(None, [f"perf.{p}" for p in perf]).perf
    if "hf" in compare:  # eager, and with perf.compile also compiled: Tessera compiled against both
        runners["hf"] = _hf(args, pool, device, state, dtype, compiled=False)
        if perf_cfg.compile:
            runners["hf_compiled"] = _hf(args, pool, device, state, dtype, compiled=True)
    if "bare" in compare:
        runners["bare"] = _bare(args, pool, device, state, dtype, perf_cfg)
    fpts = {name: args.flops_per_token(seq) for name in runners}
    if "dense" in compare and args.n_moe_layers:  # the dense model of the MoE model's active parameters
        dense = dense_equivalent(args)
        runners["dense"] = _tessera(dense, batch, seq, pool, device, ds_name, perf, _reference_state(dense))
        fpts["dense"] = dense.flops_per_token(seq)
    first_losses = {name: run()["loss"] for name, run in runners.items()}  # same weights, same first batch
    for run in runners.values():
        for _ in range(warmup - 1):
            run()
    samples: dict[str, list[dict[str, float]]] = {name: [] for name in runners}
    peaks: dict[str, float | None] = {}
    while len(samples["tessera"]) < steps:
        for name, run in runners.items():
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            samples[name] += [run() for _ in range(min(rounds_of, steps - len(samples[name])))]
            if device.type == "cuda":
                peaks[name] = round(max(peaks.get(name) or 0, torch.cuda.max_memory_allocated(device) / 1e9), 3)
    peak, peak_source = peak_flops(device, peak_tflops)
    tokens, fpt = batch * seq, args.flops_per_token(seq)
    results = {name: {**_summary(s, tokens, fpts[name], peak, peaks.get(name)),
                      "first_step_loss": round(first_losses[name], 6)} for name, s in samples.items()}
    out: dict[str, Any] = {
        "what": "train-step", "device": str(device), "device_name": _device_name(device), "dtype": str(dtype),
        "torch": torch.__version__, "threads": torch.get_num_threads(), "ds_config": ds_name, "perf": perf,
        "model": {k: v for k, v in vars(args).items()}, "params": args.num_params(),
        "active_params": args.num_active_params(), "batch": batch, "seq": seq,
        "data_parallel": 1, "flops_per_token": fpt, "peak_flops": peak, "peak_source": peak_source,
        "process_peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3),
        **results,
    }
    # from medians, and from the fastest steps (on a shared machine other work only ever adds time)
    for stat in ("median", "min"):
        base = results["tessera"][f"step_s_{stat}"]
        for hf in ("hf", "hf_compiled"):
            if hf in results:
                out[f"tessera_speed_over_{hf}_{stat}"] = round(results[hf][f"step_s_{stat}"] / base, 4)
        if "dense" in results:
            out[f"moe_speed_over_dense_{stat}"] = round(results["dense"][f"step_s_{stat}"] / base, 4)
            out["dense_params"] = dense_equivalent(args).num_params()
        if "bare" in results:
            out[f"tessera_overhead_over_bare_{stat}"] = round(base / results["bare"][f"step_s_{stat}"] - 1, 4)
    return out


def dense_equivalent(args: ModelArgs) -> ModelArgs:
    """The dense model a MoE model's token sees as many weights of: every FFN as wide as top_k experts plus the
    shared expert (the router's dim x E weights aside)."""
    width = args.moe_top_k * args.expert_dim + (args.moe_shared_ffn_dim or 0)
    return dataclasses.replace(args, n_experts=0, ffn_hidden_dim=width, moe_shared_ffn_dim=None,
                               moe_shared_gate=False, moe_bias_update_rate=0.0)


def _reference_state(args: ModelArgs) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return Transformer(args).state_dict()


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()} ({os.cpu_count()} cores, {platform.machine()})"
    return platform.processor()
