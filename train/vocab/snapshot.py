"""Embedding snapshots of a vocabulary extension: only the new rows, the tokenizer additions and the base's identity.

A snapshot is a directory (written to a temporary sibling and renamed into place, so a crash never
leaves a half-written one)::

    step_00000100/
      embeddings.safetensors   "input": (n_new, D) new input rows; "output": (n_new, D) new head rows
                               when the head is untied; same dtype as the model's embedding
      snapshot.json            {"format", "step", "info": ExtensionInfo, "added_tokens": [AddedToken fields]}

`load_embedding_snapshot(model, tokenizer, path)` takes a freshly loaded base model and its tokenizer,
checks that they are the base the snapshot was made from (`base_fingerprint`: model_type, hidden size,
embedding rows, tokenizer size, embedding dtype, whether the head is tied, and sha256 of the embedding
matrix and of an untied head; the body may be loaded differently, e.g. in 4-bit), repeats the
extension (same tokens, flags, ids and padding) and copies the saved rows in bitwise. It returns the
`ExtensionInfo` and the step; resuming with a fresh optimizer and schedule from that step is the
caller's part (call `freeze_all_but_new_rows` again first).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from train.data.corpus import atomic_dir
from train.vocab.extend import (
    ExtensionInfo,
    VocabError,
    base_fingerprint,
    embedding_weights,
    extend_vocabulary,
)

if TYPE_CHECKING:
    from tokenizers import AddedToken
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

SNAPSHOT_FORMAT = 1
"""Version of the snapshot layout; bumped when it changes."""
ROWS_FILE = "embeddings.safetensors"
META_FILE = "snapshot.json"
_ADDED_TOKEN_FLAGS = ("single_word", "lstrip", "rstrip", "normalized", "special")


def _added_tokens(tokenizer: PreTrainedTokenizerBase, info: ExtensionInfo) -> list[dict[str, Any]]:
    decoder = tokenizer.added_tokens_decoder
    tokens = []
    for token_id, text in zip(info.new_ids, info.new_tokens):
        added = decoder.get(token_id)
        if added is None or added.content != text:
            raise VocabError(
                f"the tokenizer has no added token {text!r} at id {token_id}; pass the tokenizer that "
                f"extend_vocabulary extended"
            )
        tokens.append({"content": text, **{flag: bool(getattr(added, flag)) for flag in _ADDED_TOKEN_FLAGS}})
    return tokens


def save_embedding_snapshot(
    model: PreTrainedModel,
    info: ExtensionInfo,
    path: Path | str,
    step: int,
    *,
    tokenizer: PreTrainedTokenizerBase | None = None,
    overwrite: bool = False,
) -> Path:
    """Write the new rows, `info`, `step` and the tokenizer additions to directory `path`, atomically.

    With `tokenizer` the added tokens' flags (lstrip, single_word, ...) are read from it and restored on
    load; without, only their strings are recorded and loading adds them as plain strings (as
    `extend_vocabulary` does for strings). An existing `path` is refused unless `overwrite`. Returns `path`.
    """
    from safetensors.torch import save_file

    if step < 0:
        raise VocabError(f"step={step} must be >= 0")
    params = embedding_weights(model, info)
    rows = slice(info.base_vocab_size, info.new_vocab_size)
    tensors = {"input": params[0][rows].detach().cpu().contiguous()}
    if not info.tied:
        tensors["output"] = params[1][rows].detach().cpu().contiguous()
    if tokenizer is not None:
        added = _added_tokens(tokenizer, info)
    else:
        added = [{"content": t} for t in info.new_tokens]
    meta = {"format": SNAPSHOT_FORMAT, "step": step, "info": info.to_dict(), "added_tokens": added}
    with atomic_dir(path, overwrite=overwrite) as tmp:
        save_file(tensors, str(tmp / ROWS_FILE), metadata={"format": str(SNAPSHOT_FORMAT), "step": str(step)})
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return Path(path)


def read_snapshot_meta(path: Path | str) -> dict[str, Any]:
    """The parsed snapshot.json of a snapshot directory (format checked): step, info, added_tokens."""
    directory = Path(path)
    meta_file, rows_file = directory / META_FILE, directory / ROWS_FILE
    if not meta_file.is_file() or not rows_file.is_file():
        raise VocabError(
            f"snapshot={directory}: no {META_FILE} and {ROWS_FILE} there; pass a directory written by "
            f"save_embedding_snapshot"
        )
    try:
        meta: dict[str, Any] = json.loads(meta_file.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise VocabError(f"{meta_file}: not JSON ({err}); the snapshot is damaged") from err
    if meta.get("format") != SNAPSHOT_FORMAT:
        raise VocabError(
            f"{meta_file}: format={meta.get('format')!r}, this code reads format {SNAPSHOT_FORMAT}; "
            f"load it with the version that wrote it"
        )
    return meta


def snapshot_tokens(meta: dict[str, Any]) -> list[str | AddedToken]:
    """The added tokens a snapshot records (with their flags), as `extend_vocabulary` takes them."""
    from tokenizers import AddedToken

    return [AddedToken(t["content"], **{f: t[f] for f in _ADDED_TOKEN_FLAGS}) if len(t) > 1 else t["content"]
            for t in meta["added_tokens"]]


def check_same_base(expected: dict[str, Any], actual: dict[str, Any], where: str) -> None:
    """Raise VocabError naming the first fingerprint field where the base in use differs from the snapshot's."""
    def shown(value: Any) -> Any:
        return value[:12] + "..." if isinstance(value, str) and len(value) == 64 else value  # a sha256

    for key in [*expected, *sorted(actual.keys() - expected.keys())]:
        if expected.get(key) != actual.get(key):
            hint = (
                "load the base with the dtype the snapshot was made with (dtype=...)"
                if key == "embedding_dtype"
                else "load the base model and tokenizer the snapshot was made from"
            )
            raise VocabError(
                f"{where} was made from another base: {key} is {shown(expected.get(key))!r} there but "
                f"{shown(actual.get(key))!r} here; {hint}"
            )


