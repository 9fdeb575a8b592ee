"""Streaming mode: corpora that were not prepared ahead, read with HF `datasets` streaming and packed on the fly.

Each source (a file, a directory or a glob, resolved as data.files is by `train.data.inputs`, or a
directory written by `save_to_disk`) becomes a streaming `IterableDataset` of its text column: `.jsonl`/`.json`
and `.parquet` give one document per row, a text file is one document (`sample_by="document"`, as in
`prepare`). A source's `max_docs` keeps only its first that many documents (rows) in each pass.
How the sources are mixed (`data.blend_by`):

- "documents" (default): a source's weight is its share of the documents drawn, with
  `datasets.interleave_datasets(probabilities=weights, seed=...)`; when every source has run out the mixture
  starts again (the next pass reseeded).
- "tokens": a source's weight is its share of the tokens: the next document always comes from the source
  furthest below its share (the smallest tokens-served / weight, ties to the first source), so after any
  prefix each source holds its share of the tokens within one document. A source that runs out (or reaches
  `max_docs`) starts again on its own.

Documents are tokenized one at a time, each followed by the separator, into a buffer that is cut into samples
of T+1 tokens stepping by T (as `BlockDataset` "blocks" mode does over a prepared split).

Every rank reads the whole mixture and keeps its slice of each global batch, so the samples of a
step do not depend on the data-parallel size. The position is `TokenStream.state_dict()`: the
`datasets` state plus the tokens buffered but not yet used; `StreamBatches` hands it to the trainer,
which stores it in the checkpoint, and a resumed run continues with exactly the next samples.
"""

from __future__ import annotations

import glob
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from train.data.blend import check_weights
from train.data.corpus import DataError, _to_iterable
from train.data.dataset import Batch, doc_positions
from train.data.inputs import is_saved_dataset, resolve_inputs
from train.data.prepare import load_encoder
from train.data.sampler import grad_accum_steps

_log = logging.getLogger("tessera")
_BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}
BLEND_BY = ("documents", "tokens")
"""What a streamed source's weight is a share of (`data.blend_by`)."""


@dataclass(frozen=True)
class StreamSource:
    """One source of the mixture: `path` is a file, a glob of files or a dataset directory."""

    path: str  # where the documents are
    weight: float  # relative share of documents (blend_by='documents') or of tokens (blend_by='tokens')
    max_docs: int | None = None  # at most this many of its documents (its first ones) per pass; None: all


def source_files(path: str) -> list[Path]:
    """The files a source names (a file, a directory walked and a glob expanded as `resolve_inputs` does for
    data.files, empty files skipped with a count), or its one saved-dataset directory; else a DataError."""
    if not glob.has_magic(path) and is_saved_dataset(Path(path)):
        return [Path(path)]
    found = resolve_inputs([path], where=f"data.blend path={path!r}")
    folders = [str(p) for p in found.paths if p.is_dir()]
    if folders:
        raise DataError(f"data.blend path={path!r} holds the saved dataset {folders[0]} among other inputs; "
                        f"name it as a source of its own")
    if found.skipped():
        _log.info("data.blend path=%r: %s", path, found.summary())
    return found.paths


def _open_source(path: str, text_field: str, max_docs: int | None = None) -> Any:
    """A streaming IterableDataset of the source's documents (its first `max_docs`), with one column 'text'."""
    import datasets

    files = source_files(path)
    if len(files) == 1 and files[0].is_dir():  # a saved dataset
        ds = _to_iterable(datasets.load_from_disk(str(files[0])))
        if isinstance(ds, datasets.IterableDatasetDict):
            ds = ds["train"] if "train" in ds else ds[next(iter(ds))]
    else:
        kinds = {_BUILDERS.get(f.suffix.lower(), "text") for f in files}
        if len(kinds) != 1:
            raise DataError(f"data.blend path={path!r} mixes file types {sorted(kinds)}; give one source per type")
        (kind,) = kinds
        extra = {"sample_by": "document"} if kind == "text" else {}
        ds = datasets.load_dataset(kind, data_files=[str(f) for f in files], split="train", streaming=True, **extra)
        text_field = "text" if kind == "text" else text_field
    if ds.column_names is not None and text_field not in ds.column_names:
        raise DataError(f"data.blend path={path!r}: no column text_field={text_field!r} (has {ds.column_names})")
    ds = ds.select_columns([text_field])
    ds = ds.rename_column(text_field, "text") if text_field != "text" else ds
    return ds.take(max_docs) if max_docs is not None else ds


