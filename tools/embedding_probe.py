"""Probe the embeddings of a (vocabulary-extended) HF causal LM: norms, isotropy, neighbours, loss, perplexity.

Examples:
    python tools/embedding_probe.py hf/base --snapshot runs/x/embeddings/step_00000500 --neighbours zorbl fox
    python tools/embedding_probe.py hf/base --snapshot S --metrics runs/x/metrics.jsonl --eval-text val.txt \\
        --seq-len 256 --json probe.json
    python tools/embedding_probe.py hf/extended --base-vocab 32000      # a saved, already extended model

MODEL_DIR is a local HF model directory (config.json + weights, and the tokenizer unless --tokenizer).
With --snapshot the base is extended from an embedding snapshot (train.vocab.snapshot), which
also tells base rows (ids < base vocab size) from new ones; otherwise --base-vocab N does.

Reported: L2-norm statistics (mean, std, min, max) of base and new rows of the input embedding and of
an untied head; isotropy = the mean cosine between distinct rows of a seeded sample (0 for orthogonal
rows, 1 for identical ones, about 0 for random high-dimensional ones); the nearest neighbours by cosine
of chosen tokens; the loss curve of a metrics file (train "loss" and eval "val_loss" rows by "step");
and the perplexity of a held-out text file split into blocks of --seq-len tokens. --json OUT writes it
all as JSON. Bad input is one line, `tessera: error: ...`, exit code 2.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import sys
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from model.hf_causal import load_causal_lm, quantization_config
from tools import ToolParser, report_error
from tools.plot_metrics import MetricsError, read_metrics
from train.data.corpus import DataError
from train.data.dataset import BlockDataset
from train.data.tokenizer import load_tokenizer
from train.eval.loss import TokenLoss
from train.objectives.lm import lm_loss
from train.vocab.extend import VocabError, encode_blocks, is_single_token
from train.vocab.snapshot import load_embedding_snapshot


@dataclass
class NormStats:
    """L2-norm statistics of a set of embedding rows."""

    count: int  # rows measured
    mean: float  # mean L2 norm
    std: float  # population standard deviation of the norms
    min: float  # smallest norm
    max: float  # largest norm


def norm_stats(weight: torch.Tensor, ids: Sequence[int]) -> NormStats:
    """Norm statistics of rows `ids` of a 2-D weight (computed in float32)."""
    if len(ids) == 0:
        raise VocabError("norm_stats: ids=[]; pass at least one row id")
    norms = weight.detach()[torch.as_tensor(list(ids))].float().norm(dim=1)  # (N,)
    return NormStats(len(ids), norms.mean().item(), norms.std(correction=0).item(), norms.min().item(),
                     norms.max().item())


def isotropy(weight: torch.Tensor, ids: Sequence[int], *, sample: int = 512, seed: int = 0) -> float:
    """Mean cosine similarity over distinct pairs of rows, on a seeded sample of at most `sample` of `ids`.

    A zero row counts as cosine 0 with every other row.
    """
    if len(ids) < 2 or sample < 2:
        raise VocabError(f"isotropy needs >= 2 rows (got {len(ids)} ids, sample={sample}); pass more rows")
    pick = torch.as_tensor(list(ids))
    if len(pick) > sample:
        pick = pick[torch.randperm(len(pick), generator=torch.Generator().manual_seed(seed))[:sample]]
    unit = F.normalize(weight.detach()[pick].float(), dim=1)  # (n, D)
    n = unit.shape[0]
    cos_sum = (unit.sum(dim=0) ** 2).sum() - (unit * unit).sum()  # sum over i != j of <u_i, u_j>
    return (cos_sum / (n * (n - 1))).item()


def nearest_neighbours(
    weight: torch.Tensor, row: int, *, k: int = 5, limit: int | None = None, exclude_self: bool = False
) -> list[tuple[int, float]]:
    """The `k` rows among [0, limit) most similar by cosine to row `row`: [(id, cosine)], best first."""
    rows = weight.detach()[: limit or weight.shape[0]].float()  # (V, D)
    if not 0 <= row < rows.shape[0]:
        raise VocabError(f"row={row} is outside the {rows.shape[0]} rows searched")
    cos = F.normalize(rows, dim=1) @ F.normalize(rows[row], dim=0)  # (V,)
    if exclude_self:
        cos[row] = -math.inf
    top = torch.topk(cos, min(k, rows.shape[0] - int(exclude_self)))
    return [(int(i), float(c)) for c, i in zip(top.values, top.indices)]


def token_id(tokenizer: Any, token: str) -> int:
    """The id of `token`: a vocabulary entry as written, else the single token that the word encodes to."""
    vocab = tokenizer.get_vocab()
    if token in vocab:
        return int(vocab[token])
    if is_single_token(tokenizer, token):
        for text in (token, " " + token):
            ids = tokenizer.encode(text, add_special_tokens=False)
            if len(ids) == 1:
                return int(ids[0])
    pieces = tokenizer.convert_ids_to_tokens(tokenizer.encode(token, add_special_tokens=False))
    raise VocabError(f"--neighbours {token!r} is not one token (it encodes to {pieces}); pass a vocabulary entry")


def loss_curve(path: Path | str, *, max_rows: int = 20) -> list[dict[str, Any]]:
    """Rows {step, loss, val_loss} of a metrics.jsonl: at most `max_rows` train rows (evenly spaced, first and
    last kept) and every eval row, merged by step; a missing value is None."""
    metrics = read_metrics(Path(path))
    train = metrics.train
    if len(train) > max_rows:
        keep = np.unique(np.linspace(0, len(train) - 1, max_rows).round().astype(int))
        train = [train[i] for i in keep]
    merged: dict[int, dict[str, Any]] = {}
    for r in train:
        merged.setdefault(int(r["step"]), {"step": int(r["step"]), "loss": None, "val_loss": None})["loss"] = r["loss"]
    for r in metrics.evals:
        row = merged.setdefault(int(r["step"]), {"step": int(r["step"]), "loss": None, "val_loss": None})
        row["val_loss"] = r["val_loss"]
    return [merged[s] for s in sorted(merged)]


def format_loss_table(rows: Sequence[dict[str, Any]]) -> str:
    """A fixed-width text table of `loss_curve` rows."""
    def cell(value: float | None) -> str:
        return f"{value:>10.4f}" if value is not None else f"{'-':>10}"

    lines = [f"{'step':>8} {'loss':>10} {'val_loss':>10}"]
    lines += [f"{r['step']:>8} {cell(r['loss'])} {cell(r['val_loss'])}" for r in rows]
    return "\n".join(lines)


def eval_perplexity(model: torch.nn.Module, data: BlockDataset, *, batch_size: int = 4) -> dict[str, float]:
    """Mean next-token loss and perplexity of `model` over every block of `data` (no grad, eval mode).

    The model's train/eval mode is restored afterwards (load 4-bit models with `model.hf_causal.load_causal_lm`,
    which keeps bitsandbytes from repacking them for inference).
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    totals = TokenLoss(device)
    try:
        with torch.no_grad():
            for start in range(0, len(data), batch_size):
                x, y = data.batch(np.arange(start, min(start + batch_size, len(data))))[:2]
                y = y.to(device)
                logits = model(input_ids=x.to(device)).logits  # (B, T, V)
                totals.add(lm_loss(logits, y, reduction="sum"), (y != -100).sum())
    finally:
        model.train(was_training)
    return {"loss": totals.mean_loss, "ppl": totals.perplexity, "tokens": totals.tokens, "blocks": len(data)}


