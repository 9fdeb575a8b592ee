"""Soft prompts for frozen LMs: a trainable encoder compresses a prompt into M latent vectors that one or more
frozen HF bases read through ``inputs_embeds`` (and optionally per-layer KV prefixes).

Per base: an adapter maps the latents into its embedding space, rescaled to the RMS of its own embedding rows;
optional KV prefixes are generated from the latents with the base's grouped-query shape. The student reads
[latents | anchor | answer]; the teacher (the same base, adapters off) reads [prompt | anchor | answer]; a base
with a BOS or a chat template (``chat``) reads either inside its own frame [head | ... | anchor + template]. Terms:
``answer_ce`` (teacher-forced answer), ``first_token_ce``, ``k_token_ce`` (first ``k_tokens``), ``kd`` (KL to the
teacher over the answer, teacher passes in chunks of ``kd_chunk`` examples), ``recon`` (the base continues the
latents with the prompt's first ``recon_tokens`` tokens), each averaged over the bases; PAD is never a target.

Evaluation answers every validation question greedily in three modes per base: the full text prompt, the prompt
truncated to M tokens (the fair baseline) and the latents, with exact match / F1, first-token top-1 / top-5
accuracy, the compression ratio, and the predictions in ``predictions/qa_step_N.jsonl``; a generated answer ends
at the first of the ``stop`` strings (a newline by default) before it is scored.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from model.hf_causal import CausalLM, causal_lm_config, load_causal_lm
from model.prefix import greedy_from_embeds, kv_shape, prefix_forward
from train.config.fields import ConfigError
from train.data.tokenizer import load_tokenizer
from train.eval.generations import write_predictions
from train.eval.text import exact_match, token_f1
from train.research.api import Extension, RecipeContext, Term, check_layers, outputs
from train.research.qa_data import ENCODER_BYTES, QADataset, cut_at_stop, read_qa, synthetic_qa
from train.research.run import config_shape
from train.research.soft_prompt_terms import (
    HiddenCapture,
    at_positions,
    first_token_entropy,
    hidden_distance,
    latent_alignment,
)

MODES = ("text", "truncated", "latent")


@dataclass
class SoftPromptOptions:
    latents: int = 8  # M: latent vectors per prompt
    encoder: str = "bytes"  # 'bytes' (UTF-8, any base) or 'tokens' (the first base's tokens and embeddings)
    encoder_dim: int = 128
    encoder_layers: int = 2
    encoder_heads: int = 4
    max_encoder_len: int = 512
    max_prompt_tokens: int = 256
    max_answer_tokens: int = 16
    anchor: str = "\nAnswer:"  # text between the prefix and the answer ('' for none)
    kv_prefix: bool = False  # also feed per-layer key / value prefixes generated from the latents
    bases: list[str] = field(default_factory=list)  # more frozen HF bases sharing the encoder (hf.path is the first)
    k_tokens: int = 3
    kd_temperature: float = 1.0
    kd_chunk: int = 4  # examples per teacher pass
    recon_tokens: int = 0
    synthetic: int = 0  # > 0: a synthetic QA set of this many examples instead of data.files
    max_new_tokens: int = 16  # answer length in the evaluations
    eval_examples: int = 64  # validation questions answered at each evaluation (per run, split over ranks)
    chat: bool = True  # each base reads the prompt in its own format: its BOS and chat template when it has them
    stop: list[str] = field(default_factory=lambda: ["\n"])  # a generated answer ends at the first of these (EM / F1)
    hidden_layers: str = ""  # the 'hidden' term's layers of every base: 'a-b', 'i,j' ('': the last layer)
    text_warmup: int = 0  # the first N training batches alternate text / latent (text ones train LoRA; lora.r > 0)

    def __post_init__(self) -> None:
        if self.encoder not in ("bytes", "tokens"):
            raise ValueError(f"encoder={self.encoder!r}: use 'bytes' or 'tokens'")
        for name in ("latents", "encoder_dim", "encoder_layers", "encoder_heads", "max_encoder_len",
                     "max_prompt_tokens", "max_answer_tokens", "k_tokens", "kd_chunk", "max_new_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)}: must be >= 1")
        if self.text_warmup < 0:
            raise ValueError(f"text_warmup={self.text_warmup}: must be >= 0")
        if self.encoder_dim % self.encoder_heads:
            raise ValueError(f"encoder_dim={self.encoder_dim} is not divisible by encoder_heads={self.encoder_heads}")


class LatentEncoder(nn.Module):
    """Token or byte ids (B, L) -> M latents (B, M, E): a small transformer, then M learned queries attend to it."""

    def __init__(self, vocab: int, dim: int, layers: int, heads: int, latents: int, max_len: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.pos = nn.Parameter(torch.randn(max_len, dim) * 0.02)
        layer = nn.TransformerEncoderLayer(dim, heads, 4 * dim, dropout=0.0, batch_first=True, norm_first=True)
        self.body = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.queries = nn.Parameter(torch.randn(latents, dim) * 0.02)
        self.pool = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.norm = nn.LayerNorm(dim)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor, inputs: torch.Tensor | None = None) -> torch.Tensor:
        x = (self.embed(ids) if inputs is None else inputs) + self.pos[: ids.shape[1]]  # (B, L, E)
        pad = mask == 0
        x = self.body(x, src_key_padding_mask=pad)
        q = self.queries.unsqueeze(0).expand(ids.shape[0], -1, -1)  # (B, M, E)
        z, _ = self.pool(q, x, x, key_padding_mask=pad, need_weights=False)
        return self.norm(z)


class BaseAdapter(nn.Module):
    """Latents (B, M, E) -> the base's embedding space (B, M, D) at the RMS of its embedding rows; optionally
    per-layer (K, V) prefixes (B, n_kv, M, head_dim)."""

    def __init__(self, dim_in: int, dim: int, target_rms: float, kv: tuple[int, int, int] | None) -> None:
        super().__init__()
        self.proj = nn.Linear(dim_in, dim)
        self.gain = nn.Parameter(torch.ones(1))
        self.register_buffer("target_rms", torch.tensor([target_rms]))
        self.kv_shape = kv
        self.kv = nn.Linear(dim_in, kv[0] * 2 * kv[1] * kv[2]) if kv else None
        if self.kv is not None:
            nn.init.normal_(self.kv.weight, std=0.02 / dim_in**0.5)
            nn.init.zeros_(self.kv.bias)

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]] | None]:
        x = self.proj(z)  # (B, M, D)
        x = x * (self.target_rms * self.gain / x.float().pow(2).mean(-1, keepdim=True).add(1e-6).sqrt()).to(x.dtype)
        if self.kv is None:
            return x, None
        n_layers, n_kv, hd = self.kv_shape
        B, M, _ = z.shape
        kv = self.kv(z).view(B, M, n_layers, 2, n_kv, hd).permute(2, 3, 0, 4, 1, 5)  # (L, 2, B, n_kv, M, hd)
        return x, [(kv[i, 0], kv[i, 1]) for i in range(n_layers)]


def _embedding_rms(base: nn.Module) -> float:
    """Mean RMS of the base's input embedding rows (gathered first when ZeRO-3 loaded it partitioned)."""
    w = base.model.get_input_embeddings().weight
    gather = contextlib.nullcontext()
    if hasattr(w, "ds_id"):
        import deepspeed

        gather = deepspeed.zero.GatheredParameters([w])
    with gather:
        return float(w.detach().float().pow(2).mean(-1).sqrt().mean())


