"""Embedding-only vocabulary extension of a Hugging Face causal LM (full precision or 4-bit bitsandbytes base).

The recipe adds the words of a lexicon to the tokenizer as whole tokens, gives each a new embedding
row, and trains only those rows; every other weight of the model stays bitwise what it was.
The calls, in order (the training loop itself belongs to the caller)::

    words = read_lexicon("lexicon.txt")                        # one token per line
    new = plan_new_tokens(tokenizer, words)                    # those that are not one token yet
    info = extend_vocabulary(model, tokenizer, new, init_scale=1.0, seed=0)
    params = freeze_all_but_new_rows(model, info)              # after extend_vocabulary, before the optimizer
    opt = torch.optim.AdamW([{"params": params, "weight_decay": 0.0}], lr=1e-3)
    data = encode_blocks(tokenizer, texts, seq_len=512)        # text tokenized with the extended tokenizer
    ... train ...
    save_embedding_snapshot(model, info, "runs/x/embeddings/step_00000100", 100, tokenizer=tokenizer)
    # later, on a freshly loaded base and its tokenizer (then freeze again, fresh optimizer from `step`):
    info, step = load_embedding_snapshot(model, tokenizer, "runs/x/embeddings/step_00000100")

What "new" means: a lexicon entry is already known when encoding it on its own, or after a space (no
special tokens), gives exactly one token id that is not the unknown token; otherwise it is new. The
second form matters for byte-level BPEs, which hold words as they occur in running text ("Ġthe"):
"the" is known there even when the vocabulary has no space-less "the". New tokens are
added with `tokenizer.add_tokens` (plain, non-special added tokens): the tokenizer then matches
them anywhere in raw text before its own splitting, so "zorbl" also matches inside "zorbling", and
with a byte-level BPE the space before a new token becomes a token of its own.

Rows and ids: new token i gets id `base_vocab_size + i` (`base_vocab_size` = tokenizer size before).
Embedding rows are only added when the model has fewer than the new tokenizer size (some HF models
already carry spare rows past their tokenizer; the new tokens then use those rows) and, with
`pad_to_multiple_of`, up to the next multiple. Rows the resize creates that belong to no token are
set to zero and stay frozen (their logit is 0; mask them when sampling if that matters).

Initialisation: each new row is a random direction (seeded Gaussian, normalised; drawn on the CPU,
so the same on every device) scaled to `init_scale` x the mean L2 norm of the base token rows
(ids < base_vocab_size). An untied head gets its new rows the same way from its own base-row norms
(and, if it has a bias, the mean base bias for new tokens). A tied head stays tied: the input
embedding and the head remain one Parameter, which is checked after the resize.

Training only the new rows: `freeze_all_but_new_rows` turns off requires_grad everywhere except the
input embedding and an untied head, and a gradient hook on those sets the gradient of every row that
is not a new token to exactly 0. Under AdamW a parameter row whose gradient is always 0 keeps zero
moments and gets a zero update, so base rows stay bitwise unchanged PROVIDED the optimizer group of
these parameters has weight_decay=0 (decoupled decay would shrink every row). Build the optimizer
after `freeze_all_but_new_rows`: resizing replaces the embedding Parameters. With DeepSpeed, extend and
freeze before `deepspeed.initialize`; this is tested with torch.optim.AdamW in one process, not yet
under ZeRO (ZeRO-3 partitions the embedding, which `extend_vocabulary` needs whole).

4-bit bases: transformers' bitsandbytes integration quantizes the linear layers of the body but
never the input embedding (an `nn.Embedding`) nor the output head (`lm_head` is kept out of
quantization by default), so both stay in the load dtype and both train here; a head that was
quantized anyway (custom `llm_int8_skip_modules`) is refused. On CPUs with AVX512-BF16, one forward of
a 4-bit model in eval mode under no_grad repacks its weights for inference, after which backward gives
wrong gradients without any error: load 4-bit models with `model.hf_causal.load_causal_lm`, which turns
that repacking off.

Snapshots (new rows + tokenizer additions + a fingerprint of the base) are in
`train.vocab.snapshot`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from train.data.corpus import DataError
from train.data.dataset import BlockDataset

if TYPE_CHECKING:
    from tokenizers import AddedToken
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

_HOOK_ATTR = "_embed_extend_row_hook"
_NORM_CHUNK = 8192  # rows per chunk when measuring norms (bounds the float32 copy of a large matrix)


class VocabError(DataError):
    """A lexicon, a token list, a model or a snapshot cannot be used for vocabulary extension."""


@dataclasses.dataclass
class ExtensionInfo:
    """What `extend_vocabulary` did: sizes, the new tokens and their ids, and how the rows were initialised."""

    base_vocab_size: int  # tokenizer size before extension = id of the first new token
    new_vocab_size: int  # tokenizer size after extension
    base_num_embeddings: int  # embedding rows before extension
    num_embeddings: int  # embedding rows after extension (>= new_vocab_size; padding rows are zero)
    new_tokens: list[str]  # the added token strings, in id order
    new_ids: list[int]  # their ids: base_vocab_size, base_vocab_size + 1, ...
    tied: bool  # input embedding and output head are one Parameter
    mean_base_norm: float  # mean L2 norm of the input embedding's base token rows
    init_radius: float  # L2 norm given to each new input row (= init_scale * mean_base_norm)
    head_mean_base_norm: float | None  # same for an untied head's rows; None when tied
    head_init_radius: float | None  # L2 norm of each new untied head row; None when tied
    init_scale: float  # radius / mean base norm
    seed: int  # seed of the random directions
    pad_to_multiple_of: int | None  # embedding rows rounded up to a multiple of this
    base_fingerprint: dict[str, Any]  # identity of the base (see embed_snapshot.base_fingerprint)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict of every field."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ExtensionInfo:
        """Inverse of `to_dict`; refuses missing or unknown fields."""
        names = {f.name for f in dataclasses.fields(cls)}
        if set(data) != names:
            raise VocabError(
                f"ExtensionInfo fields differ: missing {sorted(names - set(data))}, unknown "
                f"{sorted(set(data) - names)}; the snapshot was written by another version"
            )
        return cls(**data)


def read_lexicon(path: Path | str) -> list[str]:
    """The entries of a lexicon file, in file order, duplicates dropped (the first is kept).

    Plain text (any suffix but .json): one entry per line, surrounding whitespace stripped, blank lines and
    lines starting with `#` skipped (inner spaces are kept: "New York" is one entry). `.json`: a list of
    strings (use it for entries that start with `#` or carry surrounding spaces; kept as written, empty
    strings refused). Errors name the file and the line (or list index).
    """
    file = Path(path)
    if not file.is_file():
        raise VocabError(f"lexicon={file}: no such file; pass a text file with one token per line")
    raw = file.read_bytes()
    if file.suffix.lower() == ".json":
        entries = _json_entries(file, raw)
    else:
        entries = []
        for lineno, line in enumerate(raw.splitlines(), start=1):
            try:
                text = line.decode("utf-8").strip()
            except UnicodeDecodeError as err:
                raise VocabError(f"{file}:{lineno}: not UTF-8 ({err.reason}); save the lexicon as UTF-8") from err
            if text and not text.startswith("#"):
                entries.append(text)
    words = list(dict.fromkeys(entries))
    if not words:
        raise VocabError(f"lexicon={file}: no entries (only blank or # lines); add one token per line")
    return words


def _json_entries(file: Path, raw: bytes) -> list[str]:
    try:
        data = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise VocabError(f"{file}: not UTF-8 JSON ({err}); write a JSON list of strings") from err
    if not isinstance(data, list):
        raise VocabError(f"{file}: holds a JSON {type(data).__name__}; write a JSON list of strings")
    for i, item in enumerate(data):
        if not isinstance(item, str) or not item:
            raise VocabError(f"{file}: item {i} is {item!r}; every item must be a non-empty string")
    return data


def is_single_token(tokenizer: PreTrainedTokenizerBase, word: str) -> bool:
    """True when `word` alone, or `word` after a space, encodes to one token that is not the unknown token."""
    for text in (word, " " + word):
        ids = tokenizer.encode(text, add_special_tokens=False)
        if len(ids) == 1 and ids[0] != tokenizer.unk_token_id:
            return True
    return False


def plan_new_tokens(tokenizer: PreTrainedTokenizerBase, words: Sequence[str]) -> list[str]:
    """The entries of `words` that the tokenizer does not encode as one token (see the module doc), in order.

    Raises VocabError when there is nothing to add, with a few of the known entries as examples.
    """
    if not words:
        raise VocabError("words=[]: the lexicon is empty; pass at least one token")
    missing = [w for w in dict.fromkeys(words) if not is_single_token(tokenizer, w)]
    if not missing:
        examples = ", ".join(repr(w) for w in list(words)[:3])
        raise VocabError(
            f"all {len(set(words))} lexicon entries are already single tokens of the tokenizer "
            f"(e.g. {examples}); nothing to add: check that the lexicon is for this tokenizer"
        )
    return missing


def row_norms(weight: torch.Tensor, stop: int) -> torch.Tensor:
    """L2 norms (float32, on the CPU) of rows [0, stop) of a 2-D weight, computed in chunks."""
    chunks = [
        weight[i : min(i + _NORM_CHUNK, stop)].detach().float().norm(dim=1).cpu()
        for i in range(0, stop, _NORM_CHUNK)
    ]
    return torch.cat(chunks) if chunks else torch.zeros(0)


def _float_weight(module: torch.nn.Module | None, what: str) -> torch.Tensor:
    weight = getattr(module, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.ndim != 2 or not weight.is_floating_point():
        dtype = getattr(weight, "dtype", None)
        raise VocabError(
            f"the model's {what} weight is {type(weight).__name__} with dtype {dtype}: it must be a floating "
            f"2-D matrix; keep it out of quantization (transformers' default: llm_int8_skip_modules unset)"
        )
    return weight


def _spherical_rows(
    n: int, dim: int, radius: float, generator: torch.Generator, like: torch.Tensor
) -> torch.Tensor:
    """n random directions of L2 norm `radius`, drawn in float32 on the CPU, cast to `like`'s dtype/device."""
    directions = torch.randn(n, dim, generator=generator, dtype=torch.float32)  # (n, D)
    directions /= directions.norm(dim=1, keepdim=True)
    return (directions * radius).to(dtype=like.dtype, device=like.device)


