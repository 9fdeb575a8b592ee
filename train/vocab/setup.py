"""The embedding-only vocabulary extension as a run: plan, extend, freeze, snapshot (`vocab` recipe section).

The library is `train.vocab.extend` / `embed_snapshot`; this module ties it to a run:

- `plan_vocab` (before any weight is read): the lexicon's missing words (or a snapshot's tokens), and the
  extended tokenizer saved under `data.cache_dir/vocab/<hash>`, so the corpus is tokenized with the new tokens
  and the run records that tokenizer;
- `apply_vocab` (after the base is loaded, before DeepSpeed): the same extension on the model (from the
  snapshot's rows when starting from one), every other weight frozen, base rows masked;
- `SnapshotWriter`: the new rows to `<out_dir>/embeddings/step_N` every `vocab.snapshot_interval` steps and at
  the end.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from train.config.fields import ConfigError
from train.config.schema import JobConfig
from train.data.corpus import atomic_dir
from train.vocab.extend import (
    ExtensionInfo,
    VocabError,
    extend_vocabulary,
    freeze_all_but_new_rows,
    plan_new_tokens,
    read_lexicon,
)
from train.vocab.snapshot import (
    load_embedding_snapshot,
    read_snapshot_meta,
    save_embedding_snapshot,
    snapshot_tokens,
)

SNAPSHOT_DIR = "embeddings"
log = logging.getLogger("tessera")


@dataclass(frozen=True)
class VocabPlan:
    base_tokenizer: Path  # the model's own tokenizer
    tokenizer_dir: Path  # the extended one (the data's)
    tokens: tuple[Any, ...]  # str or AddedToken, in id order
    ids: tuple[int, ...]  # their ids in the extended tokenizer
    snapshot: Path | None  # vocab.from_snapshot


def _tokens(cfg: JobConfig, base: Any) -> tuple[list[Any], Path | None]:
    v = cfg.vocab
    snapshot = Path(v.from_snapshot) if v.from_snapshot is not None else None
    planned = plan_new_tokens(base, read_lexicon(v.lexicon)) if v.lexicon is not None else None
    if snapshot is None:
        assert planned is not None
        return list(planned), None
    tokens = snapshot_tokens(read_snapshot_meta(snapshot))
    texts = [str(getattr(t, "content", t)) for t in tokens]
    if planned is not None and planned != texts:
        raise ConfigError(f"vocab.lexicon={v.lexicon} gives the new tokens {planned[:3]}..., vocab.from_snapshot="
                          f"{snapshot} holds {texts[:3]}...; drop vocab.lexicon to continue the snapshot's tokens.")
    return tokens, snapshot


def plan_vocab(cfg: JobConfig) -> VocabPlan:
    """Check the extension and write the extended tokenizer (cached: same base and tokens, same directory)."""
    from transformers import AutoTokenizer

    for name in ("lexicon", "from_snapshot"):
        value = getattr(cfg.vocab, name)
        if value is not None and not Path(value).exists():
            raise ConfigError(f"vocab.{name}={value}: not found.")
    base_dir = Path(str(cfg.data.tokenizer))
    base = AutoTokenizer.from_pretrained(str(base_dir))
    try:
        tokens, snapshot = _tokens(cfg, base)
    except VocabError as err:
        raise ConfigError(f"vocab: {err}") from None
    key = json.dumps([str(getattr(t, "content", t)) for t in tokens]) + (base_dir / "tokenizer.json").read_text()
    out = Path(cfg.data.cache_dir) / "vocab" / hashlib.sha256(key.encode()).hexdigest()[:16]
    extended = AutoTokenizer.from_pretrained(str(base_dir))
    extended.add_tokens(list(tokens))
    if not (out / "tokenizer.json").is_file():
        with atomic_dir(out, overwrite=True) as tmp:
            extended.save_pretrained(str(tmp))
    ids = tuple(extended.convert_tokens_to_ids([str(getattr(t, "content", t)) for t in tokens]))
    return VocabPlan(base_dir, out, tuple(tokens), ids, snapshot)


def apply_vocab(hf_model: Any, plan: VocabPlan, cfg: JobConfig) -> tuple[ExtensionInfo, Any]:
    """Extend the loaded base as planned and freeze all but the new rows; returns (info, extended tokenizer)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(plan.base_tokenizer))
    if plan.snapshot is not None:
        info, step = load_embedding_snapshot(hf_model, tokenizer, plan.snapshot)
        log.info("new embedding rows from %s (step %d); optimizer and schedule start afresh", plan.snapshot, step)
    else:
        info = extend_vocabulary(hf_model, tokenizer, list(plan.tokens), init_scale=cfg.vocab.init_scale,
                                 seed=cfg.train.seed, pad_to_multiple_of=cfg.vocab.pad_to_multiple_of)
    if tuple(info.new_ids) != plan.ids:
        raise VocabError(f"the model's new token ids {info.new_ids[:3]}... differ from the data tokenizer's "
                         f"{plan.ids[:3]}... ({plan.tokenizer_dir}); remove that directory and start again")
    freeze_all_but_new_rows(hf_model, info)
    log.info("vocabulary %d -> %d tokens (%d new, e.g. %s); only their rows train (radius %.4g)",
             info.base_vocab_size, info.new_vocab_size, len(info.new_ids), info.new_tokens[:5], info.init_radius)
    return info, tokenizer


class SnapshotWriter:
    """Rank 0 writes the new rows every `vocab.snapshot_interval` steps and at the last step."""

    def __init__(self, model: Any, info: ExtensionInfo, tokenizer: Any, out_dir: Path, *, interval: int,
                 last_step: int, rank: int) -> None:
        self.model, self.info, self.tokenizer = model, info, tokenizer
        self.root, self.interval, self.last_step, self.rank = out_dir / SNAPSHOT_DIR, interval, last_step, rank

    def __call__(self, step: int) -> None:
        due = step == self.last_step or (self.interval and step % self.interval == 0)
        if not due or self.rank != 0:
            return
        path = save_embedding_snapshot(self.model, self.info, self.root / f"step_{step:08d}", step,
                                       tokenizer=self.tokenizer, overwrite=True)
        log.info("step %d: embedding snapshot saved to %s", step, path)