class TokenStream:
    """Endless packed samples of T+1 tokens from a weighted mixture of streamed sources."""

    def __init__(
        self,
        sources: Sequence[StreamSource],
        *,
        tokenizer_file: str,
        separator_id: int,
        seq_len: int,
        seed: int,
        text_field: str = "text",
        blend_by: str = "documents",
    ) -> None:
        self.sources = list(sources)  # the mixture's sources
        self.weights = check_weights([s.weight for s in sources], "data.blend weights")  # (K,) normalised
        self.tokenizer_file = tokenizer_file  # tokenizer.json to encode with
        self.separator_id = separator_id  # appended after each document
        self.seq_len = seq_len  # T
        self.seed = seed  # seeds the interleaving
        self.text_field = text_field  # column of the documents
        if blend_by not in BLEND_BY:
            raise DataError(f"data.blend_by={blend_by!r}: use one of {', '.join(BLEND_BY)}")
        self.by_tokens = blend_by == "tokens"  # weights are shares of tokens, not of documents
        for s in self.sources:
            if s.max_docs is not None and (isinstance(s.max_docs, bool) or not isinstance(s.max_docs, int)
                                           or s.max_docs < 1):
                raise DataError(f"data.blend path={s.path!r}: max_docs={s.max_docs!r} must be an integer >= 1")
        self._encoder = load_encoder(tokenizer_file)
        self._parts = [_open_source(s.path, text_field, s.max_docs) for s in self.sources]
        self._pass = 0  # how many times the mixture ran out and restarted
        self._buffer: list[int] = []  # tokens read but not yet emitted
        self._served = np.zeros(len(self.sources))  # blend_by='tokens': tokens drawn from each source
        self._source = 0  # the source of the last document read
        if self.by_tokens:
            self._load_sources(None)
        else:
            self._start_pass(0, None)

    def _load_sources(self, states: list[dict[str, Any]] | None) -> None:
        """blend_by='tokens': one iterator per source, from its saved `datasets` state when given."""
        for part, state in zip(self._parts, states or [None] * len(self._parts)):
            if state is not None:
                part.load_state_dict(state)
        self._iters = [iter(part) for part in self._parts]

    def _next_by_tokens(self) -> str:
        active = np.flatnonzero(self.weights > 0)
        i = int(active[np.argmin(self._served[active] / self.weights[active])])
        self._source = i
        for attempt in range(2):
            try:
                return next(self._iters[i])["text"]
            except StopIteration:  # this source ran out (or reached max_docs): it starts again on its own
                if attempt:
                    break
                src = self.sources[i]  # reopened: a fresh start, not the position a resume loaded
                self._parts[i] = _open_source(src.path, self.text_field, src.max_docs)
                self._iters[i] = iter(self._parts[i])
        raise DataError(f"the streamed source {self.sources[i].path!r} holds no document")

    def _start_pass(self, n: int, hf_state: dict[str, Any] | None) -> None:
        import datasets

        self._pass = n
        self._mix = datasets.interleave_datasets(
            self._parts, probabilities=self.weights.tolist(), seed=self.seed + n, stopping_strategy="all_exhausted"
        )
        if hf_state is not None:
            self._mix.load_state_dict(hf_state)
        self._rows = iter(self._mix)

    def _next_document(self) -> str:
        if self.by_tokens:
            return self._next_by_tokens()
        for attempt in range(2):
            try:
                return next(self._rows)["text"]
            except StopIteration:
                if attempt:
                    break
                self._start_pass(self._pass + 1, None)
        raise DataError(f"the streamed sources {[s.path for s in self.sources]} hold no document")

    def take(self, n: int) -> np.ndarray:
        """The next n samples: (n, T+1) int64 token windows."""
        out = np.empty((n, self.seq_len + 1), dtype=np.int64)
        tokenizer = self._encoder
        for row in range(n):
            while len(self._buffer) < self.seq_len + 1:
                text = self._next_document()
                if not isinstance(text, str):
                    raise DataError(f"a streamed row holds {type(text).__name__}, not text; set data.text_field")
                if text.strip():
                    ids = tokenizer.encode(text, add_special_tokens=False).ids
                    self._buffer.extend(ids)
                    self._buffer.append(self.separator_id)
                    self._served[self._source] += len(ids) + 1
            out[row] = self._buffer[: self.seq_len + 1]
            del self._buffer[: self.seq_len]
        return out

    def state_dict(self) -> dict[str, Any]:
        """The position: which pass, the `datasets` state within it (per source with blend_by='tokens', with the
        tokens served), and the buffered tokens."""
        if self.by_tokens:
            return {"sources": [part.state_dict() for part in self._parts], "served": self._served.tolist(),
                    "buffer": list(self._buffer)}
        return {"pass": self._pass, "hf": self._mix.state_dict(), "buffer": list(self._buffer)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a `state_dict()` of a stream over the same sources and settings."""
        if self.by_tokens != ("sources" in state):
            raise DataError(f"the saved stream position was taken with data.blend_by="
                            f"{'tokens' if 'sources' in state else 'documents'}; resume with that setting")
        self._buffer = [int(t) for t in state["buffer"]]
        if self.by_tokens:
            self._served = np.asarray(state["served"], dtype=np.float64)
            self._load_sources(state["sources"])
        else:
            self._start_pass(int(state["pass"]), state["hf"])


def to_batch(chunk: np.ndarray, separator_id: int, doc_mask: bool) -> Batch:
    """(B, T+1) token windows -> a training batch, as `BlockDataset.batch` builds it."""
    inputs, labels = np.ascontiguousarray(chunk[:, :-1]), chunk[:, 1:].copy()
    if not doc_mask:
        return torch.from_numpy(inputs), torch.from_numpy(labels)
    ends = inputs == separator_id
    labels[ends] = -100
    positions, doc_ids = doc_positions(ends)
    return torch.from_numpy(inputs), torch.from_numpy(labels), {
        "position_ids": torch.from_numpy(positions), "doc_ids": torch.from_numpy(doc_ids)}


class StreamBatches:
    """This rank's micro-batches from a `TokenStream`, one global batch at a time, with a saved position.

    `state_dict()` (taken between optimizer steps) is {"consumed": samples, "stream": position}.
    Built from `start` (a state of the same stream at `start["consumed"]` samples) it skips forward
    to `consumed`; states handed out by `state_dict` are also recorded in `known` (by consumed samples),
    so a later rebuild (a rollback) can start from the nearest one.
    """

    def __init__(self, stream: TokenStream, *, consumed: int, global_batch: int, micro_batch: int, dp_rank: int,
                 dp_size: int, doc_mask: bool, start: dict[str, Any],
                 known: dict[int, dict[str, Any]] | None = None) -> None:
        self.accum = grad_accum_steps(global_batch, micro_batch, dp_size)
        if start["consumed"] > consumed:
            raise DataError(f"cannot rewind a stream from {start['consumed']} to {consumed} consumed samples")
        self.stream = stream  # the shared token stream
        self.gb, self.mb, self.rank, self.dp, self.doc_mask = global_batch, micro_batch, dp_rank, dp_size, doc_mask
        stream.load_state_dict(start["stream"])
        skip = consumed - start["consumed"]
        while skip:
            skip -= len(stream.take(min(skip, 4096)))
        self.consumed = consumed  # samples of the global stream consumed before the next global batch
        self.known = known if known is not None else {}  # positions handed out, by consumed samples
        self._micro: Iterator[Batch] = iter(())

    def __iter__(self) -> StreamBatches:
        return self

    def __next__(self) -> Batch:
        for batch in self._micro:
            return batch
        chunk = self.stream.take(self.gb)  # (gb, T+1): the whole global batch, every rank alike
        per_rank = self.gb // self.dp
        mine = chunk[self.rank * per_rank : (self.rank + 1) * per_rank]
        self.consumed += self.gb
        self._micro = (to_batch(mine[j * self.mb : (j + 1) * self.mb], self.stream.separator_id, self.doc_mask)
                       for j in range(self.accum))
        return next(self._micro)

    def state_dict(self) -> dict[str, Any]:
        """The stream position after the last complete global batch handed out."""
        state = {"consumed": self.consumed, "stream": self.stream.state_dict()}
        self.known[self.consumed] = state
        return state


class HeldOutSamples:
    """Samples kept in memory (the held-out start of a stream, for validation), read like a dataset."""

    def __init__(self, windows: np.ndarray, separator_id: int, doc_mask: bool) -> None:
        self.windows = windows  # (N, T+1) int64 token windows
        self.separator_id = separator_id  # ends every document
        self.doc_mask = doc_mask  # add position_ids / doc_ids

    def __len__(self) -> int:
        return len(self.windows)

    def batch(self, indices: np.ndarray) -> Batch:
        """Samples `indices` (B,) as a batch (see `to_batch`)."""
        return to_batch(self.windows[np.asarray(indices, dtype=np.int64)], self.separator_id, self.doc_mask)