def load_embedding_snapshot(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, path: Path | str
) -> tuple[ExtensionInfo, int]:
    """Extend a fresh base `model` + `tokenizer` as the snapshot records and restore its rows bitwise.

    Refuses (VocabError, nothing changed) a base whose fingerprint differs from the snapshot's.
    Returns (info, step).
    """
    from safetensors.torch import load_file

    meta = read_snapshot_meta(path)
    saved = ExtensionInfo.from_dict(meta["info"])
    check_same_base(saved.base_fingerprint, base_fingerprint(model, tokenizer), f"snapshot={path}")
    tensors = load_file(str(Path(path) / ROWS_FILE))
    n_new = len(saved.new_ids)
    expected_keys = {"input"} if saved.tied else {"input", "output"}
    if set(tensors) != expected_keys or any(t.shape[0] != n_new for t in tensors.values()):
        shapes = {k: tuple(v.shape) for k, v in tensors.items()}
        raise VocabError(
            f"snapshot={path}: {ROWS_FILE} holds {shapes}, expected {sorted(expected_keys)} with {n_new} rows "
            f"each; the snapshot is damaged"
        )
    tokens = snapshot_tokens(meta)
    info = extend_vocabulary(
        model,
        tokenizer,
        tokens,
        init_scale=saved.init_scale,
        seed=saved.seed,
        pad_to_multiple_of=saved.pad_to_multiple_of,
    )
    if (info.new_ids, info.num_embeddings) != (saved.new_ids, saved.num_embeddings):
        raise VocabError(
            f"snapshot={path}: rebuilding gave ids {info.new_ids[:3]}... and {info.num_embeddings} rows, the "
            f"snapshot has {saved.new_ids[:3]}... and {saved.num_embeddings}; load the same base and tokenizer"
        )
    params = embedding_weights(model, info)
    rows = slice(info.base_vocab_size, info.new_vocab_size)
    with torch.no_grad():
        for param, key in zip(params, ("input", "output")):
            if tensors[key].dtype != param.dtype:
                raise VocabError(
                    f"snapshot={path}: {key} rows are {tensors[key].dtype}, the model's are {param.dtype}; "
                    f"load the base with the dtype it was trained in"
                )
            param[rows] = tensors[key].to(param.device)
    return info, int(meta["step"])
