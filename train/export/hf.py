"""Export a Tessera checkpoint to a Hugging Face model directory that transformers loads with no custom code.

    tag_dir = resolve_checkpoint("runs/smoke")              # the newest complete checkpoint of a run
    state = consolidated_state_dict(tag_dir)                # Tessera names, any ZeRO stage 0-3
    export_hf("runs/smoke", "runs/smoke/hf", dtype=torch.bfloat16)

The output directory holds `model.safetensors` (or shards plus `model.safetensors.index.json`),
`config.json` (the `LlamaConfig`, `MistralConfig`, `Qwen2Config` or `Qwen3Config` that describes the network,
`model.hf.hf_model_type`) with the tokenizer's
bos/eos/pad ids, `generation_config.json` and the tokenizer files the run trained with. It is written
into a temporary directory beside the target and renamed into place, so a failed export leaves nothing.

Weights come from DeepSpeed's own files: under ZeRO-0 the full `module` state dict of
`mp_rank_00_model_states.pt`; under ZeRO 1-3 DeepSpeed's `zero_to_fp32` consolidation of the fp32
master weights. Checkpoint files are verified (sizes and sha256 recorded at save) and read weights-only: a
file that is damaged, or holds objects a weights-only load refuses, is refused in one line (`ExportError`).
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError

from model import ModelArgs, ModelConfigError
from model.hf import check_state_dict, hf_model_type, to_hf_config, to_hf_state_dict
from model.hf_causal import DTYPES
from train.checkpoint.writer import META_FILE, read_meta
from train.data.corpus import DataError, atomic_dir, sha256_file
from train.data.tokenizer import TOKENIZER_FILE, load_tokenizer
from train.export.consolidate import (
    ExportError,
    checkpoint_model_args,
    consolidated_state_dict,
    resolve_checkpoint,
)
from train.export.research import export_research

log = logging.getLogger("tessera")

TOKENIZER_FILES = (
    TOKENIZER_FILE, "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json", "vocab.json",
    "merges.txt", "tokenizer.model", "chat_template.jinja", "chat_template.json",
)
"""Files copied from the run's tokenizer dir when present (tokenizer.json must be)."""


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
    hf_state = to_hf_state_dict(state, hf_model_type(args))  # MoE experts in the family's per-expert names
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
    if dtype not in DTYPES.values():
        raise ExportError(f"dtype={dtype} is not supported: use one of {', '.join(DTYPES)}")
    try:
        meta = read_meta(tag_dir)
    except json.JSONDecodeError as err:
        raise ExportError(f"{tag_dir / META_FILE}: not valid JSON ({err})") from err
    if meta.get("research"):  # a research recipe: its own weights and how to rebuild it (train/export/research.py)
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
    family = type(config).__name__.removesuffix("Config")  # Llama, Mistral, Qwen2 or Qwen3 (model.hf.hf_model_type)
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
    except (RuntimeError, SafetensorError) as err:  # e.g. safetensors refusing a tensor
        raise ExportError(f"{out}: not written: {_first_line(err)}") from err
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
    except (RuntimeError, SafetensorError) as err:  # e.g. safetensors refusing a tensor
        raise ExportError(f"{out}: not written: {_first_line(err)}") from err
    log.info("exported %s (step %s) to %s", tag_dir, meta.get("step"), out)
    return out


def _first_line(err: BaseException) -> str:
    """The first line of an exception's message (a library's multi-line message kept to one line)."""
    return (str(err).strip().splitlines() or [type(err).__name__])[0]


_EMBEDDING_KEYS = ("embed_tokens.weight", "wte.weight", "lm_head.weight")
"""What a vocabulary extension trains (input rows, and an untied head's rows)."""


def _load_trained(model: torch.nn.Module, state: dict[str, torch.Tensor], tag_dir: Path, base: Path, *,
                  partial: bool) -> None:
    """Put a run's trained weights (`model.`-prefixed wrapper names) into the base model loaded from ``base``.

    partial: the checkpoint holds only what trained (a vocabulary extension: the resized embedding rows; the
    frozen rest is the base's own), and the embedding is resized to the checkpoint's rows first. ``model`` is the
    base in full precision, also for a 4-bit run: the export is that base with the trained rows (a tied head
    stays tied), and the quantization constants a 4-bit run's checkpoint carries are not used.
    """
    state = {k.removeprefix("model."): v for k, v in state.items()}
    if partial:  # a quantized base's constants (absmax, quant_map, ...) ride along: the body is the base's own
        state = {k: v for k, v in state.items() if k.endswith(_EMBEDDING_KEYS)}
    embed = next((v for k, v in state.items() if k.endswith(_EMBEDDING_KEYS[:2])), None)
    if partial and embed is not None and embed.shape[0] != model.get_input_embeddings().weight.shape[0]:
        model.resize_token_embeddings(embed.shape[0], mean_resizing=False)
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = {k for k in missing if k.endswith("lm_head.weight")} if model.config.tie_word_embeddings else set()
    if unexpected or (set(missing) - tied and not partial):
        raise ExportError(f"{tag_dir}: weights do not fit {base} (missing {sorted(missing)[:3]}, "
                          f"unexpected {sorted(unexpected)[:3]})")
