"""Per-device training memory of a Tessera model, and a configuration that fits a given device.

    python tools/estimate_memory.py --preset llama3-8b --gpus 8 --zero 3 --seq 4096 --micro-batch 1 --ac full
    python tools/estimate_memory.py --preset llama3-1b --seq 4096 --suggest h100       # or 4090, 3060, 16 (GB)
    python tools/estimate_memory.py --preset tiny --device cpu --dtype fp32 --seq 256 --micro-batch 16

Four parts, in bytes, on the most loaded device (the first pipeline stage):

- **parameters, gradients, optimizer states** ("model states"). Mixed precision (bf16, GPU) follows DeepSpeed's
  own estimators (`estimate_zero2_model_states_mem_needs` / `estimate_zero3_...`): bf16 weights and gradients
  (2 + 2 bytes per parameter; the gradients sharded over data-parallel ranks from ZeRO-2, the weights too under
  ZeRO-3, where the largest layer is also gathered whole: 4 bytes per parameter of it), and 16 bytes per
  parameter for the fp32 master weights, Adam moments and fp32 gradients, sharded over data-parallel ranks
  (ZeRO 1-3; ZeRO-0's bf16 optimizer shards them too). Offloading moves the sharded part (and under ZeRO-3 with parameter
  offload, the weights) to host memory. fp32 (CPU) training: 4 bytes of weights, 4 of gradients (sharded under
  ZeRO 2-3; alive only from backward to the optimizer step, freed at zero_grad), 8 of Adam moments and, under
  ZeRO 1-3, a 4-byte fp32 partition of the weights, sharded.
- **activations** saved for backward, per token and layer, from what each op of `model/` keeps (D = dim,
  Dkv = key/value width, F = SwiGLU width; dtype bytes b):
  reference ops (CPU): block input, each norm's normalised value and output, q, k, v, the attention output,
  the mid-block residual, gate, silu(gate), up, their product: (8 D + 2 Dkv + 4 F) b in fp32 (under bf16 each
  norm also keeps an fp32 copy of its input: 16 D + 4 (D + Dkv) + 8 F bytes);
  fused ops (liger + flash attention, CUDA): (6 D + 2 Dkv + 3 F) b (the norms keep only their input, SwiGLU
  its two inputs). ``selective`` checkpointing drops q, k, v and the attention output (2 D + 2 Dkv); ``full``
  keeps only each block's input (D), plus one block recomputed at a time. Tensor parallelism divides the
  head and hidden-unit parts by tp (and the D parts too with sequence parallelism). A pipeline's first stage
  keeps up to ``pp`` micro-batches in flight (DeepSpeed's 1F1B schedule).
  A MoE layer (model/moe.py) keeps, per token, its fp32 router logits and probabilities and, per routed copy
  (top_k), the gathered input, the experts' gate_up output, silu(gate), the product and the expert output;
  every expert's weights count in the model states on every rank, or with `--ep N` its E / N experts, ZeRO-sharded
  over the dp / N ranks that hold the same experts; `--ep` also reports the all-to-all bytes sent per micro-batch.
  With `--tp T` every expert's FFN and the shared expert are split over the T ranks (the router stays whole):
  the expert bytes per rank are E / (ep T) experts' weights, the per-copy hidden-unit activations divide by T, and
  the tensor-parallel bytes an MoE layer sends per micro-batch (`analytic_moe_tp_bytes`) are reported beside the
  all-to-all (which, under TP, each rank sends for the whole micro-batch: TP ranks route the same tokens).
- **logits**: the head's output and the cross-entropy's log-softmax, (B, T, V / tp) each in fp32 (plus the
  bf16 logits under bf16); the fused linear cross-entropy never holds them (0 here).

- **buckets**: ZeRO 1-3 allocate gradient buckets of ``reduce_bucket_size`` elements, two with ``overlap_comm``
  (the shipped zero2 / zero3 configs): 2 x 5e8 x 2 bytes = 2 GB in bf16 whatever the model's size.

The peak is model states + buckets + activations + logits; in fp32 training, where gradients are freed at
every step, the transient part is max(activations + logits, gradients + one block's activations).
Checked against measured CPU peaks (`tests/unit/test_estimate_memory.py`) and DeepSpeed's estimators. Not
counted: the CUDA context and allocator fragmentation (``--suggest`` keeps 10% and 1 GB free for them),
attention matrices of the math attention kernel (CPU with dropout or document masks), ZeRO-3 prefetch buffers.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import sys
from dataclasses import dataclass
from pathlib import Path

if __package__ in (None, ""):
    sys.path[0] = str(Path(__file__).resolve().parents[1])

from model import ModelArgs, ModelConfigError, get_preset
from parallel.dims import ParallelConfigError, ParallelDims
from parallel.perf import AC_MODES
from tools import ToolParser, report_error

GB = 1e9
DEVICES = {"h100": 80, "4090": 24, "3060": 12}  # GB of device memory
AC_SEARCH = ("none", "selective", "full")  # the search tries the least recomputation first
assert set(AC_SEARCH) == set(AC_MODES)
OFFLOAD = ("none", "optimizer", "all")


class EstimateError(ValueError):
    """Input the estimate cannot be made for; the message names the option and the fix."""


@dataclass(frozen=True)
class Layout:
    """What is being estimated: parallel layout, batch, precision, kernels and checkpointing."""

    gpus: int = 1
    tp: int = 1
    pp: int = 1
    ep: int = 1  # expert-parallel degree (parallel.ep): experts split over ep data-parallel ranks
    zero: int = 0
    offload: str = "none"  # none | optimizer | all (optimizer and parameters, ZeRO-3)
    micro_batch: int = 1
    seq: int = 2048
    ac: str = "none"
    ac_every: int = 1
    dtype: str = "bf16"  # bf16 (mixed precision) | fp32
    fused: bool = True  # liger ops + flash attention (CUDA); False: the reference ops (CPU)
    fused_ce: bool = False  # fused linear cross-entropy
    sequence_parallel: bool = False
    reduce_bucket: int = 500_000_000  # DeepSpeed's reduce_bucket_size (elements), as in ds_configs/zero1-3.json

    @property
    def dp(self) -> int:
        return self.gpus // (self.tp * self.pp)


def check(args: ModelArgs, lay: Layout) -> None:
    """Refuse what Tessera would refuse (the same checks as the entry point), in one line."""
    try:
        dims = ParallelDims(lay.gpus, tp=lay.tp, pp=lay.pp, ep=lay.ep)
        dims.check_model(args, seq_len=lay.seq, sequence_parallel=lay.sequence_parallel)
        dims.check_pipeline(args, zero_stage=lay.zero, grad_accum=max(1, lay.pp))
        dims.check_experts(args, zero_stage=lay.zero)
    except ParallelConfigError as e:
        raise EstimateError(str(e)) from None
    if lay.zero not in (0, 1, 2, 3):
        raise EstimateError(f"--zero {lay.zero}: use 0, 1, 2 or 3")
    if lay.offload not in OFFLOAD:
        raise EstimateError(f"--offload {lay.offload}: use one of {', '.join(OFFLOAD)}")
    if lay.offload != "none" and lay.zero == 0:
        raise EstimateError(f"--offload {lay.offload} needs ZeRO 1-3 (DeepSpeed offloads ZeRO partitions): set --zero")
    if lay.offload == "all" and lay.zero != 3:
        raise EstimateError("--offload all (parameters too) needs --zero 3")
    if lay.ac not in AC_MODES:
        raise EstimateError(f"--ac {lay.ac}: use one of {', '.join(AC_SEARCH)}")
    if lay.dtype not in ("bf16", "fp32"):
        raise EstimateError(f"--dtype {lay.dtype}: use bf16 or fp32")
    for name in ("micro_batch", "seq", "ac_every"):
        if getattr(lay, name) < 1:
            raise EstimateError(f"--{name.replace('_', '-')} {getattr(lay, name)}: must be >= 1")
    if lay.seq > args.max_seq_len:
        raise EstimateError(f"--seq {lay.seq} exceeds the model's max_seq_len={args.max_seq_len}: lower --seq or "
                            f"--set max_seq_len={lay.seq}")
    if lay.fused_ce and (lay.tp > 1 or lay.pp > 1):
        raise EstimateError("--fused-ce needs tp = pp = 1 (Tessera refuses it with a split head)")


def _stage_params(args: ModelArgs, pp: int) -> tuple[int, int]:
    """(parameters of the most loaded pipeline stage, blocks on the first stage) as DeepSpeed's 'parameters'
    partitioning cuts them (a tied embedding lives on the first and the last stage)."""
    embed = args.vocab_size * args.dim
    block = (args.num_params(include_embeddings=False) - args.dim) // args.n_layers
    if pp == 1:
        return args.num_params(), args.n_layers
    from deepspeed.runtime.utils import partition_balanced

    pieces = [embed, *([block] * args.n_layers), args.dim, embed]
    parts = partition_balanced(weights=pieces, num_parts=pp)
    loads = [sum(pieces[parts[s]:parts[s + 1]]) for s in range(pp)]
    first_blocks = max(0, min(parts[1], args.n_layers + 1) - 1)
    return max(loads), first_blocks


def _tp_params(args: ModelArgs, params: int, tp: int) -> int:
    """Parameters per TP rank: every matrix (and the vocabulary) split, the norms, MoE routers and shared-expert
    gates replicated."""
    if tp == 1:
        return params
    whole = (2 * args.n_layers + 1) * args.dim
    whole += args.n_moe_layers * (args.n_experts + int(args.moe_shared_gate)) * args.dim
    return (params - whole) // tp + whole


def expert_params(args: ModelArgs) -> int:
    """Routed experts' parameters of the model (gate_up_proj + down_proj of every MoE layer)."""
    return args.n_moe_layers * args.n_experts * 3 * args.expert_dim * args.dim


