"""Export a Tessera checkpoint to a Hugging Face model directory that transformers loads with no custom code.

    tag_dir = resolve_checkpoint("runs/smoke")              # the newest complete checkpoint of a run
    state = consolidated_state_dict(tag_dir)                # Tessera names, any ZeRO stage 0-3
    export_hf("runs/smoke", "runs/smoke/hf", dtype=torch.bfloat16)

The output directory holds `model.safetensors` (or shards plus `model.safetensors.index.json`),
`config.json` (a `LlamaConfig`, or a `Qwen2Config` for a model with q/k/v biases) with the tokenizer's
bos/eos/pad ids, `generation_config.json` and the tokenizer files the run trained with. It is written
into a temporary directory beside the target and renamed into place, so a failed export leaves nothing.

Weights come from DeepSpeed's own files: under ZeRO-0 the full `module` state dict of
`mp_rank_00_model_states.pt`; under ZeRO 1-3 DeepSpeed's `zero_to_fp32` consolidation of the fp32
master weights. Checkpoint files are unpickled (`weights_only=False`): export only your own runs.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import pickle
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from model import ModelArgs, ModelConfigError
from model.hf import check_state_dict, to_hf_config, to_hf_state_dict
from parallel.pipeline import LAYER_FILE, pipe_to_plain_key
from parallel.tp import HF_LLAMA_TP_PLAN, merge_tp_shards, tp_shard_layout
from train.checkpoint.writer import CKPT_DIR, META_FILE, latest_complete, read_meta
from train.data.corpus import DataError, atomic_dir, sha256_file
from train.data.tokenizer import TOKENIZER_FILE, load_tokenizer

log = logging.getLogger("tessera")

EXPORT_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
"""The --dtype choices of an export, by name."""
TOKENIZER_FILES = (
    TOKENIZER_FILE, "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json", "vocab.json",
    "merges.txt", "tokenizer.model", "chat_template.jinja", "chat_template.json",
)
"""Files copied from the run's tokenizer dir when present (tokenizer.json must be)."""
_STAGE0_FILE = "mp_rank_00_model_states.pt"
_ZERO_OPTIM_GLOB = "zero_pp_rank_*_mp_rank_*_optim_states.pt"


class ExportError(ValueError):
    """A checkpoint that cannot be exported; the message names the path, the problem and the fix."""


def resolve_checkpoint(path: str | Path) -> Path:
    """The complete checkpoint tag dir named by `path`: a tag dir, a run's checkpoints/ dir or a run dir.

    For a run dir it is the newest complete checkpoint. A tag dir without tessera.json is incomplete
    (still being written, or cut off) and is refused.
    """
    p = Path(path)
    if not p.is_dir():
        raise ExportError(f"{p}: no such directory; pass a run dir or a checkpoint dir (checkpoints/step_N)")
    if (p / META_FILE).is_file():
        return p
    run_dir = p.parent if p.name == CKPT_DIR else p
    if (run_dir / CKPT_DIR).is_dir():
        tag_dir = latest_complete(run_dir)
        if tag_dir is None:
            raise ExportError(f"{run_dir}: no complete checkpoint under {CKPT_DIR}/ (none has {META_FILE})")
        return tag_dir
    if any(p.glob("*model_states.pt")):
        raise ExportError(f"{p}: incomplete checkpoint (no {META_FILE}); export a complete one")
    raise ExportError(f"{p}: neither a Tessera run dir nor a checkpoint dir (no {META_FILE}, no {CKPT_DIR}/)")


def checkpoint_model_args(meta: dict[str, Any], tag_dir: Path) -> ModelArgs:
    """The ModelArgs a checkpoint was trained with, from its tessera.json."""
    fields = meta.get("model_args")
    if not isinstance(fields, dict):
        raise ExportError(f"{tag_dir / META_FILE}: no model_args; this checkpoint was not written by Tessera")
    try:
        return ModelArgs(**fields).validate()
    except (TypeError, ModelConfigError) as err:  # a field this version does not know, or a bad value
        raise ExportError(
            f"{tag_dir / META_FILE}: model_args do not fit this Tessera version ({err})"
        ) from err


