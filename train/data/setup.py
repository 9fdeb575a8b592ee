"""From the recipe's ``data`` section to the datasets and batch streams of a run.

``data.corpus`` picks where the tokens come from:

- ``shakespeare`` / ``files``: fetched or listed inputs, prepared once into ``data.cache_dir`` (a file lock
  lets the first rank fetch, train the tokenizer and prepare while the others wait);
- ``prepared``: the prepared datasets of ``data.blend``, mixed by weight (``train.data.blend``);
- ``stream``: the raw sources of ``data.blend`` read with HF ``datasets`` streaming
  (``train.data.streaming``);
- ``sft`` / ``preference`` / ``classification`` / ``seq2seq``: JSONL (or parquet) ``files``, directories
  or globs, one padded example per sample (sft: loss on the responses only; ``train.data.supervised``);
  ``data.val_fraction`` of the examples (chosen by ``data.split_seed``) validate.

``setup_data`` checks everything it can before expensive work; ``build_datasets`` cuts samples;
``batch_stream`` gives the trainer its ``batches(consumed_samples)`` function.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from train.config.fields import ConfigError
from train.config.schema import SUPERVISED_CORPORA, Corpus, DataSection, JobConfig, TrainSection
from train.data import (
    DataError,
    PreparedData,
    check_same_tokenizer,
    ensure_shakespeare,
    prepare_corpus,
    tokenizer_identity,
)
from train.data.blend import BlendDataset, largest_unrepeated
from train.data.dataset import BlockDataset
from train.data.inputs import resolve_inputs
from train.data.sampler import GlobalOrder, micro_batches
from train.data.streaming import HeldOutSamples, StreamBatches, StreamSource, TokenStream, source_files
from train.data.supervised import (
    ClassificationDataset,
    Renderer,
    Seq2SeqDataset,
    SupervisedDataset,
    read_classification,
    supervised_files,
)
from train.data.tokenizer import eos_token, load_raw_tokenizer, load_tokenizer

_log = logging.getLogger("tessera")


@dataclass(frozen=True)
class DataBundle:
    tokenizer_dir: Path  # HF tokenizer directory (AutoTokenizer loads it)
    tokenizer_id: dict  # identity recorded in the prepared header and in checkpoints
    prepared_dir: Path | None  # the (first) prepared dataset; None when streaming
    data: PreparedData | None  # the opened, verified token data of prepared_dir
    vocab_size: int  # token ids the data may hold (the tokenizer's vocabulary)
    separator_id: int  # the token that ends every document
    parts: tuple[PreparedData, ...] = ()  # every prepared dataset of the run (one unless blending)
    weights: tuple[float, ...] = (1.0,)  # their mixture weights (or the streamed sources')
    sources: tuple[Any, ...] = field(default=())  # StreamSource entries when streaming


@contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _input_files(d: DataSection, cache: Path) -> tuple[list[Path], str]:
    """The corpus files (data.files resolved: directories walked, globs expanded) and a key that changes
    when they do."""
    if d.corpus == "shakespeare":
        return ensure_shakespeare(cache), "shakespeare"
    found = resolve_inputs(d.files, where="data.files")
    _log.info("data.files: %s", found.summary())
    stamp = [(str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns) for f in found.paths]
    digest = hashlib.sha256(json.dumps(stamp).encode()).hexdigest()[:12]
    return found.paths, f"files-{digest}"


def setup_data(d: DataSection) -> DataBundle:
    """The tokenizer and the opened token data of the data section (prepared first if needed), or what the
    examples and the stream will be read with."""
    if d.corpus == "prepared":
        return _setup_blend(d)
    if d.corpus == "stream":
        return _setup_stream(d)
    if d.corpus in SUPERVISED:
        return _setup_supervised(d)
    cache = Path(d.cache_dir)
    with _file_lock(cache / ".lock"):
        files, corpus_key = _input_files(d, cache)
        tok_dir, prepared_dir = prepare_corpus(
            files, corpus_key, cache, vocab_size=d.vocab_size, tokenizer_dir=d.tokenizer,
            out_dir=d.prepared_dir, text_field=d.text_field, val_fraction=d.val_fraction, seed=d.split_seed,
            workers=d.workers,
        )
    tok_id = tokenizer_identity(tok_dir)
    data = PreparedData.open(prepared_dir, expect_tokenizer=tok_id, verify=d.verify)
    return DataBundle(tokenizer_dir=tok_dir, tokenizer_id=tok_id, prepared_dir=prepared_dir, data=data,
                      vocab_size=data.vocab_size, separator_id=data.doc_separator_id, parts=(data,))


def _setup_blend(d: DataSection) -> DataBundle:
    """Open every prepared dataset of data.blend; they must share one tokenizer and separator."""
    parts = []
    for i, entry in enumerate(d.blend):
        try:
            parts.append(PreparedData.open(entry["path"], verify=d.verify))
        except DataError as err:
            raise DataError(f"data.blend[{i}]: {err}") from None
    tok_dir = Path(d.tokenizer) if d.tokenizer is not None else Path(parts[0].header["tokenizer"]["path"])
    if not (tok_dir / "tokenizer.json").is_file():
        raise DataError(f"data.blend[0] path={parts[0].path} was made with the tokenizer {tok_dir}, which is "
                        "not here; set data.tokenizer to a copy of it")
    tok_id = tokenizer_identity(tok_dir)
    for i, part in enumerate(parts):
        check_same_tokenizer(part.header["tokenizer"], tok_id, f"data.blend[{i}] path={part.path}")
        if part.doc_separator_id != parts[0].doc_separator_id:
            raise DataError(f"data.blend[{i}] path={part.path} ends documents with token "
                            f"{part.doc_separator_id}, data.blend[0] with {parts[0].doc_separator_id}; "
                            f"prepare both with one doc_separator")
    return DataBundle(tokenizer_dir=tok_dir, tokenizer_id=tok_id, prepared_dir=parts[0].path, data=parts[0],
                      vocab_size=max(p.vocab_size for p in parts), separator_id=parts[0].doc_separator_id,
                      parts=tuple(parts), weights=tuple(float(e["weight"]) for e in d.blend))


def _setup_stream(d: DataSection) -> DataBundle:
    """Check the streamed sources exist and name the tokenizer; nothing is read yet."""
    assert d.tokenizer is not None  # validate() requires it for corpus='stream'
    tok_dir = Path(d.tokenizer)
    tok_id = tokenizer_identity(tok_dir)
    sources = tuple(StreamSource(str(e["path"]), float(e["weight"]), e.get("max_docs")) for e in d.blend)
    for source in sources:
        source_files(source.path)
    sep_id = _separator_id(tok_dir, "")
    return DataBundle(tokenizer_dir=tok_dir, tokenizer_id=tok_id, prepared_dir=None, data=None,
                      vocab_size=tok_id["vocab_size"], separator_id=sep_id,
                      weights=tuple(s.weight for s in sources), sources=sources)


def _setup_supervised(d: DataSection) -> DataBundle:
    """Check the example files (data.files resolved as ``supervised_files`` does: directories and globs give
    their JSONL / parquet files, sorted) and the tokenizer; the examples are rendered in ``build_datasets``."""
    if d.corpus == "qa":  # read by the soft_prompt recipe (train.research.qa_data), file by file
        missing = [f for f in d.files if not Path(f).is_file()]
        if missing:
            raise ConfigError(f"data.files: {', '.join(missing)} not found. Give SQuAD JSON / JSONL files.")
    else:
        _log.info("data.files: %s", supervised_files(d.files).summary())
    assert d.tokenizer is not None  # validate() requires it (or takes hf.path's) for corpus='sft'
    tok_dir = Path(d.tokenizer)
    tok_id = tokenizer_identity(tok_dir)
    sep_id = _separator_id(tok_dir, " (examples end with it)")
    return DataBundle(tokenizer_dir=tok_dir, tokenizer_id=tok_id, prepared_dir=None, data=None,
                      vocab_size=tok_id["vocab_size"], separator_id=sep_id)


# Corpora of padded examples, not packed blocks.
SUPERVISED: tuple[Corpus, ...] = (*SUPERVISED_CORPORA, "qa")


class ExampleSplit:
    """Some of a ``SupervisedDataset``'s examples, by index: a dataset with ``batch(indices)``."""

    def __init__(self, dataset: Any, indices: list[int]) -> None:
        self.dataset, self.indices = dataset, indices

    def __len__(self) -> int:
        return len(self.indices)

    def batch(self, indices: Any) -> Any:
        return self.dataset.batch([self.indices[i] for i in indices])