def _matrix_report(weight: torch.Tensor, base: list[int], new: list[int], sample: int, seed: int) -> dict[str, Any]:
    report: dict[str, Any] = {"base": asdict(norm_stats(weight, base)), "new": None, "isotropy_new": None}
    report["isotropy_base"] = isotropy(weight, base, sample=sample, seed=seed)
    if new:
        report["new"] = asdict(norm_stats(weight, new))
        report["isotropy_new"] = isotropy(weight, new, sample=sample, seed=seed) if len(new) > 1 else None
    return report


def probe(args: argparse.Namespace) -> dict[str, Any]:
    """Everything the command line asks for, as one JSON-serialisable dict."""
    if not (args.model_dir / "config.json").is_file():
        raise VocabError(f"model_dir={args.model_dir}: no config.json; pass a directory written by save_pretrained")
    tokenizer = load_tokenizer(args.tokenizer or args.model_dir)
    quant = quantization_config("4bit", compute_dtype=torch.float32) if args.load_in_4bit else None
    model = load_causal_lm(args.model_dir, dtype=getattr(torch, args.dtype), quantization=quant)
    result: dict[str, Any] = {"model": str(args.model_dir), "snapshot": None, "step": None}
    base_vocab = len(tokenizer) if args.base_vocab is None else args.base_vocab
    if args.snapshot is not None:
        info, step = load_embedding_snapshot(model, tokenizer, args.snapshot)
        result.update(snapshot=str(args.snapshot), step=step)
        base_vocab = info.base_vocab_size
    vocab = len(tokenizer)
    if not 2 <= base_vocab <= vocab:
        raise VocabError(f"--base-vocab {base_vocab} must be in [2, {vocab}] (the tokenizer has {vocab} tokens)")
    base, new = list(range(base_vocab)), list(range(base_vocab, vocab))
    emb = model.get_input_embeddings().weight
    head = model.get_output_embeddings()
    result["vocab"] = {"base_vocab_size": base_vocab, "vocab_size": vocab, "num_embeddings": emb.shape[0]}
    result["input"] = _matrix_report(emb, base, new, args.sample, args.seed)
    untied = head is not None and head.weight is not emb
    result["output"] = _matrix_report(head.weight, base, new, args.sample, args.seed) if untied else None
    result["neighbours"] = {}
    for token in args.neighbours:
        found = nearest_neighbours(emb, token_id(tokenizer, token), k=args.k, limit=vocab, exclude_self=True)
        result["neighbours"][token] = [
            {"id": i, "token": tokenizer.convert_ids_to_tokens(i), "cosine": c} for i, c in found
        ]
    result["loss_curve"] = loss_curve(args.metrics) if args.metrics else None
    result["eval"] = None
    if args.eval_text:
        if not args.eval_text.is_file():
            raise VocabError(f"--eval-text {args.eval_text}: no such file")
        data = encode_blocks(tokenizer, [args.eval_text.read_text(encoding="utf-8")], args.seq_len)
        result["eval"] = {"seq_len": args.seq_len, **eval_perplexity(model, data, batch_size=args.batch_size)}
    return result