def _pipeline_state_dict(tag: Path) -> dict[str, torch.Tensor]:
    """The plain state dict of a pipeline checkpoint: its per-piece files, joined over TP ranks when tp > 1.

    These are the module weights in the precision they were trained in (under bf16 the fp32 master copy in
    the ZeRO-1 optimizer files is not used).
    """
    args = checkpoint_model_args(read_meta(tag), tag)
    per_tp: dict[int, dict[str, torch.Tensor]] = {}
    for f in sorted(tag.glob("layer_*-model_states.pt")):
        m = LAYER_FILE.search(f.name)
        if m is None:
            continue
        layer, tp_rank = int(m.group(1)), int(m.group(2) or 0)
        try:
            saved = torch.load(f, map_location="cpu", weights_only=False)
        except (RuntimeError, OSError, EOFError, pickle.UnpicklingError) as err:
            raise ExportError(f"{f}: unreadable ({err}); the checkpoint is damaged, export another") from err
        for key, tensor in saved.items():
            per_tp.setdefault(tp_rank, {})[pipe_to_plain_key(layer, key, args.n_layers)] = tensor
    if sorted(per_tp) != list(range(len(per_tp))):
        raise ExportError(f"{tag}: pipeline files of tensor-parallel ranks {sorted(per_tp)}; some are missing")
    shards = [per_tp[r] for r in range(len(per_tp))]
    state = shards[0] if len(shards) == 1 else merge_tp_shards(shards, tp_shard_layout(args, len(shards)))
    if args.tie_embeddings and "embed_tokens.weight" in state:
        state["lm_head.weight"] = state["embed_tokens.weight"]
    return state


def _model_parallel_ranks(tag_dir: Path) -> list[int]:
    """The model-parallel (tensor-parallel) ranks whose files the checkpoint holds: [0] without TP."""
    ranks = {int(m.group(1)) for f in tag_dir.glob("*mp_rank_*") if (m := re.search(r"mp_rank_(\d+)", f.name))}
    return sorted(ranks) or [0]


def consolidated_state_dict(tag_dir: str | Path) -> dict[str, torch.Tensor]:
    """The full model state dict (Tessera names, on CPU) of a DeepSpeed checkpoint of any ZeRO stage and tp.

    ZeRO 1-3 (per-rank `zero_pp_rank_*_optim_states.pt`): DeepSpeed's `zero_to_fp32` rebuilds the
    fp32 master weights. ZeRO-0: the `module` entry of `mp_rank_00_model_states.pt` (the weights in the
    precision they were trained in). A tensor-parallel checkpoint is consolidated per TP rank, then its
    shards are joined along the dimension each was split on (vocabulary padding dropped); a pipeline
    checkpoint is read from its per-piece files. A tied head appears under both of its names.
    """
    tag = Path(tag_dir)
    if any(tag.glob("layer_*-model_states.pt")):
        return _pipeline_state_dict(tag)
    mp_ranks = _model_parallel_ranks(tag)
    if mp_ranks == [0]:
        return _consolidate_one(tag)
    if mp_ranks != list(range(len(mp_ranks))):
        raise ExportError(f"{tag}: tensor-parallel ranks {mp_ranks} are not 0..{len(mp_ranks) - 1}; files are missing")
    meta = read_meta(tag)
    layout, tied = _tp_layout(meta, tag, len(mp_ranks))
    shards = []
    for r in mp_ranks:
        with tempfile.TemporaryDirectory(prefix="tessera-tp-") as tmp:
            view = Path(tmp) / tag.name  # this TP rank's files, named as DeepSpeed's tools expect of rank 0
            view.mkdir()
            for f in tag.glob(f"*mp_rank_{r:02d}*"):
                (view / f.name.replace(f"mp_rank_{r:02d}", "mp_rank_00")).symlink_to(f.resolve())
            shards.append(_consolidate_one(view))
    state = merge_tp_shards(shards, layout)
    if tied is not None and tied[0] in state:
        state[tied[1]] = state[tied[0]]
    return state


def _tp_layout(meta: dict[str, Any], tag: Path, tp: int) -> tuple[dict[str, Any], tuple[str, str] | None]:
    """The split of each state-dict key of a tp-way checkpoint, and the (embedding, head) names when tied."""
    if not meta.get("hf"):
        args = checkpoint_model_args(meta, tag)
        return tp_shard_layout(args, tp), ("embed_tokens.weight", "lm_head.weight") if args.tie_embeddings else None
    from model.hf_causal import (  # an hf.path run: the wrapper puts `model.` in front
        causal_lm_config,
        meta_model,
    )

    try:
        config = causal_lm_config(meta["hf"]["path"], where="the run's base model")
    except ModelConfigError as err:
        raise ExportError(f"{tag}: {err}") from err
    layout = tp_shard_layout(meta_model(config), tp, HF_LLAMA_TP_PLAN)
    tied = ("model.model.embed_tokens.weight", "model.lm_head.weight") if config.tie_word_embeddings else None
    return {f"model.{name}": spec for name, spec in layout.items()}, tied


