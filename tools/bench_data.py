"""Data benchmarks (subcommands of tools/bench.py): preparation, loader batch assembly, blend index build.

    python tools/bench.py data-prepare --mb 64 --out /tmp/bench_prep       # tokens/s per worker
    python tools/bench.py data-loader --out /tmp/bench_loader               # packed batches, tokens/s
    python tools/bench.py data-index --tokens 1e9 --out /tmp/bench_index    # 1B-token blend index

``data-prepare`` writes a synthetic JSONL corpus of words drawn from a fixed vocabulary, trains a
byte-level BPE on a slice of it, and prepares it with 1 and with N workers. ``data-loader`` writes
random tokens in the prepared format (no tokenizing) and times `BlockDataset` batches through the
global sampler, as training pulls them. ``data-index`` writes the manifests of three prepared datasets
whose shards are sparse files of the given total size (only their lengths matter to the index), then
times opening them and building the blend's sample index cold, and opening it again from the cache.
"""

from __future__ import annotations

import json
import shutil
import time
from itertools import islice
from pathlib import Path
from typing import Any

import numpy as np

from tools import report_error
from train.data import prepare, train_bpe_tokenizer
from train.data.blend import BlendDataset
from train.data.dataset import BlockDataset
from train.data.sampler import GlobalOrder, micro_batches
from train.data.shards import FORMAT_NAME, FORMAT_VERSION, HEADER_FILE, PreparedData, ShardWriter


def _check_out(out: Path) -> None:
    if out.exists():
        raise SystemExit(report_error(f"--out {out} exists; give a new directory (it is deleted afterwards)"))
    out.mkdir(parents=True)


def bench_prepare(out: Path, mb: float, workers: int, vocab: int) -> dict[str, Any]:
    _check_out(out)
    rng = np.random.default_rng(0)
    words = np.array(["".join(rng.choice(list("abcdefghijklmnopqrstuvwxyz"), rng.integers(2, 9)))
                      for _ in range(20_000)])
    files, size = [], 0
    while size < mb * 1e6:
        path = out / f"part{len(files):03d}.jsonl"
        with path.open("w") as f:
            for _ in range(2000):
                doc = " ".join(words[rng.zipf(1.3, rng.integers(50, 800)) % len(words)])
                f.write(json.dumps({"text": doc}) + "\n")
        files.append(path)
        size += path.stat().st_size
    tok = train_bpe_tokenizer(files[:1], vocab, out / "tok")
    result: dict[str, Any] = {"corpus_mb": round(size / 1e6, 1), "files": len(files), "vocab": vocab}
    for n in sorted({1, workers}):
        start = time.perf_counter()
        header = prepare(files, tok, out / f"prepared-{n}", workers=n, shard_chars=4_000_000, val_fraction=0.01)
        seconds = time.perf_counter() - start
        tokens = sum(s["n_tokens"] for s in header["splits"].values())
        result[f"workers_{n}"] = {"tokens": tokens, "seconds": round(seconds, 2),
                                  "tokens_per_s": round(tokens / seconds), "tokens_per_s_per_worker": round(tokens / seconds / n)}
    shutil.rmtree(out)
    return result


