"""From the recipe's ``data`` section to opened token data: corpus, tokenizer and prepared files, cached.

Every rank of a launch calls ``setup_data``; a file lock lets the first one fetch, train the tokenizer and
prepare while the others wait, then all of them open the same prepared files read-only.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from train.config import ConfigError, JobConfig
from train.data import PreparedData, ensure_shakespeare, prepare_corpus, tokenizer_identity


@dataclass(frozen=True)
class DataBundle:
    tokenizer_dir: Path  # HF tokenizer directory (AutoTokenizer loads it)
    tokenizer_id: dict  # identity recorded in the prepared header and in checkpoints
    prepared_dir: Path  # train.bin / val.bin / header.json
    data: PreparedData  # the opened, verified token data


@contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _input_files(cfg: JobConfig, cache: Path) -> tuple[list[Path], str]:
    """The corpus files and a key that changes when they do."""
    if cfg.data.corpus == "shakespeare":
        return ensure_shakespeare(cache), "shakespeare"
    files = [Path(f) for f in cfg.data.files]
    missing = [str(f) for f in files if not f.exists()]
    if missing:
        raise ConfigError(f"data.files: {', '.join(missing)} not found. Give existing text/JSONL/parquet files.")
    stamp = [(str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns) for f in files]
    digest = hashlib.sha256(json.dumps(stamp).encode()).hexdigest()[:12]
    return files, f"files-{digest}"


def setup_data(cfg: JobConfig) -> DataBundle:
    d = cfg.data
    cache = Path(d.cache_dir)
    with _file_lock(cache / ".lock"):
        files, corpus_key = _input_files(cfg, cache)
        tok_dir, prepared_dir = prepare_corpus(
            files, corpus_key, cache, vocab_size=d.vocab_size, tokenizer_dir=d.tokenizer,
            out_dir=d.prepared_dir, text_field=d.text_field, val_fraction=d.val_fraction, seed=d.split_seed,
        )
    tok_id = tokenizer_identity(tok_dir)
    data = PreparedData.open(prepared_dir, expect_tokenizer=tok_id)
    return DataBundle(tokenizer_dir=tok_dir, tokenizer_id=tok_id, prepared_dir=prepared_dir, data=data)