def _supervised_datasets(d: DataSection, bundle: DataBundle) -> tuple[ExampleSplit, ExampleSplit]:
    """Render every example once; a seeded ``val_fraction`` of them (at least one) validates."""
    renderer = Renderer(load_tokenizer(bundle.tokenizer_dir), d.seq_len, d.max_prompt_len)
    if d.corpus == "classification":
        rows, names = read_classification(d.files, renderer.tokenizer, d.seq_len, d.labels or None)
        data: Any = ClassificationDataset(rows, names, renderer.pad_id)
    elif d.corpus == "seq2seq":
        data = Seq2SeqDataset(d.files, renderer.tokenizer, d.seq_len, d.max_target_len or d.seq_len)
    else:
        kind = "preference" if d.corpus == "preference" else "instruction"
        data = SupervisedDataset(d.files, renderer, kind=kind)
    order = np.random.default_rng(d.split_seed).permutation(len(data)).tolist()
    n_val = max(1, round(d.val_fraction * len(data)))
    if n_val >= len(data):
        raise ConfigError(f"data.files hold {len(data)} usable examples: too few to hold out "
                          f"data.val_fraction={d.val_fraction} for validation and train on the rest; add "
                          f"examples.")
    return ExampleSplit(data, sorted(order[n_val:])), ExampleSplit(data, sorted(order[:n_val]))