class SoftPrompt(Extension):
    Options = SoftPromptOptions
    terms: ClassVar[dict[str, Term]] = {"answer_ce": Term(1.0), "first_token_ce": Term(0.0),
                                        "k_token_ce": Term(0.0), "kd": Term(0.0), "recon": Term(0.0),
                                        "first_entropy": Term(0.0), "align": Term(0.0), "hidden": Term(0.0)}

    # ------------------------------------------------------------------------------------------- planning
    @classmethod
    def check(cls, options: SoftPromptOptions, ctx: RecipeContext) -> None:
        cfg = ctx.config
        if cfg is None:
            return
        if cfg.hf.path is None:
            raise ConfigError("research.recipe='soft_prompt' needs hf.path: the first frozen HF base.")
        if cfg.data.corpus != "qa":
            raise ConfigError(f"research.recipe='soft_prompt' reads QA data: set data.corpus='qa' (got "
                              f"{cfg.data.corpus!r}), with data.files or research.options.synthetic.")
        if options.kv_prefix and cfg.hf.gradient_checkpointing:
            raise ConfigError("research.options.kv_prefix=true with hf.gradient_checkpointing=true: transformers' "
                              "checkpointed layers drop the cache that holds the prefix; turn one of them off.")
        if not options.synthetic and not cfg.data.files:
            raise ConfigError("research.recipe='soft_prompt': set data.files (SQuAD JSON / JSONL) or "
                              "research.options.synthetic (a synthetic set's size).")

        shapes = [config_shape(causal_lm_config(path, where=f"research.options.bases[{i}]"))
                  for i, path in enumerate(options.bases)]
        if options.hidden_layers:
            for i, (_, depth) in enumerate([(ctx.dim, ctx.n_layers), *shapes]):
                check_layers(options.hidden_layers, depth, f"research.options.hidden_layers (base {i})")
        if options.text_warmup and cfg.lora.r == 0:
            raise ConfigError(f"research.options.text_warmup={options.text_warmup}: a text batch trains only the "
                              f"bases' LoRA adapters (the prompt reaches them as text), and lora.r=0; set lora.r or "
                              f"text_warmup=0.")

    @classmethod
    def metrics(cls, options: SoftPromptOptions) -> list[str]:
        """Per base b: ``b{b}_{mode}_{em,f1,top1,top5}`` for each mode and ``b{b}_compression``."""
        return [m for b in range(1 + len(options.bases)) for m in
                [*(f"b{b}_{mode}_{k}" for mode in MODES for k in ("em", "f1", "top1", "top5")), f"b{b}_compression"]]

    @classmethod
    def datasets(cls, options: SoftPromptOptions, cfg: Any) -> tuple[QADataset, QADataset]:
        """(train, validation) rendered for every base with its own tokenizer."""
        examples = synthetic_qa(options.synthetic, seed=cfg.data.split_seed) if options.synthetic else \
            read_qa(cfg.data.files)
        tokenizers = [load_tokenizer(Path(p)) for p in [cfg.hf.path, *options.bases]]
        order = np.random.default_rng(cfg.data.split_seed).permutation(len(examples)).tolist()
        n_val = max(1, round(cfg.data.val_fraction * len(examples)))
        if n_val >= len(examples):
            raise ConfigError(f"{len(examples)} QA examples: too few to hold out data.val_fraction="
                              f"{cfg.data.val_fraction} and train on the rest.")

        def split(idx: list[int]) -> QADataset:
            return QADataset([examples[i] for i in sorted(idx)], tokenizers,
                             encoder_tokenizer=tokenizers[0] if options.encoder == "tokens" else None,
                             max_prompt_tokens=options.max_prompt_tokens, max_answer_tokens=options.max_answer_tokens,
                             max_encoder_len=options.max_encoder_len, anchor=options.anchor, chat=options.chat)

        return split(order[n_val:]), split(order[:n_val])

    # ------------------------------------------------------------------------------------------- modules
    def setup(self) -> None:
        o = self.options
        cfg = self.ctx.config
        self.tokenizers = [load_tokenizer(Path(p)) for p in [cfg.hf.path, *o.bases]] if cfg is not None else []
        dtype = next(self.base.parameters()).dtype
        others = [CausalLM(load_causal_lm(p, dtype=dtype if dtype.is_floating_point else torch.float32))
                  for p in o.bases]
        for m in others:
            m.requires_grad_(False)
        self.others = nn.ModuleList(others)
        vocab = ENCODER_BYTES if o.encoder == "bytes" else self.base.config.vocab_size
        self.encoder = LatentEncoder(vocab, o.encoder_dim, o.encoder_layers, o.encoder_heads, o.latents,
                                     o.max_encoder_len)
        if o.encoder == "tokens":  # the first base's own (frozen) token embeddings feed the encoder
            self.encoder.embed = None
            self.token_proj = nn.Linear(self.base.config.hidden_size, o.encoder_dim)
        self.adapters = nn.ModuleList(
            BaseAdapter(o.encoder_dim, b.config.hidden_size, _embedding_rms(b), kv_shape(b.config) if o.kv_prefix
                        else None) for b in self.bases())
        self.register_buffer("batches_seen", torch.zeros(1, dtype=torch.long))  # training batches (text warm-up)
        self.capture = None
        if self.uses("hidden"):
            depths = [config_shape(b.config)[1] for b in self.bases()]
            layers = [check_layers(o.hidden_layers or str(d - 1), d, "research.options.hidden_layers") for d in depths]
            self.capture = HiddenCapture(self.bases(), layers)

    def bases(self) -> list[nn.Module]:
        return [self.base, *self.others]

    def uses(self, name: str) -> bool:
        """Whether a term is ever weighted (a constant zero is skipped, with its cost)."""
        term = (self.ctx.terms or self.terms).get(name)
        return term is not None and not (term.schedule == "constant" and term.weight == 0.0)

    def latents(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        ids, mask = batch["enc_ids"], batch["enc_mask"]
        inputs = None
        if self.options.encoder == "tokens":
            emb = self.base.model.get_input_embeddings()(ids).detach()
            inputs = self.token_proj(emb.to(self.token_proj.weight.dtype))
        return self.encoder(ids, mask, inputs)  # (B, M, E)

    # ------------------------------------------------------------------------------------------- sequences
    def _embed(self, b: int, ids: torch.Tensor) -> torch.Tensor:
        return self.bases()[b].model.get_input_embeddings()(ids)

    def _head(self, b: int, batch: dict[str, torch.Tensor], rows: int) -> torch.Tensor:
        """The base's frame before the prompt (BOS, chat template), (rows, H); H = 0 for a plain-text base."""
        head = batch.get(f"head_{b}")
        if head is None:
            return torch.zeros(rows, 0, dtype=torch.long, device=batch[f"anchor_{b}"].device)
        return head[:rows]

    def _student(self, b: int, batch: dict[str, torch.Tensor], prefix: torch.Tensor, kv: Any,
                 tail: str = "answer") -> torch.Tensor:
        """Logits (B, A, V) predicting each ``tail`` token after [head | prefix (B, M, D) | anchor | tail]."""
        anchor, tail_ids, tail_mask = batch[f"anchor_{b}"], batch[f"{tail}_{b}"], batch[f"{tail}_mask_{b}"]
        head = self._head(b, batch, prefix.shape[0])
        embeds = torch.cat([self._embed(b, head), prefix.to(self._embed(b, anchor).dtype), self._embed(b, anchor),
                            self._embed(b, tail_ids)], dim=1)
        ones = torch.ones(prefix.shape[0], head.shape[1] + prefix.shape[1], dtype=tail_mask.dtype,
                          device=tail_mask.device)
        mask = torch.cat([ones, batch[f"anchor_mask_{b}"], tail_mask], dim=1)
        logits = prefix_forward(self.bases()[b], embeds, mask, kv_prefix=kv)
        start = head.shape[1] + prefix.shape[1] + anchor.shape[1] - 1  # predicts the first tail token
        return logits[:, start:start + tail_ids.shape[1]]

    def _text(self, b: int, batch: dict[str, torch.Tensor], rows: slice | None = None,
              truncate: int | None = None) -> torch.Tensor:
        """Logits (B, A, V) predicting the answer after [head | prompt | anchor | answer] through input_ids."""
        base = self.bases()[b]
        rows = rows or slice(None)
        prompt, pmask = batch[f"prompt_{b}"][rows], batch[f"prompt_mask_{b}"][rows]
        if truncate is not None:
            prompt, pmask = prompt[:, :truncate], pmask[:, :truncate]
        anchor, answer, amask = batch[f"anchor_{b}"][rows], batch[f"answer_{b}"][rows], batch[f"answer_mask_{b}"][rows]
        head = self._head(b, batch, batch[f"anchor_{b}"].shape[0])[rows]
        lengths = pmask.sum(1)
        seqs = [torch.cat([head[i], prompt[i, :lengths[i]], anchor[i], answer[i]]) for i in range(prompt.shape[0])]
        width = max(len(s) for s in seqs)
        pad = int(answer[0, -1]) if answer.numel() else 0
        ids = torch.full((len(seqs), width), pad, dtype=torch.long, device=prompt.device)
        mask = torch.zeros_like(ids)
        for i, s in enumerate(seqs):
            ids[i, :len(s)] = s
            mask[i, :len(s) - answer.shape[1]] = 1
            mask[i, len(s) - answer.shape[1]:len(s)] = amask[i]
        logits = base.model(input_ids=ids, attention_mask=mask).logits.float()
        starts = head.shape[1] + lengths + anchor.shape[1] - 1  # (B,)
        offsets = starts[:, None] + torch.arange(answer.shape[1], device=ids.device)  # (B, A)
        return logits.gather(1, offsets[..., None].expand(-1, -1, logits.shape[-1]))

    @contextlib.contextmanager
    def teacher(self, b: int) -> Iterator[None]:
        """The frozen base as it was: LoRA adapters off."""
        peft = getattr(self.bases()[b], "model", None)
        with peft.disable_adapter() if hasattr(peft, "disable_adapter") else contextlib.nullcontext():
            yield

    # ------------------------------------------------------------------------------------------- losses
    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, Any]:
        if self.training and self.options.text_warmup:
            seen = int(self.batches_seen)
            self.batches_seen += 1
            if seen < self.options.text_warmup and seen % 2 == 1:
                return self.text_batch(batch)
        z = self.latents(batch)
        sums: dict[str, torch.Tensor] = {}
        first_logits = None
        for b in range(len(self.bases())):
            prefix, kv = self.adapters[b](z)
            with self.capture.recording(b) if self.capture is not None else contextlib.nullcontext({}) as states:
                logits = self._student(b, batch, prefix, kv)  # (B, A, V)
            self._student_states = dict(states)
            labels = batch[f"answer_{b}"].masked_fill(batch[f"answer_mask_{b}"] == 0, -100)  # PAD never a target
            parts = self.losses(b, batch, logits, labels, prefix, kv)
            for name, value in parts.items():
                sums[name] = sums.get(name, 0.0) + value / len(self.bases())
            if b == 0:
                first_logits = (logits, labels)
        return outputs(sums, logits=first_logits[0] if first_logits is not None else None) | \
            {"labels": first_logits[1]}

    def losses(self, b: int, batch: dict[str, torch.Tensor], logits: torch.Tensor, labels: torch.Tensor,
               prefix: torch.Tensor, kv: Any) -> dict[str, torch.Tensor]:
        o = self.options
        flat = logits.flatten(0, 1)
        out = {"answer_ce": F.cross_entropy(flat, labels.flatten(), ignore_index=-100)}
        if self.uses("first_token_ce"):
            out["first_token_ce"] = F.cross_entropy(logits[:, 0], labels[:, 0], ignore_index=-100)
        if self.uses("k_token_ce"):
            k = min(o.k_tokens, labels.shape[1])
            out["k_token_ce"] = F.cross_entropy(logits[:, :k].flatten(0, 1), labels[:, :k].flatten(), ignore_index=-100)
        if self.uses("kd"):
            out["kd"] = self.distill(b, batch, logits, labels)
        if self.uses("first_entropy"):
            out["first_entropy"] = first_token_entropy(logits, labels)
        if self.uses("align"):
            lengths = batch[f"prompt_mask_{b}"].sum(1)
            out["align"] = latent_alignment(prefix, self._embed(b, batch[f"prompt_{b}"]), lengths)
        if self.uses("hidden"):
            out["hidden"] = self.hidden(b, batch, prefix.shape[1])
        if self.uses("recon") and o.recon_tokens > 0:
            r = {**batch, f"prompt_{b}": batch[f"prompt_{b}"][:, :o.recon_tokens],
                 f"prompt_mask_{b}": batch[f"prompt_mask_{b}"][:, :o.recon_tokens]}
            rec = self._student(b, r, prefix, kv, tail="prompt")
            target = r[f"prompt_{b}"].masked_fill(r[f"prompt_mask_{b}"] == 0, -100)
            out["recon"] = F.cross_entropy(rec.flatten(0, 1), target.flatten(), ignore_index=-100)
        return out

    def text_batch(self, batch: dict[str, torch.Tensor]) -> dict[str, Any]:
        """A text warm-up batch: the answer's cross-entropy after the full text prompt, LoRA adapters on."""
        total = None
        for b in range(len(self.bases())):
            labels = batch[f"answer_{b}"].masked_fill(batch[f"answer_mask_{b}"] == 0, -100)
            ce = F.cross_entropy(self._text(b, batch).flatten(0, 1), labels.flatten(), ignore_index=-100)
            total = ce / len(self.bases()) if total is None else total + ce / len(self.bases())
        return outputs({"answer_ce": total})

    def hidden(self, b: int, batch: dict[str, torch.Tensor], m: int) -> torch.Tensor:
        """The student's states (captured in ``forward``) against the teacher's at the same answer positions,
        averaged over the layers; the teacher runs ``kd_chunk`` examples at a time."""
        head, anchor = self._head(b, batch, batch[f"anchor_{b}"].shape[0]), batch[f"anchor_{b}"]
        amask = batch[f"answer_mask_{b}"]
        width = amask.shape[1]
        start = head.shape[1] + m + anchor.shape[1] - 1
        starts = torch.full((amask.shape[0],), start, device=amask.device)
        total = amask.new_zeros((), dtype=torch.float32)
        for layer, student in sorted(self._student_states.items()):
            teacher = []
            for first in range(0, amask.shape[0], self.options.kd_chunk):
                rows = slice(first, first + self.options.kd_chunk)
                with torch.no_grad(), self.teacher(b), self.capture.recording(b) as states:
                    self._text(b, batch, rows)
                t_starts = head.shape[1] + batch[f"prompt_mask_{b}"][rows].sum(1) + anchor.shape[1] - 1
                teacher.append(at_positions(states[layer], t_starts, width))
            total = total + hidden_distance(at_positions(student, starts, width), torch.cat(teacher), amask)
        return total / max(1, len(self._student_states))

    def distill(self, b: int, batch: dict[str, torch.Tensor], logits: torch.Tensor,
                labels: torch.Tensor) -> torch.Tensor:
        """KL(teacher || student) over the answer tokens at temperature T (scaled by T^2); the teacher (the same
        base reading the full prompt, adapters off) runs ``kd_chunk`` examples at a time."""
        T, chunk = self.options.kd_temperature, self.options.kd_chunk
        total = logits.new_zeros(())
        n = (labels != -100).sum().clamp(min=1)
        for start in range(0, logits.shape[0], chunk):
            rows = slice(start, start + chunk)
            with torch.no_grad(), self.teacher(b):
                teacher = self._text(b, batch, rows)  # (c, A, V)
            keep = labels[rows] != -100  # (c, A)
            log_p = F.log_softmax(teacher[keep].float() / T, -1)
            log_q = F.log_softmax(logits[rows][keep].float() / T, -1)
            total = total + (log_p.exp() * (log_p - log_q)).sum()
        return total / n * T * T

    # ------------------------------------------------------------------------------------------- evaluation
    def evaluate(self, batches: Callable[[], Iterator[dict[str, torch.Tensor]]], step: int | None
                 ) -> dict[str, float]:
        """Answers in the three modes per base (greedy), first-token accuracy, compression; predictions JSONL.

        The examples are the first ``eval_examples`` of the evaluation (indices below it), the same for any
        layout: every rank answers the micro-batches that may hold them, as many on every rank (the
        evaluation's micro-batches go round the data-parallel ranks), and keeps the rows of those examples."""
        import torch.distributed as dist

        o, world = self.options, dist.get_world_size()
        tp = self.ctx.tp_ctx
        dp = world // (tp.size if tp is not None else 1)
        rows: list[dict[str, Any]] = []
        for i, batch in enumerate(batches()):
            needed = -(-o.eval_examples // len(batch["index"]))  # micro-batches holding the examples
            if i >= -(-needed // dp):
                break
            rows += [r for r in self._answer_batch(batch) if 0 <= r["index"] < o.eval_examples]
        gathered: list[list[dict[str, Any]]] = [[] for _ in range(world)]
        replica = tp is not None and tp.rank != 0  # the ranks of a tensor-parallel group answered the same rows
        dist.all_gather_object(gathered, [] if replica else rows)
        rows = sorted((r for part in gathered for r in part), key=lambda r: (r["base"], r["index"]))
        metrics: dict[str, float] = {}
        for b in range(len(self.bases())):
            mine = [r for r in rows if r["base"] == b]
            for mode in MODES:
                for r in mine:
                    r[f"{mode}_em"] = exact_match(r[mode], r["answers"])
                    r[f"{mode}_f1"] = token_f1(r[mode], r["answers"])
                n = max(1, len(mine))
                metrics[f"b{b}_{mode}_em"] = 100.0 * sum(r[f"{mode}_em"] for r in mine) / n
                metrics[f"b{b}_{mode}_f1"] = 100.0 * sum(r[f"{mode}_f1"] for r in mine) / n
                metrics[f"b{b}_{mode}_top1"] = 100.0 * sum(r[f"{mode}_top1"] for r in mine) / n
                metrics[f"b{b}_{mode}_top5"] = 100.0 * sum(r[f"{mode}_top5"] for r in mine) / n
            metrics[f"b{b}_compression"] = sum(r["prompt_tokens"] for r in mine) / n / o.latents
        if self.ctx.rank == 0 and step is not None:
            preds = [{**r, "prediction": r["latent"]} for r in rows]
            write_predictions(self.ctx.out_dir / "predictions" / f"qa_step_{step}.jsonl", preds)
        return metrics

    def _answer_batch(self, batch: dict[str, torch.Tensor]) -> list[dict[str, Any]]:
        """One validation batch answered by every base in every mode (rows carry the gold answers)."""
        o = self.options
        z = self.latents(batch)
        out = []
        examples = [self.ctx.val_data.examples[int(i)] for i in batch["index"]]
        for b, base in enumerate(self.bases()):
            prefix, kv = self.adapters[b](z)
            gold = batch[f"answer_{b}"][:, 0]
            with self.teacher(b):
                firsts = {"text": self._text(b, batch)[:, 0], "truncated": self._text(b, batch, truncate=o.latents)[:, 0]}
            firsts["latent"] = self._student(b, batch, prefix, kv)[:, 0]
            lengths = batch[f"prompt_mask_{b}"].sum(1).tolist()
            anchor = self._embed(b, batch[f"anchor_{b}"])  # (B, N, D)
            prompts = self._embed(b, batch[f"prompt_{b}"])  # (B, P, D)
            head = self._embed(b, self._head(b, batch, len(lengths)))  # (B, H, D)
            inputs = {"text": [torch.cat([head[i], prompts[i, :n], anchor[i]]) for i, n in enumerate(lengths)],
                      "truncated": [torch.cat([head[i], prompts[i, :min(n, o.latents)], anchor[i]]) for i, n in
                                    enumerate(lengths)],
                      "latent": [torch.cat([head[i], prefix[i].to(anchor.dtype), anchor[i]])
                                 for i in range(len(lengths))]}
            answers = {}
            for mode in MODES:
                with self.teacher(b) if mode != "latent" else contextlib.nullcontext():
                    ids = greedy_from_embeds(base, inputs[mode], max_new_tokens=o.max_new_tokens, eos_id=None,
                                             kv_prefix=kv if mode == "latent" else None)
                answers[mode] = [self._decode(b, seq) for seq in ids]
            for i, ex in enumerate(examples):
                row = {"index": int(batch["index"][i]), "base": b, "question": ex.question,
                       "answers": list(ex.answers), "prompt_tokens": lengths[i]}
                for mode in MODES:
                    top5 = firsts[mode][i].topk(5).indices
                    row[mode] = answers[mode][i]
                    row[f"{mode}_top1"] = float(top5[0] == gold[i])
                    row[f"{mode}_top5"] = float((top5 == gold[i]).any())
                out.append(row)
        return out

    def _decode(self, b: int, ids: list[int]) -> str:
        tok = self.tokenizers[b]
        if tok.eos_token_id in ids:  # every rank generates the same number of tokens; cut at the first eos
            ids = ids[:ids.index(tok.eos_token_id)]
        return cut_at_stop(tok.decode(ids, skip_special_tokens=True), self.options.stop)