def analytic_moe_tp_bytes(args: ModelArgs, tp: int, tokens: int, elem: int = 4) -> float:
    """Tensor-parallel bytes one rank sends in a forward + backward of ``tokens`` tokens for its MoE layers
    (`parallel.moe_tp`), ring-counted as `tools/bench.py tp-comm` counts them: per MoE layer what a dense MLP
    sends, the output all-reduce forward and the experts' input all-reduce backward (under sequence parallelism
    the input all-gathered before routing and the output reduce-scattered, forward, and their duals backward: the
    same bytes), plus the backward all-reduces of the routing weights (tokens x top_k) and of the shared-expert gate
    (tokens, when gated)."""
    if tp == 1 or not args.n_moe_layers:
        return 0.0
    ring = (tp - 1) / tp
    act = tokens * args.dim * elem
    small = 2 * ring * tokens * (args.moe_top_k + int(args.moe_shared_gate)) * elem
    return args.n_moe_layers * (4 * ring * act + small)


def analytic_ep_bytes(args: ModelArgs, ep: int, tokens: int, elem: int = 4) -> float:
    """All-to-all bytes one expert-parallel rank sends in a forward + backward of ``tokens`` tokens, balanced
    routing: per MoE layer tokens * top_k copies, (ep - 1) / ep of them to other ranks, four times (dispatch and
    return, forward and backward) as (dim,) rows (`tools/bench.py ep-comm` counts them)."""
    return args.n_moe_layers * 4 * tokens * args.moe_top_k * (ep - 1) / ep * args.dim * elem