def build_datasets(cfg: JobConfig, bundle: DataBundle, dp_size: int) -> tuple[Any, Any]:
    """(train, val): datasets with ``batch(indices)`` or, when streaming, a ``StreamStart`` and held-out
    samples.

    A validation split too short for one evaluation round is a ConfigError here, before training.
    """
    d, t = cfg.data, cfg.train
    if d.corpus == "stream":
        train, val = _stream_datasets(d, t, bundle)
    elif d.corpus in SUPERVISED:
        train, val = _supervised_datasets(d, bundle)
    else:
        train, val = _prepared_datasets(d, t, bundle)
    if len(val) < t.micro_batch_size * dp_size:
        where = bundle.prepared_dir or ("the stream" if d.corpus == "stream" else "data.files")
        raise ConfigError(
            f"the validation split of {where} holds {len(val)} "
            f"{'examples' if d.corpus in SUPERVISED else f'blocks of data.seq_len={d.seq_len}'}, "
            f"fewer than train.micro_batch_size={t.micro_batch_size} x {dp_size} data-parallel ranks needed "
            f"to evaluate: raise data.val_fraction (data.stream_val_samples when streaming), or lower "
            f"data.seq_len or train.micro_batch_size."
        )
    return train, val


def batch_stream(cfg: JobConfig, train: Any, *, dp_rank: int, dp_size: int,
                 data_state: dict[str, Any] | None) -> Callable[[int], Iterator[Any]]:
    """The trainer's ``batches(consumed_samples)``: this rank's micro-batches from that position on.

    data_state: the stream position saved in the checkpoint being resumed (streaming only).
    """
    d, t = cfg.data, cfg.train
    if d.corpus == "stream":
        return _stream_batches(d, t, train, dp_rank=dp_rank, dp_size=dp_size, data_state=data_state)
    # a blend's index already interleaves its datasets and permutes each one: its order is used as it is
    order = GlobalOrder(len(train), seed=t.seed, shuffle=not hasattr(train, "dataset_index"))

    def batches(consumed: int) -> Iterator[Any]:
        return micro_batches(train, order, consumed_samples=consumed, global_batch=t.global_batch_size,
                             micro_batch=t.micro_batch_size, dp_rank=dp_rank, dp_size=dp_size)

    return batches


