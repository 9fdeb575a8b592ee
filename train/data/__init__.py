"""Tessera data path: corpora, tokenizers, prepared token shards, datasets, blends and the global sampler.

Modules: `corpus` (inputs), `tokenizer`, `shards` (the prepared format and its manifest), `prepare`
(parallel, resumable preparation), `dataset` (packed blocks, document masks), `blend` (weighted
mixtures), `sampler` (the global order), `streaming` (HF `datasets` streaming), `supervised` and
`collators` (instruction / chat, preference and classification data).

    tok_dir, data_dir = prepare_shakespeare(cache_dir, vocab_size=4096)
    data = PreparedData.open(data_dir, expect_tokenizer=tokenizer_identity(tok_dir))
    train = BlockDataset(data.split("train"), seq_len=256)
    order = GlobalOrder(len(train), seed=0)
    batches = micro_batches(train, order, consumed_samples=0, global_batch=64, micro_batch=8,
                            dp_rank=rank, dp_size=world)

The corpus, tokenizer and prepare names are imported at once; the dataset and sampler names
(which need torch, ~2 s to import) on first use, so tools that only prepare data skip torch.
Note that `train.data.prepare` is the `prepare` function; its module is reached with
`importlib.import_module("train.data.prepare")` or `from train.data.prepare import ...`.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from train.data.corpus import DataError, atomic_dir, ensure_shakespeare, iter_documents
from train.data.prepare import prepare, prepare_corpus, prepare_shakespeare
from train.data.shards import HEADER_FILE, PreparedData, ShardedTokens, token_dtype
from train.data.tokenizer import (
    EOS_TOKEN,
    TokenizerMismatchError,
    check_same_tokenizer,
    load_raw_tokenizer,
    load_tokenizer,
    same_tokenizer,
    tokenizer_identity,
    train_bpe_tokenizer,
)

if TYPE_CHECKING:
    from train.data.blend import BlendDataset
    from train.data.dataset import BlockDataset
    from train.data.sampler import (
        BatchConfigError,
        BatchSource,
        GlobalOrder,
        eval_batches,
        grad_accum_steps,
        micro_batches,
    )

_LAZY = {
    "BlendDataset": "blend",
    "BlockDataset": "dataset",
    "BatchConfigError": "sampler",
    "BatchSource": "sampler",
    "GlobalOrder": "sampler",
    "eval_batches": "sampler",
    "grad_accum_steps": "sampler",
    "micro_batches": "sampler",
}
__all__ = [
    "EOS_TOKEN",
    "HEADER_FILE",
    "BatchConfigError",
    "BatchSource",
    "BlendDataset",
    "BlockDataset",
    "DataError",
    "GlobalOrder",
    "PreparedData",
    "ShardedTokens",
    "TokenizerMismatchError",
    "atomic_dir",
    "check_same_tokenizer",
    "ensure_shakespeare",
    "eval_batches",
    "grad_accum_steps",
    "iter_documents",
    "load_raw_tokenizer",
    "load_tokenizer",
    "micro_batches",
    "prepare",
    "prepare_corpus",
    "prepare_shakespeare",
    "same_tokenizer",
    "token_dtype",
    "tokenizer_identity",
    "train_bpe_tokenizer",
]


def __getattr__(name: str) -> Any:
    """Import a dataset / sampler name from its submodule when first asked for (PEP 562)."""
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{module}"), name)
