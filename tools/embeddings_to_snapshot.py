"""Turn a full embedding matrix and its token list into an embedding snapshot (train/vocab/snapshot.py).

    python tools/embeddings_to_snapshot.py hf/base embeddings.pt tokens.txt --out runs/x/embeddings/imported
    python tools/embeddings_to_snapshot.py hf/base embed.safetensors tokens.json --out S --lm-head head.pt

MATRIX is the whole ``embed_tokens`` of an extended model, (rows, D): a tensor saved with torch.save (loaded
weights-only), or a safetensors / torch dict holding one 2-D tensor or one whose name ends in
``embed_tokens.weight``. TOKENS names its rows in order: one token per line, or a JSON list (for tokens with
newlines), as the tokenizer writes them (``convert_ids_to_tokens``). The base's own tokens must come first, each
at its id in the base tokenizer of MODEL_DIR, with rows equal to the base's embedding; the rest are the new
tokens, added to the base as ``train.vocab.extend`` does and given the matrix's rows. Rows past the token list
are padding and are left out. A base with an untied head needs ``--lm-head`` (its full matrix, same layout).
The snapshot then loads like any other (``vocab.snapshot``, ``tools/embedding_probe.py --snapshot``).
Bad input is one line, ``tessera: error: ...``, exit code 2.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors.torch import load_file
from transformers.utils import logging as hf_logging

from model.hf_causal import load_causal_lm
from tools import ToolParser, report_error
from train.checkpoint.safe_load import load
from train.checkpoint.writer import CheckpointError
from train.data.corpus import DataError
from train.data.tokenizer import load_tokenizer
from train.vocab.extend import VocabError, embedding_weights, extend_vocabulary
from train.vocab.snapshot import save_embedding_snapshot

NAME = "embed_tokens.weight"


def read_matrix(path: Path, what: str) -> torch.Tensor:
    """The (rows, D) matrix a file holds: a bare tensor, or one 2-D tensor (or ``*embed_tokens.weight``) of a
    dict."""
    if not path.is_file():
        raise VocabError(f"{what} {path}: no such file")
    try:
        saved = load_file(str(path)) if path.suffix == ".safetensors" else load(path)
    except (CheckpointError, OSError, RuntimeError) as e:
        raise VocabError(f"{what} {path}: cannot be read as a tensor file ({str(e).splitlines()[0]})") from None
    if isinstance(saved, dict):
        named = [k for k, v in saved.items() if isinstance(v, torch.Tensor) and k.endswith(NAME)]
        matrices = [k for k, v in saved.items() if isinstance(v, torch.Tensor) and v.dim() == 2]
        keys = named if len(named) == 1 else matrices
        if len(keys) != 1:
            raise VocabError(f"{what} {path}: holds {sorted(saved)[:6]}; expected one 2-D tensor or one named "
                             f"*{NAME}")
        saved = saved[keys[0]]
    if not isinstance(saved, torch.Tensor) or saved.dim() != 2:
        shape = tuple(saved.shape) if isinstance(saved, torch.Tensor) else type(saved).__name__
        raise VocabError(f"{what} {path}: holds {shape}, not a (rows, dim) matrix")
    return saved


def read_tokens(path: Path) -> list[str]:
    """The token of each row: a JSON list of strings, or one token per line."""
    if not path.is_file():
        raise VocabError(f"TOKENS {path}: no such file")
    try:
        text = path.read_text(encoding="utf-8")
        tokens = json.loads(text) if path.suffix == ".json" else None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise VocabError(f"TOKENS {path}: not UTF-8 text / JSON ({e})") from None
    if path.suffix == ".json":
        if not isinstance(tokens, list) or not all(isinstance(t, str) for t in tokens):
            raise VocabError(f"TOKENS {path}: expected a JSON list of strings")
        return tokens
    return text.split("\n")[:-1] if text.endswith("\n") else text.split("\n")


def convert(model_dir: Path, matrix_file: Path, tokens_file: Path, out: Path, *, head_file: Path | None = None,
            step: int = 0, overwrite: bool = False) -> Path:
    """Write the snapshot of the new rows; every check (order, base rows, shapes) runs before anything is
    written."""
    matrix, tokens = read_matrix(matrix_file, "MATRIX"), read_tokens(tokens_file)
    tokenizer = load_tokenizer(model_dir)
    base_vocab = len(tokenizer)
    base_tokens = tokenizer.convert_ids_to_tokens(list(range(base_vocab)))
    for i, (listed, own) in enumerate(zip(tokens, base_tokens, strict=False)):
        if listed != own:
            raise VocabError(f"TOKENS {tokens_file}: row {i} is {listed!r} but the base tokenizer's id {i} is "
                             f"{own!r}; the rows must follow the base tokenizer's order, new tokens after")
    new = tokens[base_vocab:]
    if not new:
        raise VocabError(f"TOKENS {tokens_file}: {len(tokens)} tokens, none after the base's {base_vocab}; there is "
                         f"no new row to snapshot")
    head = read_matrix(head_file, "--lm-head") if head_file is not None else None
    with _quiet_transformers():
        model = load_causal_lm(model_dir)
    emb = model.get_input_embeddings().weight
    tied = model.get_output_embeddings() is not None and model.get_output_embeddings().weight is emb
    if not tied and head is None:
        raise VocabError(f"{model_dir}: the base's head is not tied to its embedding; give --lm-head with the "
                         f"head's full matrix")
    for what, m in (("MATRIX", matrix), ("--lm-head", head)):
        if m is None:
            continue
        if m.shape[0] < len(tokens) or m.shape[1] != emb.shape[1]:
            raise VocabError(f"{what}: shape {tuple(m.shape)}; expected at least {len(tokens)} rows (one per token) "
                             f"of the base's width {emb.shape[1]}")
    bases = [(matrix, emb)] + ([(head, model.get_output_embeddings().weight)] if head is not None else [])
    for m, own in bases:
        diff = (m[:base_vocab].float() - own[:base_vocab].detach().float()).abs().max().item()
        if diff > 1e-3 * max(1.0, own.detach().float().abs().max().item()):
            raise VocabError(f"the base tokens' rows differ from {model_dir}'s (max |difference| {diff:.3g}); this "
                             f"matrix is not an embedding-only extension of that base")
    info = extend_vocabulary(model, tokenizer, new)
    if list(info.new_ids) != list(range(base_vocab, base_vocab + len(new))):
        raise VocabError(f"the new tokens landed at ids {info.new_ids[:3]}..., not right after the base's "
                         f"{base_vocab}; check the token list")
    params = embedding_weights(model, info)
    rows = slice(base_vocab, base_vocab + len(new))
    with torch.no_grad():
        for param, m in zip(params, [matrix, head] if head is not None else [matrix], strict=True):
            param[rows] = m[rows].to(param.dtype)
    return save_embedding_snapshot(model, info, out, step, tokenizer=tokenizer, overwrite=overwrite)


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """No loading bar while the base loads, so an error after it stays one line."""
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if bars:
            hf_logging.enable_progress_bar()


def build_parser() -> argparse.ArgumentParser:
    p = ToolParser(prog="tools/embeddings_to_snapshot.py", description=__doc__.split("\n\n")[0])
    p.add_argument("model_dir", type=Path, help="the base: a local HF model directory with its tokenizer")
    p.add_argument("matrix", type=Path, help="the full embed_tokens matrix (.pt / .safetensors)")
    p.add_argument("tokens", type=Path, help="the token of each row: one per line, or a .json list")
    p.add_argument("--out", type=Path, required=True, help="the snapshot directory to write")
    p.add_argument("--lm-head", type=Path, default=None, help="an untied head's full matrix (same layout)")
    p.add_argument("--step", type=int, default=0, help="the step the snapshot records (default 0)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        out = convert(args.model_dir, args.matrix, args.tokens, args.out, head_file=args.lm_head, step=args.step,
                      overwrite=args.overwrite)
    except (DataError, OSError) as err:
        return report_error(err)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