def _prepared_datasets(d: DataSection, t: TrainSection, bundle: DataBundle) -> tuple[Any, Any]:
    """Packed blocks of one prepared dataset, or a weighted blend of several."""
    pack = {"doc_mask": d.doc_mask, "separator_id": bundle.separator_id}
    if len(bundle.parts) == 1:
        (data,) = bundle.parts
        train = BlockDataset(data.split("train"), d.seq_len, mode=d.sampling, seed=t.seed,
                             num_samples=d.samples_per_epoch, **pack)
        return train, BlockDataset(data.split("val"), d.seq_len, mode="blocks", **pack)
    trains, vals = [], []
    for i, part in enumerate(bundle.parts):
        try:
            trains.append(BlockDataset(part.split("train"), d.seq_len, mode=d.sampling, seed=t.seed + i,
                                       **pack))
            vals.append(BlockDataset(part.split("val"), d.seq_len, mode="blocks", **pack))
        except DataError as err:
            raise DataError(f"data.blend[{i}] path={part.path}: {err}") from None
    keys = [p.fingerprint for p in bundle.parts]
    cache = Path(d.cache_dir) / "index"
    wanted = t.steps * t.global_batch_size  # the run's samples: one pass of the blend covers the whole run
    n_train = d.samples_per_epoch or max(wanted, sum(len(x) for x in trains))
    train = BlendDataset(trains, bundle.weights, num_samples=n_train, seed=t.seed, fingerprints=keys,
                         cache_dir=cache)
    n_val = largest_unrepeated(bundle.weights, [len(v) for v in vals])
    val = BlendDataset(vals, bundle.weights, num_samples=max(n_val, 1), seed=0,
                       fingerprints=[f"val-{k}" for k in keys], cache_dir=cache)
    return train, val


@dataclass
class StreamStart:
    """A streaming run's token stream and its position where training starts (after the held-out samples)."""

    stream: Any  # the TokenStream
    start: dict[str, Any]  # {"consumed": 0, "stream": position}
    # positions saved so far, by consumed samples
    known: dict[int, dict[str, Any]] = field(default_factory=dict)


def _stream_datasets(d: DataSection, t: TrainSection, bundle: DataBundle) -> tuple[StreamStart, Any]:
    """The stream, with its first ``data.stream_val_samples`` samples held out for validation."""
    stream = TokenStream(bundle.sources, tokenizer_file=str(bundle.tokenizer_dir / "tokenizer.json"),
                         separator_id=bundle.separator_id, seq_len=d.seq_len, seed=t.seed,
                         text_field=d.text_field, blend_by=d.blend_by)
    val = HeldOutSamples(stream.take(d.stream_val_samples), bundle.separator_id, d.doc_mask)
    return StreamStart(stream, {"consumed": 0, "stream": stream.state_dict()}), val


def _stream_batches(d: DataSection, t: TrainSection, train: StreamStart, *, dp_rank: int, dp_size: int,
                    data_state: dict[str, Any] | None) -> Callable[[int], Iterator[Any]]:
    train.known[0] = train.start
    if data_state is not None:
        train.known[int(data_state["consumed"])] = data_state

    def batches(consumed: int) -> StreamBatches:
        base = max(c for c in train.known if c <= consumed)  # the latest saved position not past `consumed`
        return StreamBatches(train.stream, consumed=consumed, global_batch=t.global_batch_size,
                             micro_batch=t.micro_batch_size, dp_rank=dp_rank, dp_size=dp_size,
                             doc_mask=d.doc_mask, start=train.known[base], known=train.known)

    return batches


def _separator_id(tok_dir: Path, why: str) -> int:
    """The id of the tokenizer's eos token, which separates documents (and ends examples)."""
    separator = eos_token(tok_dir)
    sep_id = load_raw_tokenizer(tok_dir).token_to_id(separator) if separator is not None else None
    if sep_id is None:
        raise DataError(f"data.tokenizer={tok_dir} names no eos_token that is one of its tokens; add one to "
                        f"tokenizer_config.json{why}")
    return sep_id