def format_report(result: dict[str, Any]) -> str:
    """The human-readable report of `probe`'s result."""
    v = result["vocab"]
    head = f"model {result['model']}"
    if result["snapshot"]:
        head += f"  snapshot {result['snapshot']} (step {result['step']})"
    n_new = v["vocab_size"] - v["base_vocab_size"]
    lines = [head, f"vocab: {v['base_vocab_size']} base + {n_new} new tokens, {v['num_embeddings']} embedding rows"]
    for name in ("input", "output"):
        rep = result[name]
        if rep is None:
            continue
        for part in ("base", "new"):
            s = rep[part]
            if s is not None:
                iso = rep[f"isotropy_{part}"]
                lines.append(f"{name:>6} {part:<4} rows {s['count']:>7}  norm mean {s['mean']:.4f} std {s['std']:.4f} "
                             f"min {s['min']:.4f} max {s['max']:.4f}  isotropy "
                             f"{'-' if iso is None else f'{iso:.4f}'}")
    for token, found in result["neighbours"].items():
        lines.append(f"neighbours of {token!r}: " + ", ".join(f"{n['token']!r} {n['cosine']:.3f}" for n in found))
    if result["loss_curve"]:
        lines.append(format_loss_table(result["loss_curve"]))
    if result["eval"]:
        e = result["eval"]
        lines.append(f"eval: loss {e['loss']:.4f}  ppl {e['ppl']:.2f}  over {e['tokens']} tokens "
                     f"({e['blocks']} blocks of {e['seq_len']})")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    """Command-line options of this tool."""
    parser = ToolParser(prog="tools/embedding_probe.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model_dir", type=Path, help="local HF model directory (the base when --snapshot is given)")
    parser.add_argument("--snapshot", type=Path, help="embedding snapshot directory to extend the base with")
    parser.add_argument("--tokenizer", type=Path, help="tokenizer directory (default: MODEL_DIR)")
    parser.add_argument("--base-vocab", type=int, help="without --snapshot: ids >= N are the new tokens")
    parser.add_argument("--neighbours", nargs="+", default=[], metavar="TOKEN", help="tokens to find neighbours of")
    parser.add_argument("--k", type=int, default=5, help="neighbours per token (default 5)")
    parser.add_argument("--sample", type=int, default=512, help="rows sampled for isotropy (default 512)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the isotropy sample (default 0)")
    parser.add_argument("--metrics", type=Path, help="metrics.jsonl (or run dir) whose loss curve to print")
    parser.add_argument("--eval-text", type=Path, help="UTF-8 text file for held-out perplexity")
    parser.add_argument("--seq-len", type=int, default=256, help="block length for --eval-text (default 256)")
    parser.add_argument("--batch-size", type=int, default=4, help="blocks per forward for --eval-text (default 4)")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32",
                        help="dtype to load the model in; a snapshot needs the one it was made with")
    parser.add_argument("--load-in-4bit", action="store_true", help="load the body in nf4 (bitsandbytes)")
    parser.add_argument("--json", type=Path, help="also write the report as JSON to this file")
    return parser


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """Silence transformers' and bitsandbytes' loading chatter (restored afterwards), so errors stay one line."""
    from transformers.utils import logging as hf_logging

    bnb_logger = logging.getLogger("bitsandbytes")  # warns at import that the optional `kernels` is missing
    verbosity, bars, bnb_level = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled(), bnb_logger.level
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    bnb_logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        bnb_logger.setLevel(bnb_level)
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


def main(argv: list[str] | None = None) -> int:
    """Run the tool; returns the process exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    for name in ("k", "sample", "seq_len", "batch_size"):
        if getattr(args, name) < 1 or (name == "sample" and args.sample < 2):
            parser.error(f"--{name.replace('_', '-')} {getattr(args, name)} is too small")
    try:
        with _quiet_transformers():
            result = probe(args)
    except (DataError, MetricsError, OSError) as err:
        return report_error(err)
    print(format_report(result))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
