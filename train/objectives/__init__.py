"""What a run optimizes, chosen by ``train.objective`` from one table.

    spec = OBJECTIVES[cfg.train.objective]
    objective = spec.make(inputs)                  # after the engine exists (DPO's reference needs it)

Each entry says how its objective is made, whether the model's LM head is replaced by a sequence head (one score,
or one logit per class), and whether the run ends with a generated text sample. ``train.objective='lm'`` also
serves SFT: with data.corpus='sft' the labels cover response tokens only.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from train.config.fields import ConfigError
from train.config.schema import JobConfig
from train.data.supervised import ClassificationDataset
from train.data.tokenizer import load_tokenizer
from train.objectives.dpo import DPOObjective, build_reference
from train.objectives.lm import LossFn, Objective
from train.objectives.scoring import ScoreObjective
from train.objectives.seq2seq import Seq2SeqObjective


@dataclass(frozen=True)
class ObjectiveInputs:
    """What an objective may need from the run that builds it."""

    cfg: JobConfig
    engine: Any  # the DeepSpeed engine
    loss_fn: LossFn  # the language-model loss parallelize() chose
    train_ds: Any  # the training split (its ``dataset`` holds every example)
    tokenizer_dir: Path
    ds_config: dict[str, Any]
    device: torch.device
    rank: int
    resuming: bool
    adapters: bool  # LoRA on an HF model: the adapters-off base is a reference for free
    fresh_model: Callable[[], nn.Module]  # the policy's starting point, built again (DPO's reference)


def _lm(i: ObjectiveInputs) -> Objective:
    return Objective(i.loss_fn)


def _dpo(i: ObjectiveInputs) -> Objective:
    cfg = i.cfg
    reference = build_reference(cfg.dpo.reference, engine=i.engine, adapters=i.adapters, fresh_model=i.fresh_model,
                                ds_config=i.ds_config, device=i.device, out_dir=Path(cfg.train.out_dir),
                                dataset=i.train_ds.dataset, micro_batch=cfg.train.micro_batch_size,
                                resuming=i.resuming, rank=i.rank)
    return DPOObjective(reference, beta=cfg.dpo.beta, label_smoothing=cfg.dpo.label_smoothing)


def _score(i: ObjectiveInputs) -> Objective:
    cfg = i.cfg
    mode = "classify" if cfg.train.objective == "classify" else \
        "pairwise" if cfg.data.corpus == "preference" else "pointwise"
    return ScoreObjective(mode, num_labels=i.engine.module.n_out, out_dir=Path(cfg.train.out_dir), rank=i.rank)


def _seq2seq(i: ObjectiveInputs) -> Objective:
    cfg = i.cfg
    return Seq2SeqObjective(i.train_ds.dataset, load_tokenizer(i.tokenizer_dir),
                            max_new_tokens=cfg.data.max_target_len or cfg.data.seq_len,
                            zero3=i.engine.zero_optimization_stage() == 3, out_dir=Path(cfg.train.out_dir),
                            rank=i.rank)


@dataclass(frozen=True)
class ObjectiveSpec:
    make: Callable[[ObjectiveInputs], Objective]
    sequence_head: bool = False  # the LM head is replaced by a sequence head
    samples: bool = True  # the run ends with a generated text sample
    encoder_decoder: bool = False  # an HF encoder-decoder (hf.path), not a decoder-only LM


OBJECTIVES: dict[str, ObjectiveSpec] = {
    "lm": ObjectiveSpec(_lm),
    "dpo": ObjectiveSpec(_dpo),
    "reward": ObjectiveSpec(_score, sequence_head=True, samples=False),
    "classify": ObjectiveSpec(_score, sequence_head=True, samples=False),
    "seq2seq": ObjectiveSpec(_seq2seq, samples=False, encoder_decoder=True),  # an encoder-decoder's generations are in its evaluations
}


def head_outputs(cfg: JobConfig, train_ds: Any) -> int:
    """Outputs of the sequence head: one score for a reward model, one logit per class for a classifier."""
    if cfg.train.objective == "reward":
        data = getattr(train_ds, "dataset", None)
        if isinstance(data, ClassificationDataset) and data.num_labels > 2:
            raise ConfigError(f"train.objective='reward' on data.corpus='classification' scores labels 0 / 1 (incorrect "
                              f"/ correct); the data have {data.num_labels} classes: use train.objective='classify'.")
        return 1
    return int(train_ds.dataset.num_labels)


def head_meta(cfg: JobConfig, model: Any, train_ds: Any) -> dict[str, Any] | None:
    """A sequence head's outputs and class names, for export (None for language models)."""
    if not OBJECTIVES[cfg.train.objective].sequence_head:
        return None
    data = getattr(train_ds, "dataset", None)
    names = list(getattr(data, "names", []) or []) if cfg.train.objective == "classify" else []
    return {"kind": model.kind, "num_labels": model.n_out, "labels": names}