def _write_random_prepared(root: Path, n_tokens: int, vocab: int, mean_doc: int, seed: int) -> None:
    """A prepared dataset of random tokens, documents of ~mean_doc tokens ending with separator 0."""
    root.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    dtype = np.dtype("<u2")
    splits = {}
    for split, count in (("train", n_tokens), ("val", max(n_tokens // 100, 10_000))):
        writer = ShardWriter(root, split, 0, dtype)
        done = 0
        while done < count:
            lengths = rng.geometric(1 / mean_doc, size=4096).clip(1, count - done)
            lengths = lengths[: max(1, int(np.searchsorted(np.cumsum(lengths), count - done)))]
            tokens = rng.integers(1, vocab, int(lengths.sum()), dtype=np.uint16)
            ends = np.cumsum(lengths) - 1
            tokens[ends] = 0
            starts = np.concatenate([[0], ends[:-1] + 1])
            writer.write([tokens[s : e + 1] for s, e in zip(starts, ends, strict=True)])
            done += int(lengths.sum())
        entry = writer.close()
        splits[split] = {"n_docs": entry["n_docs"], "n_tokens": entry["n_tokens"], "shards": [entry]}
    header = {"format": FORMAT_NAME, "format_version": FORMAT_VERSION, "vocab_size": vocab, "dtype": "uint16",
              "tokenizer": {"sha256": "synthetic", "vocab_size": vocab}, "doc_separator_id": 0, "splits": splits}
    (root / HEADER_FILE).write_text(json.dumps(header))


def bench_loader(out: Path, tokens: int, seq_len: int, micro_batch: int, seconds: float) -> dict[str, Any]:
    _check_out(out)
    _write_random_prepared(out / "data", tokens, 32_000, 600, seed=0)
    data = PreparedData.open(out / "data")
    result: dict[str, Any] = {"dataset_tokens": tokens, "seq_len": seq_len, "micro_batch": micro_batch}
    for mode in ("random", "blocks"):
        for doc_mask in (False, True):
            ds = BlockDataset(data.split("train"), seq_len, mode=mode, seed=0, doc_mask=doc_mask, separator_id=0)
            it = micro_batches(ds, GlobalOrder(len(ds), seed=0), consumed_samples=0, global_batch=micro_batch * 8,
                               micro_batch=micro_batch, dp_rank=0, dp_size=1)
            next(it)  # the epoch permutation is built once per epoch, outside the timed loop
            n, start = 0, time.perf_counter()
            while time.perf_counter() - start < seconds:
                for _ in islice(it, 50):
                    n += 1
            elapsed = time.perf_counter() - start
            result[f"{mode}{'+doc_mask' if doc_mask else ''}_tokens_per_s"] = round(n * micro_batch * seq_len / elapsed)
    shutil.rmtree(out)
    return result


def bench_index(out: Path, tokens: float, seq_len: int) -> dict[str, Any]:
    _check_out(out)
    shares = [0.6, 0.3, 0.1]
    dirs = []
    for i, share in enumerate(shares):  # sparse shard files: the index only reads their lengths
        root = out / f"ds{i}"
        root.mkdir()
        shards = []
        n_total = int(tokens * share)
        per = 1 << 30
        for k in range(-(-n_total // per)):
            n = min(per, n_total - k * per)
            with open(root / f"train-{k:05d}.bin", "wb") as f:
                f.truncate(n * 2)
            (root / f"train-{k:05d}.idx").write_bytes(b"")
            shards.append({"file": f"train-{k:05d}.bin", "index": f"train-{k:05d}.idx", "n_docs": 0, "n_tokens": n,
                           "sha256": "", "index_sha256": ""})
        header = {"format": FORMAT_NAME, "format_version": FORMAT_VERSION, "vocab_size": 32_000, "dtype": "uint16",
                  "tokenizer": {}, "doc_separator_id": 0,
                  "splits": {"train": {"n_docs": 0, "n_tokens": n_total, "shards": shards}}}
        (root / HEADER_FILE).write_text(json.dumps(header))
        dirs.append(root)

    def build() -> tuple[float, int]:
        start = time.perf_counter()
        parts = [PreparedData.open(d) for d in dirs]
        sets = [BlockDataset(p.split("train"), seq_len, mode="random", seed=i) for i, p in enumerate(parts)]
        blend = BlendDataset(sets, [0.5, 0.3, 0.2], num_samples=sum(len(s) for s in sets), seed=0,
                             fingerprints=[p.fingerprint for p in parts], cache_dir=out / "index")
        order = GlobalOrder(len(blend), seed=0, shuffle=False)
        order.indices(0, 1)  # the sampler's first lookup
        return time.perf_counter() - start, len(blend)

    cold, n_samples = build()
    warm, _ = build()
    shutil.rmtree(out)
    return {"tokens": int(tokens), "seq_len": seq_len, "samples": n_samples, "build_s": round(cold, 2),
            "cached_reopen_s": round(warm, 3)}