def _ep_model_states(args: ModelArgs, lay: Layout) -> dict[str, float]:
    """`model_states` under expert parallelism (pp = 1, ZeRO 1-2): the dense parameters as usual over the dp ranks
    (split over tp), each rank's E / ep experts (E / ep experts' 1 / tp slices under TP) sharded by ZeRO over the
    dp / ep ranks that hold the same experts."""
    experts = expert_params(args)
    dense = _tp_params(args, args.num_params() - experts, lay.tp)
    parts = ((dense, lay.dp), (experts / (lay.ep * lay.tp), lay.dp // lay.ep))
    out = {"params": 0.0, "grads": 0.0, "optimizer": 0.0, "host": 0.0, "grads_transient": lay.dtype == "fp32"}
    for p, dp in parts:
        if lay.dtype == "fp32":
            weights, grads, optim = 4 * p, 4 * p / (dp if lay.zero >= 2 else 1), 12 * p / dp
        else:
            weights, grads, optim = 2 * p, 2 * p / (dp if lay.zero == 2 else 1), 16 * p / dp
        if lay.offload != "none":
            out["host"] += optim
            optim = 0.0
            grads = 0.0 if lay.dtype != "fp32" else grads
        out["params"] += weights
        out["grads"] += grads
        out["optimizer"] += optim
    return out


def model_states(args: ModelArgs, lay: Layout) -> dict[str, float]:
    """Bytes of weights, gradients and optimizer states per device (and in host memory with offload)."""
    if lay.ep > 1:
        return _ep_model_states(args, lay)
    staged, _ = _stage_params(args, lay.pp)
    p = _tp_params(args, staged, lay.tp)
    dp = lay.dp
    shard = dp if lay.zero >= 1 else 1
    if lay.dtype == "fp32":
        weights = 4 * p / (dp if lay.zero == 3 else 1)
        grads = 4 * p / (dp if lay.zero >= 2 else 1)
        optim = 8 * p / shard + (4 * p / shard if lay.zero >= 1 else 0)
        host = 0.0
        if lay.offload != "none":
            host, optim = optim, 0.0
            if lay.offload == "all":
                host, weights = host + weights, 0.0
        return {"params": weights, "grads": grads, "optimizer": optim, "host": host, "grads_transient": True}
    # bf16 mixed precision, as DeepSpeed's estimators count it
    q_width = args.n_heads * args.head_dim
    experts = args.n_experts * 2 * args.expert_dim * args.dim if args.n_moe_layers else 0  # stacked gate_up_proj
    largest_layer = max(args.vocab_size * args.dim, args.dim * args.ffn_dim, args.dim * q_width, experts) // lay.tp
    host = 16 * p / dp if lay.offload != "none" else 0.0  # this rank's offloaded optimizer partition
    if lay.zero == 3:  # the largest layer gathered whole (weights and gradients) + 18 bytes / parameter sharded
        weights = (0 if lay.offload == "all" else 2 * p / dp) + 4 * largest_layer
        grads, optim = 0.0, 0.0 if lay.offload != "none" else 16 * p / dp
        if lay.offload == "all":
            host += 2 * p / dp
    elif lay.offload != "none":  # gradients stream to the host partition as they are reduced
        weights, grads, optim = 2 * p, 0.0, 0.0
    else:  # ZeRO-2 shards the bf16 gradients too
        weights, grads, optim = 2 * p, 2 * p / (dp if lay.zero == 2 else 1), 16 * p / dp
    return {"params": weights, "grads": grads, "optimizer": optim, "host": host, "grads_transient": False}


def activation_bytes(args: ModelArgs, lay: Layout) -> tuple[float, float, float]:
    """(activations saved for backward, logits workspace, one block's activations) in bytes on the first
    pipeline stage."""
    D, F_ = args.dim, args.ffn_dim
    Dkv = args.kv_heads * args.head_dim
    t = lay.tp
    split_d = t if lay.sequence_parallel else 1
    b = 2 if lay.dtype == "bf16" else 4
    if lay.fused:  # (6 D + 2 Dkv + 3 F) b: h, n1, h2, n2; q, k, v, out; gate, up, product
        resid, attn, mlp = 4 * D * b / split_d, (2 * D + 2 * Dkv) * b / t, 3 * F_ * b / t
    elif lay.dtype == "fp32":  # (8 D + 2 Dkv + 4 F) * 4
        resid, attn, mlp = 6 * D * b / split_d, (2 * D + 2 * Dkv) * b / t, 4 * F_ * b / t
    else:  # bf16 reference: norms keep an fp32 copy of their input, their bf16 output and normalised value
        resid, attn, mlp = 16 * D / split_d, (2 * D + 2 * Dkv) * 2 / t, 8 * F_ / t
    if args.n_moe_layers:  # the mean FFN part over the layers, MoE layers counted per token as below
        moe = _moe_mlp_bytes(args, b, t)
        mlp = (args.n_moe_layers * moe + (args.n_layers - args.n_moe_layers) * mlp) / args.n_layers
    full = resid + attn + mlp  # per token per layer
    inp = D * b / split_d  # a fully checkpointed block keeps its input only
    _, first_blocks = _stage_params(args, lay.pp)
    layers = first_blocks
    ckpt = -(-layers // lay.ac_every) if lay.ac != "none" else 0
    if lay.ac == "full":
        per_token = ckpt * inp + (layers - ckpt) * full + full  # + the block being recomputed
    elif lay.ac == "selective":
        per_token = ckpt * (full - attn) + (layers - ckpt) * full + attn
    else:
        per_token = layers * full
    if lay.pp == 1:
        per_token += 3 * D * b / split_d  # final norm: input, normalised value, output
    tokens = lay.micro_batch * lay.seq
    in_flight = lay.pp  # 1F1B: the first stage holds up to pp micro-batches
    acts = per_token * tokens * in_flight
    logits = 0.0
    if lay.pp == 1 and not lay.fused_ce:  # (the last stage of a pipeline holds one micro-batch's)
        per_logit = 8 + (2 if lay.dtype == "bf16" else 0)  # fp32 logits + log-softmax (+ bf16 head output)
        logits = per_logit * args.vocab_size / t * tokens
    return acts, logits, full * tokens


def _moe_mlp_bytes(args: ModelArgs, b: int, tp: int = 1) -> float:
    """Saved activations of one MoE FFN per token (reference ops): fp32 router logits and probabilities (2 E x 4),
    and per routed copy (top_k of them) its gathered input, gate_up output, silu(gate), product and expert
    output (3 D + 4 I) b; a shared expert keeps what a dense SwiGLU keeps (4 F_shared b). Under TP the router
    and the (D) rows are whole on every rank (all tokens: under sequence parallelism too), the hidden units split."""
    routed = args.moe_top_k * (3 * args.dim + 4 * args.expert_dim / tp) * b
    return 8 * args.n_experts + routed + 4 * (args.moe_shared_ffn_dim or 0) * b / tp


def estimate(args: ModelArgs, lay: Layout) -> dict[str, float]:
    """Every part in bytes and the peak, per device."""
    check(args, lay)
    states = model_states(args, lay)
    acts, logits, block = activation_bytes(args, lay)
    # ZeRO's gradient buckets: one buffer of reduce_bucket_size elements, two with overlap_comm (zero2/3.json)
    buckets = 0.0 if lay.zero == 0 else lay.reduce_bucket * (4 if lay.dtype == "fp32" else 2) * (
        2 if lay.zero >= 2 else 1)
    static = states["params"] + states["optimizer"] + buckets + (0 if states["grads_transient"] else states["grads"])
    # fp32: gradients exist from backward on; at the first block's backward they are all there, beside that
    # block's activations (recomputed or kept)
    transient = max(acts + logits, states["grads"] + block) if states["grads_transient"] else acts + logits
    elem = 4 if lay.dtype == "fp32" else 2
    tokens = lay.micro_batch * lay.seq
    expert_bytes = expert_params(args) / (lay.ep * lay.tp) * elem  # this rank's expert weights
    return {"params": states["params"], "grads": states["grads"], "optimizer": states["optimizer"],
            "buckets": buckets, "activations": acts, "logits": logits, "peak": static + transient,
            "host": states["host"], "expert_weights": expert_bytes,
            "all_to_all_sent": analytic_ep_bytes(args, lay.ep, tokens, elem) if lay.ep > 1 else 0.0,
            "moe_tp_sent": analytic_moe_tp_bytes(args, lay.tp, tokens, elem)}


def suggest(args: ModelArgs, device_gb: float, *, gpus: int, seq: int, reduce_bucket: int = 500_000_000
            ) -> list[tuple[Layout, dict[str, float]]]:
    """Layouts that fit ``device_gb`` (10% and 1 GB kept free), fastest-looking first: least offload, lowest
    ZeRO stage, least recomputation, largest micro-batch."""
    budget = device_gb * GB * 0.9 - GB
    found = []
    tps = [t for t in (1, 2, 4, 8) if t <= gpus and gpus % t == 0]
    for offload, zero, ac, tp, mb in itertools.product(OFFLOAD, (0, 1, 2, 3), AC_SEARCH, tps, (8, 4, 2, 1)):
        lay = Layout(gpus=gpus, tp=tp, zero=zero, offload=offload, micro_batch=mb, seq=seq, ac=ac,
                     fused_ce=tp == 1, reduce_bucket=reduce_bucket)
        try:
            est = estimate(args, lay)
        except EstimateError:
            continue
        if est["peak"] <= budget:
            found.append((lay, est))
    return found


def _fmt(x: float) -> str:
    return f"{x / GB:8.2f} GB"


def main(argv: list[str] | None = None) -> int:
    p = ToolParser(prog="tools/estimate_memory.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="llama3-1b", help="model preset (model/args.py)")
    p.add_argument("--set", nargs="*", default=[], metavar="FIELD=INT", help="ModelArgs overrides, e.g. n_layers=8")
    p.add_argument("--gpus", type=int, default=1, help="devices in the job (world size)")
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--pp", type=int, default=1)
    p.add_argument("--ep", type=int, default=1, help="expert-parallel degree (parallel.ep; MoE, ZeRO 1-2)")
    p.add_argument("--zero", type=int, default=0, help="ZeRO stage 0-3")
    p.add_argument("--offload", default="none", help="none | optimizer | all (optimizer and parameters, ZeRO-3)")
    p.add_argument("--micro-batch", type=int, default=1)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--ac", default="none", help="activation checkpointing: none | selective | full")
    p.add_argument("--ac-every", type=int, default=1)
    p.add_argument("--sp", action="store_true", help="sequence parallelism (tp > 1)")
    p.add_argument("--reduce-bucket", type=float, default=5e8,
                   help="DeepSpeed reduce_bucket_size in elements (ZeRO 1-3; ds_configs/rtx3060.json: 2e8)")
    p.add_argument("--fused-ce", action="store_true", help="fused linear cross-entropy (no logits)")
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"],
                   help="cuda: bf16 with fused ops; cpu: the reference ops (and --dtype fp32)")
    p.add_argument("--dtype", default=None, help="bf16 | fp32 (default: bf16 on cuda, fp32 on cpu)")
    p.add_argument("--suggest", default=None, metavar="DEVICE",
                   help=f"list layouts that fit: {', '.join(DEVICES)} or a size in GB")
    p.add_argument("--json", type=Path, help="also write the result here")
    ns = p.parse_args(argv)
    try:
        try:
            overrides = {k: int(v) for k, v in (item.split("=", 1) for item in ns.set)}
            args = dataclasses.replace(get_preset(ns.preset), **overrides).validate()
        except (ModelConfigError, ValueError, TypeError) as e:
            raise EstimateError(str(e)) from None
        result: dict = {"preset": ns.preset, "overrides": overrides, "params": args.num_params(),
                        "active_params": args.num_active_params()}
        active = f", {args.num_active_params():,} active per token (MoE)" if args.n_moe_layers else ""
        if ns.suggest is not None:
            gb = DEVICES.get(ns.suggest.lower().removeprefix("rtx"))
            if gb is None:
                try:
                    gb = float(ns.suggest)
                except ValueError:
                    raise EstimateError(f"--suggest {ns.suggest}: use {', '.join(DEVICES)} or a size in GB") from None
            fits = suggest(args, gb, gpus=ns.gpus, seq=ns.seq, reduce_bucket=int(ns.reduce_bucket))
            if not fits:
                print(f"nothing fits {gb:g} GB per device for {ns.preset} at seq {ns.seq} on {ns.gpus} device(s): "
                      f"add devices or shorten --seq")
                return 1
            print(f"{ns.preset} ({args.num_params():,} parameters{active}), seq {ns.seq}, {ns.gpus} x {gb:g} GB: "
                  f"{len(fits)} layouts fit; the first ones:")
            for lay, est in fits[:5]:
                host = f", host {_fmt(est['host']).strip()}" if est["host"] else ""
                print(f"  zero {lay.zero}, offload {lay.offload}, tp {lay.tp}, ac {lay.ac}, micro-batch "
                      f"{lay.micro_batch}{', fused CE' if lay.fused_ce else ''}: peak {_fmt(est['peak']).strip()}"
                      f"{host}")
            result["suggestions"] = [{**dataclasses.asdict(lay), **est} for lay, est in fits[:5]]
        else:
            dtype = ns.dtype or ("bf16" if ns.device == "cuda" else "fp32")
            lay = Layout(gpus=ns.gpus, tp=ns.tp, pp=ns.pp, ep=ns.ep, zero=ns.zero, offload=ns.offload,
                         micro_batch=ns.micro_batch, seq=ns.seq, ac=ns.ac, ac_every=ns.ac_every, dtype=dtype,
                         fused=ns.device == "cuda", fused_ce=ns.fused_ce, sequence_parallel=ns.sp,
                         reduce_bucket=int(ns.reduce_bucket))
            est = estimate(args, lay)
            print(f"{ns.preset}: {args.num_params():,} parameters{active}; {lay.gpus} device(s) = dp {lay.dp} x tp {lay.tp} "
                  f"x pp {lay.pp}, ZeRO-{lay.zero}, offload {lay.offload}, {dtype}, micro-batch {lay.micro_batch} x "
                  f"{lay.seq}, checkpointing {lay.ac}")
            for key in ("params", "grads", "optimizer", "buckets", "activations", "logits", "peak", "host"):
                print(f"  {key:<12}{_fmt(est[key])}")
            if args.n_moe_layers:
                print(f"  expert weights on each rank ({args.n_experts // lay.ep} of {args.n_experts} experts per "
                      f"layer, 1/{lay.tp} of each): {_fmt(est['expert_weights']).strip()}")
            if lay.ep > 1:
                print(f"  all-to-all sent per rank and micro-batch (ep {lay.ep}, balanced routing): "
                      f"{_fmt(est['all_to_all_sent']).strip()}")
            if args.n_moe_layers and lay.tp > 1:
                print(f"  MoE layers' tensor-parallel bytes sent per rank and micro-batch (tp {lay.tp}"
                      f"{', sequence parallel' if lay.sequence_parallel else ''}): {_fmt(est['moe_tp_sent']).strip()}")
            result.update(layout=dataclasses.asdict(lay), estimate=est)
    except EstimateError as e:
        return report_error(e)
    if ns.json:
        ns.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