def _consolidate_one(tag: Path) -> dict[str, torch.Tensor]:
    """The state dict of model-parallel rank 0's files in ``tag`` (the whole model without TP)."""
    if any(tag.glob(_ZERO_OPTIM_GLOB)):
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        chatter = io.StringIO()  # zero_to_fp32 prints its progress; keep stdout for the caller
        try:
            with contextlib.redirect_stdout(chatter):
                state = get_fp32_state_dict_from_zero_checkpoint(str(tag.parent), tag=tag.name)
        except (FileNotFoundError, ValueError) as err:
            raise ExportError(f"{tag}: DeepSpeed could not consolidate this ZeRO checkpoint ({err})") from err
        log.debug("zero_to_fp32: %s", chatter.getvalue())
        return {name: _own_storage(tensor) for name, tensor in state.items()}
    stage0 = tag / _STAGE0_FILE
    if not stage0.is_file():
        raise ExportError(f"{tag}: no DeepSpeed model states ({_STAGE0_FILE} or {_ZERO_OPTIM_GLOB}) in it")
    try:
        saved = torch.load(stage0, map_location="cpu", weights_only=False, mmap=True)
    except (RuntimeError, OSError, EOFError, pickle.UnpicklingError) as err:
        raise ExportError(f"{stage0}: unreadable ({err}); the checkpoint is damaged, export another") from err
    module = saved.get("module") if isinstance(saved, dict) else None
    if not module:
        raise ExportError(
            f"{stage0}: holds no 'module' state dict; was it written by engine.save_checkpoint?"
        )
    if any(tag.glob("bf16_zero_pp_rank_*_optim_states.pt")):
        log.warning("%s: bf16 ZeRO-0 checkpoint: exporting the bf16 module weights "
                    "(its fp32 master weights are not used)", tag)
    return {name: tensor.detach().clone() for name, tensor in module.items()}


def _own_storage(tensor: torch.Tensor) -> torch.Tensor:
    """`tensor`, copied when it is a view into a larger buffer (ZeRO 1/2 flat groups), so it saves alone."""
    if tensor.untyped_storage().nbytes() == tensor.numel() * tensor.element_size():
        return tensor
    return tensor.clone()


def _tokenizer_dir(meta: dict[str, Any], tag_dir: Path, override: Path | None) -> Path:
    """The run's tokenizer dir (or `override`), checked against the sha256 the run recorded.

    Without an override: `tokenizer_dir` as recorded (it may be relative to where the run started),
    else the absolute path in the tokenizer identity.
    """
    recorded = [meta.get("tokenizer_dir"), (meta.get("tokenizer") or {}).get("path")]
    candidates = [override] if override else [Path(p) for p in recorded if p]
    tok_dir = next((c for c in candidates if (c / TOKENIZER_FILE).is_file()), None)
    if tok_dir is None:
        raise ExportError(
            f"{tag_dir / META_FILE}: no {TOKENIZER_FILE} in the tokenizer dir "
            f"{', '.join(map(str, candidates)) or '(none recorded)'}; "
            f"pass the tokenizer the run used (--tokenizer DIR)"
        )
    expected = (meta.get("tokenizer") or {}).get("sha256")
    if expected and sha256_file(tok_dir / TOKENIZER_FILE) != expected:
        raise ExportError(
            f"{tok_dir / TOKENIZER_FILE} differs from the tokenizer the run trained with "
            f"(sha256 {expected[:12]}); pass the original one (--tokenizer DIR)"
        )
    return tok_dir


def _token_ids(tok_dir: Path, vocab_size: int) -> dict[str, int | None]:
    """bos/eos/pad ids of the tokenizer; refuse one with more tokens than the model has rows."""
    tokenizer = load_tokenizer(tok_dir)
    if len(tokenizer) > vocab_size:
        raise ExportError(
            f"tokenizer {tok_dir} has {len(tokenizer)} tokens but the model only {vocab_size} "
            f"embedding rows; "
            f"pass the tokenizer the run used (--tokenizer DIR)"
        )
    return {
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }


def hf_weights(
    state: dict[str, torch.Tensor], args: ModelArgs, dtype: torch.dtype
) -> dict[str, torch.Tensor]:
    """HF-named, contiguous tensors in `dtype`; a tied head is left out (transformers re-ties it on load)."""
    hf_state = to_hf_state_dict(state)
    if args.tie_embeddings:
        hf_state.pop("lm_head.weight", None)
    return {name: t.to(dtype).contiguous() if t.is_floating_point() else t for name, t in hf_state.items()}


