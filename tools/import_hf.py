"""Check that a local Hugging Face Llama / Mistral / Qwen2 / Qwen3 model imports into Tessera; show what it becomes.

Examples:
    python tools/import_hf.py path/to/Qwen2.5-0.5B
    python tools/import_hf.py path/to/Mistral-7B --max-seq-len 4096 --check-logits
    python tools/import_hf.py --check path/to/Llama-3.2-1B     # one line: can the native model take it?

HF_DIR is a directory written by `save_pretrained` (config.json plus model.safetensors or an index and
its shards); nothing is fetched from the hub. The weights are read exactly as training would read them
(`model.hf.load_hf_pretrained`), and the resulting ModelArgs and parameter count are printed as JSON.
With --check-logits the model is also built twice, by transformers and by Tessera, and the largest
difference of their logits on a random batch is reported (exit code 1 above --tolerance).
A model Tessera cannot represent (yarn / dynamic RoPE, MLP biases, other layer types, ...) is reported in
one line ``tessera: error: ...`` naming the field, with exit code 2. --check reads only config.json and the weight file names and
prints one line: ``native: yes (<model_type>: <what the model uses>)`` with exit code 0, or
``native: no: <the field that stops it>`` with exit code 1.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path
from typing import Any

import torch

from model import ModelArgs, ModelConfigError, Transformer
from model.hf import hf_support, load_hf_config, load_hf_pretrained, weight_files
from tools import ToolParser, report_error

PROG = "import_hf"


def build_parser() -> argparse.ArgumentParser:
    """Command-line options of this tool."""
    parser = ToolParser(
        prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("hf_dir", type=Path, metavar="HF_DIR", help="local HF model directory")
    parser.add_argument("--max-seq-len", type=int, default=None,
                        help="longest training sequence (default: the config's max_position_embeddings)")
    parser.add_argument("--check-logits", action="store_true",
                        help="compare transformers' and Tessera's fp32 logits on a random batch")
    parser.add_argument("--check", action="store_true",
                        help="only say whether the native model can take HF_DIR, and which field stops it")
    parser.add_argument("--tolerance", type=float, default=1e-4,
                        help="largest accepted logit difference for --check-logits (default: %(default)s)")
    return parser


def max_logit_diff(hf_dir: Path, args: ModelArgs, state: dict[str, torch.Tensor], *, seed: int = 0) -> float:
    """Largest |logit| difference between transformers' model of `hf_dir` and Tessera's, in fp32.

    The batch is 2 random sequences of min(32, max_seq_len) tokens.
    """
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32).eval()
    model = Transformer(args).eval()
    model.load_state_dict(state)  # copies, casting to the model's fp32 parameters
    tokens = torch.randint(0, args.vocab_size, (2, min(32, args.max_seq_len)),
                           generator=torch.Generator().manual_seed(seed))  # (B, T)
    with torch.no_grad():
        return (model(tokens) - hf(tokens, use_cache=False).logits.float()).abs().max().item()


def summary(hf_dir: Path, args: ModelArgs, state: dict[str, torch.Tensor]) -> dict[str, Any]:
    """What was imported: HF model type and files, the ModelArgs and parameter counts."""
    stored = {str(t.dtype).removeprefix("torch.") for t in state.values()}
    return {
        "hf_dir": str(hf_dir),
        "model_type": load_hf_config(hf_dir).model_type,
        "weight_files": [f.name for f in weight_files(hf_dir)],
        "model_args": dataclasses.asdict(args),
        "num_params": args.num_params(),
        "num_params_without_embeddings": args.num_params(include_embeddings=False),
        "stored_dtypes": sorted(stored),
    }


def features(args: ModelArgs) -> str:
    """The optional architecture pieces `args` uses, in words (``plain`` when none)."""
    parts = [f"rope {args.rope_type} x{args.rope_factor:g}" if args.rope_type != "default" else "",
             f"head_dim {args.head_dim}" if not args.head_dim_is_derived else "",
             "q/k norm" if args.qk_norm else "", "q/k/v+o biases" if args.o_bias else
             ("q/k/v biases" if args.attn_bias else ""),
             f"window {args.sliding_window}" + (f" on layers {args.sliding_layers}" if args.sliding_layers else "")
             if args.sliding_window else "", "tied" if args.tie_embeddings else "",
             f"{args.n_experts} experts top-{args.moe_top_k} on {args.n_moe_layers}/{args.n_layers} layers"
             + (" + shared expert" if args.moe_shared_ffn_dim else "") if args.n_moe_layers else ""]
    return ", ".join(p for p in parts if p) or "plain"


def check(hf_dir: Path) -> int:
    """The --check line: whether the native path takes `hf_dir`; exit code 0 (yes) or 1 (no)."""
    args, why = hf_support(hf_dir)
    if args is None:
        print(f"native: no: {why}")
        return 1
    print(f"native: yes ({load_hf_config(hf_dir).model_type}: {features(args)})")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Run the tool; returns the process exit code."""
    opts = build_parser().parse_args(argv)
    if opts.check:
        return check(opts.hf_dir)
    try:
        args, state = load_hf_pretrained(opts.hf_dir, max_seq_len=opts.max_seq_len, dtype=None)
        report = summary(opts.hf_dir, args, state)
    except ModelConfigError as err:
        return report_error(err)
    code = 0
    if opts.check_logits:
        diff = max_logit_diff(opts.hf_dir, args, state)
        report["max_logit_diff"] = diff
        if diff > opts.tolerance:
            code = report_error(f"logits differ by {diff:.3g} > --tolerance {opts.tolerance}", code=1)
    print(json.dumps(report, indent=2))
    return code


if __name__ == "__main__":
    sys.exit(main())