def _check_new_tokens(tokenizer: PreTrainedTokenizerBase, tokens: Sequence[str | AddedToken]) -> list[str]:
    texts = [str(getattr(t, "content", t)) for t in tokens]
    if not texts:
        raise VocabError("new_tokens=[]: nothing to add; pass the output of plan_new_tokens")
    dupes = sorted({t for t in texts if texts.count(t) > 1})
    if dupes:
        raise VocabError(f"new_tokens repeat {dupes[:3]}; pass each token once")
    vocab = tokenizer.get_vocab()
    empty = [t for t in texts if not t]
    known = [t for t in texts if t in vocab]
    if empty or known:
        raise VocabError(
            f"new_tokens {(empty + known)[:3]} are empty or already in the vocabulary; "
            f"pass the output of plan_new_tokens"
        )
    return texts


def extend_vocabulary(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    new_tokens: Sequence[str | AddedToken],
    *,
    init_scale: float = 1.0,
    seed: int = 0,
    pad_to_multiple_of: int | None = None,
) -> ExtensionInfo:
    """Add `new_tokens` to the tokenizer, resize the embeddings and initialise the new rows (module doc).

    Both `model` and `tokenizer` are changed in place. Call it before wrapping the model (DeepSpeed,
    PEFT) and before building the optimizer. It hashes the base embedding (and an untied head) for the
    snapshot fingerprint: about a second per GB on a CPU.
    """

    if not init_scale > 0:
        raise VocabError(f"init_scale={init_scale} must be > 0 (1.0 = the mean norm of the base rows)")
    if pad_to_multiple_of is not None and pad_to_multiple_of < 1:
        raise VocabError(f"pad_to_multiple_of={pad_to_multiple_of} must be >= 1 or None")
    texts = _check_new_tokens(tokenizer, new_tokens)
    emb = _float_weight(model.get_input_embeddings(), "input embedding")
    head_module = model.get_output_embeddings()
    tied = head_module is not None and head_module.weight is emb
    base_vocab, base_rows, dim = len(tokenizer), emb.shape[0], emb.shape[1]
    if base_vocab > base_rows:
        raise VocabError(
            f"the tokenizer has {base_vocab} tokens but the model only {base_rows} embedding rows; "
            f"load the tokenizer that belongs to this model"
        )
    if head_module is not None and not tied:
        _float_weight(head_module, "output head (lm_head)")
    fingerprint = base_fingerprint(model, tokenizer)

    added = tokenizer.add_tokens(list(new_tokens))
    new_vocab = len(tokenizer)
    new_ids = list(range(base_vocab, new_vocab))
    if added != len(texts) or tokenizer.convert_tokens_to_ids(texts) != new_ids:
        raise VocabError(
            f"the tokenizer gave the {len(texts)} new tokens ids {tokenizer.convert_tokens_to_ids(texts)[:5]}, "
            f"expected {new_ids[:5]} (consecutive from {base_vocab}); use a tokenizer without gaps in its ids"
        )
    rows = max(new_vocab, base_rows)
    if pad_to_multiple_of:
        rows = -(-rows // pad_to_multiple_of) * pad_to_multiple_of
    if rows != base_rows:
        model.resize_token_embeddings(rows, mean_resizing=False)
    emb = model.get_input_embeddings().weight
    head_module = model.get_output_embeddings()
    if tied and (head_module is None or head_module.weight is not emb):
        raise VocabError(
            "the tied output head is no longer the input embedding after resize_token_embeddings; "
            "set config.tie_word_embeddings=True on the model (its tie_weights() must re-tie them)"
        )

    generator = torch.Generator().manual_seed(seed)
    mean_norm = float(row_norms(emb, base_vocab).mean())
    head_norm: float | None = None
    with torch.no_grad():
        emb[base_rows:].zero_()  # rows the resize created; token rows are filled below
        emb[base_vocab:new_vocab] = _spherical_rows(len(new_ids), dim, init_scale * mean_norm, generator, emb)
        if head_module is not None and not tied:
            head = head_module.weight
            head_norm = float(row_norms(head, base_vocab).mean())
            head[base_rows:].zero_()
            head[base_vocab:new_vocab] = _spherical_rows(
                len(new_ids), head.shape[1], init_scale * head_norm, generator, head
            )
            bias = getattr(head_module, "bias", None)
            if isinstance(bias, torch.Tensor):
                bias[base_rows:].zero_()
                bias[base_vocab:new_vocab] = bias[:base_vocab].float().mean().to(bias.dtype)
    return ExtensionInfo(
        base_vocab_size=base_vocab,
        new_vocab_size=new_vocab,
        base_num_embeddings=base_rows,
        num_embeddings=emb.shape[0],
        new_tokens=texts,
        new_ids=new_ids,
        tied=tied,
        mean_base_norm=mean_norm,
        init_radius=init_scale * mean_norm,
        head_mean_base_norm=head_norm,
        head_init_radius=None if head_norm is None else init_scale * head_norm,
        init_scale=init_scale,
        seed=seed,
        pad_to_multiple_of=pad_to_multiple_of,
        base_fingerprint=fingerprint,
    )


def embedding_weights(model: PreTrainedModel, info: ExtensionInfo) -> list[torch.nn.Parameter]:
    """[input embedding] or [input embedding, untied head] weights, checked against `info`'s shapes."""
    emb = model.get_input_embeddings().weight
    head_module = model.get_output_embeddings()
    params = [emb]
    if not info.tied:
        if head_module is None:
            raise VocabError("info says the head is untied but the model has no output embeddings")
        params.append(head_module.weight)
    elif head_module is not None and head_module.weight is not emb:
        raise VocabError("info says the head is tied but the model's head is another Parameter than its embedding")
    for p in params:
        if p.shape[0] != info.num_embeddings:
            raise VocabError(
                f"the model has {p.shape[0]} embedding rows but the extension made {info.num_embeddings}; "
                f"pass the model that extend_vocabulary extended"
            )
    return params


def freeze_all_but_new_rows(model: PreTrainedModel, info: ExtensionInfo) -> list[torch.nn.Parameter]:
    """Make only the new token rows trainable; returns the Parameters to optimise (with weight_decay=0).

    Every parameter but the input embedding (and an untied head) gets requires_grad=False; a gradient
    hook on those zeroes the rows of every id outside `info.new_ids`. Calling it again replaces the hook.
    """
    params = embedding_weights(model, info)
    for p in model.parameters():
        p.requires_grad_(False)
    mask = torch.zeros(info.num_embeddings, 1, dtype=torch.bool)  # (V, 1): True on new token rows
    mask[info.base_vocab_size : info.new_vocab_size] = True
    for p in params:
        old = getattr(p, _HOOK_ATTR, None)
        if old is not None:
            old.remove()
        p.requires_grad_(True)
        row_mask = mask.to(p.device)

        def keep_new_rows(grad: torch.Tensor, row_mask: torch.Tensor = row_mask) -> torch.Tensor:
            if grad.is_sparse:
                raise VocabError("sparse embedding gradients are not supported; use nn.Embedding(sparse=False)")
            return grad.masked_fill(~row_mask, 0)  # exact zeros even where the gradient is inf/nan

        setattr(p, _HOOK_ATTR, p.register_hook(keep_new_rows))
    return params


def encode_blocks(tokenizer: PreTrainedTokenizerBase, texts: Iterable[str], seq_len: int) -> BlockDataset:
    """Non-overlapping blocks of `seq_len` tokens over `texts` encoded with `tokenizer` (new tokens included).

    Each text is encoded without special tokens and followed by the tokenizer's eos token (if it has one);
    the result is `train.data.dataset.BlockDataset(tokens, seq_len, mode="blocks")`: sample i has inputs
    tokens[i*T : i*T+T] and labels shifted by one. For a corpus on disk, save the extended tokenizer with
    `tokenizer.save_pretrained(dir)` and prepare it with tools/prepare_data.py instead (same blocks).
    """
    eos = tokenizer.eos_token_id
    ids: list[int] = []
    for text in texts:
        ids.extend(tokenizer.encode(text, add_special_tokens=False))
        if eos is not None:
            ids.append(eos)
    if len(ids) < seq_len + 1:
        raise VocabError(f"the texts give {len(ids)} tokens, fewer than seq_len+1={seq_len + 1}; lower seq_len")
    return BlockDataset(np.asarray(ids, dtype=np.int64), seq_len, mode="blocks")


def tensor_sha256(tensor: torch.Tensor) -> str:
    """Hex sha256 of a tensor's raw bytes (its dtype's bytes in row-major order, on the CPU)."""
    flat = tensor.detach().contiguous().reshape(-1)
    raw = flat.view(torch.uint8)  # (numel * element_size,) bytes
    digest = hashlib.sha256()
    chunk = 1 << 26  # bytes per update: bounds the CPU copy of a GPU tensor
    for i in range(0, raw.numel(), chunk):
        digest.update(raw[i : i + chunk].cpu().numpy().tobytes())
    return digest.hexdigest()


def base_fingerprint(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> dict[str, Any]:
    """Identity of an unextended base: what must match for its snapshot rows to mean the same thing."""
    emb = model.get_input_embeddings().weight
    head_module = model.get_output_embeddings()
    tied = head_module is not None and head_module.weight is emb
    return {
        "model_type": getattr(model.config, "model_type", None),
        "hidden_size": int(emb.shape[1]),
        "num_embeddings": int(emb.shape[0]),
        "tokenizer_size": len(tokenizer),
        "embedding_dtype": str(emb.dtype).removeprefix("torch."),
        "tied": tied,
        "embedding_sha256": tensor_sha256(emb),
        "head_sha256": None if tied or head_module is None else tensor_sha256(head_module.weight),
    }