def export_hf(
    checkpoint: str | Path,
    out_dir: str | Path,
    *,
    dtype: torch.dtype = torch.float32,
    overwrite: bool = False,
    tokenizer_dir: str | Path | None = None,
    max_shard_size: int | str = "5GB",
    merge: bool = False,
) -> Path:
    """Write the checkpoint as an HF `LlamaForCausalLM` (or `Qwen2ForCausalLM`) dir at `out_dir`; return it.

    checkpoint: anything `resolve_checkpoint` accepts. dtype: of the saved weights. overwrite:
    replace an existing `out_dir` (else it is refused). tokenizer_dir: use this tokenizer instead of
    the one the run recorded (it must have the same tokenizer.json). Raises `ExportError`.
    A run of an HF model (`hf.path`) is exported as that model's own architecture; with adapters, as the
    adapter in PEFT format, or (`merge`) as the base with the adapter merged into its weights.
    """
    from huggingface_hub import save_torch_state_dict
    from transformers import GenerationConfig

    tag_dir = resolve_checkpoint(checkpoint)
    out = Path(out_dir)
    if out.exists() and not overwrite:
        raise ExportError(f"--out {out} already exists; choose another directory or pass --overwrite")
    if dtype not in EXPORT_DTYPES.values():
        raise ExportError(f"dtype={dtype} is not supported: use one of {', '.join(EXPORT_DTYPES)}")
    try:
        meta = read_meta(tag_dir)
    except json.JSONDecodeError as err:
        raise ExportError(f"{tag_dir / META_FILE}: not valid JSON ({err})") from err
    if meta.get("research"):  # a research recipe: its own weights and how to rebuild it (train/export/research.py)
        from train.export.research import export_research

        if merge:
            raise ExportError(f"{tag_dir}: --merge does not apply to a research run; its export holds the recipe's "
                              f"weights and the adapter")
        return export_research(tag_dir, meta, out, overwrite=overwrite)
    if meta.get("hf"):
        return _export_hf_model(tag_dir, meta, out, dtype=dtype, overwrite=overwrite, merge=merge)
    if merge:
        raise ExportError(f"{tag_dir}: --merge applies to adapter runs; this checkpoint holds a whole model")
    args = checkpoint_model_args(meta, tag_dir)
    try:
        config = to_hf_config(args)
    except ModelConfigError as err:
        raise ExportError(f"{tag_dir}: cannot be exported: {err}") from err
    tok_dir = _tokenizer_dir(meta, tag_dir, Path(tokenizer_dir) if tokenizer_dir else None)
    token_ids = _token_ids(tok_dir, args.vocab_size)

    state = consolidated_state_dict(tag_dir)
    head = meta.get("head")
    score = None
    if head:  # a sequence head (train/objectives/scoring.py): the Transformer is the scorer's `model`
        state = {k.removeprefix("model."): v for k, v in state.items()}
        score = state.pop("score.weight")
        state["lm_head.weight"] = state["embed_tokens.weight"] if args.tie_embeddings else \
            torch.zeros(args.vocab_size, args.dim, dtype=score.dtype)  # checked below, never exported
    try:
        check_state_dict(args, state, str(tag_dir))
    except ModelConfigError as err:
        raise ExportError(str(err)) from err
    for name, value in token_ids.items():
        setattr(config, name, value)
    config.dtype = dtype
    family = "Qwen2" if args.attn_bias else "Llama"
    config.architectures = [f"{family}ForCausalLM"]
    weights = hf_weights(state, args, dtype)
    if score is not None:  # a standard *ForSequenceClassification: decoder weights plus `score`
        weights.pop("lm_head.weight", None)
        weights["score.weight"] = score.to(dtype).contiguous()
        config.num_labels = head["num_labels"]
        if config.pad_token_id is None:  # the scorer skipped a trailing eos as padding (model/heads.py)
            config.pad_token_id = config.eos_token_id
        if head.get("labels"):
            config.id2label = dict(enumerate(head["labels"]))
            config.label2id = {name: i for i, name in enumerate(head["labels"])}
        config.architectures = [f"{family}ForSequenceClassification"]
    try:
        with atomic_dir(out, overwrite=overwrite) as tmp:
            save_torch_state_dict(weights, tmp, max_shard_size=max_shard_size)
            config.save_pretrained(tmp)
            GenerationConfig(**token_ids).save_pretrained(tmp)
            for name in TOKENIZER_FILES:
                if (tok_dir / name).is_file():
                    shutil.copy2(tok_dir / name, tmp / name)
    except DataError as err:  # out_dir appeared while exporting
        raise ExportError(str(err)) from err
    log.info("exported %s (step %s) to %s", tag_dir, meta.get("step"), out)
    return out


def _export_hf_model(tag_dir: Path, meta: dict[str, Any], out: Path, *, dtype: torch.dtype, overwrite: bool,
                     merge: bool) -> Path:
    """An `hf.path` run: the adapter as saved (PEFT format), the merged model, or the fully trained model."""
    from transformers import (
        AutoConfig,
        AutoModelForCausalLM,
        AutoModelForSeq2SeqLM,
        AutoModelForSequenceClassification,
        AutoTokenizer,
    )

    base = Path(meta["hf"]["path"])
    head = meta.get("head")
    if not (base / "config.json").is_file():
        raise ExportError(f"{tag_dir}: the base model {base} it was trained on is not there; restore it first")
    adapter = tag_dir / "adapter"
    lora = meta.get("config", {}).get("lora", {})
    try:
        with atomic_dir(out, overwrite=overwrite) as tmp:
            if lora.get("r", 0) and not merge:
                if not (adapter / "adapter_config.json").is_file():
                    raise ExportError(f"{tag_dir}: no adapter/ in this checkpoint; it is damaged, export another")
                shutil.copytree(adapter, tmp, dirs_exist_ok=True)
            else:
                if head:  # a reward / verifier model or classifier: a standard *ForSequenceClassification
                    config = AutoConfig.from_pretrained(str(base), num_labels=head["num_labels"])
                    if head.get("labels"):
                        config.id2label = dict(enumerate(head["labels"]))
                        config.label2id = {name: i for i, name in enumerate(head["labels"])}
                    if config.pad_token_id is None:
                        config.pad_token_id = config.eos_token_id
                    model = AutoModelForSequenceClassification.from_pretrained(str(base), config=config,
                                                                               dtype=torch.float32)
                else:
                    auto = AutoModelForSeq2SeqLM if getattr(AutoConfig.from_pretrained(str(base)),
                                                            "is_encoder_decoder", False) else AutoModelForCausalLM
                    model = auto.from_pretrained(str(base), dtype=torch.float32)
                if lora.get("r", 0):  # the base in full precision (also for a 4-bit run), the adapter folded in
                    from peft import PeftModel

                    model = PeftModel.from_pretrained(model, str(adapter)).merge_and_unload()
                else:
                    _load_trained(model, consolidated_state_dict(tag_dir), tag_dir, base,
                                  partial=bool(meta.get("config", {}).get("vocab", {}).get("lexicon")
                                               or meta.get("config", {}).get("vocab", {}).get("from_snapshot")))
                model.to(dtype).save_pretrained(str(tmp))
                run_tok = Path(meta.get("tokenizer_dir") or base)
                tok_src = adapter if adapter.is_dir() else run_tok if (run_tok / "tokenizer.json").is_file() else base
                AutoTokenizer.from_pretrained(str(tok_src)).save_pretrained(str(tmp))
    except DataError as err:
        raise ExportError(str(err)) from err
    log.info("exported %s (step %s) to %s", tag_dir, meta.get("step"), out)
    return out


def _load_trained(model: torch.nn.Module, state: dict[str, torch.Tensor], tag_dir: Path, base: Path, *,
                  partial: bool) -> None:
    """Put a run's trained weights (`model.`-prefixed wrapper names) into the base model loaded from ``base``.

    partial: the checkpoint holds only what trained (a vocabulary extension: the resized embedding rows; the
    frozen rest is the base's own), and the embedding is resized to the checkpoint's rows first.
    """
    state = {k.removeprefix("model."): v for k, v in state.items()}
    embed = next((v for k, v in state.items() if k.endswith(("embed_tokens.weight", "wte.weight"))), None)
    if partial and embed is not None and embed.shape[0] != model.get_input_embeddings().weight.shape[0]:
        model.resize_token_embeddings(embed.shape[0], mean_resizing=False)
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = {k for k in missing if k.endswith("lm_head.weight")} if model.config.tie_word_embeddings else set()
    if unexpected or (set(missing) - tied and not partial):
        raise ExportError(f"{tag_dir}: weights do not fit {base} (missing {sorted(missing)[:3]}, "
                          f"unexpected {sorted(unexpected)[:3]})")
