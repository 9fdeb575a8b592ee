"""Hidden-state injection: a vector added to the residual stream after each layer of a range, scaled by lambda.

The vector is either ``fixed`` (sampled once from the run's seed, a buffer saved with every checkpoint) or made
by a trainable ``head`` from the residual stream where the range starts: a bottleneck projection
D -> rank -> D (``variational``: the bottleneck is a Gaussian sampled with the reparameterisation trick and a
KL term to N(0, I) joins the loss); with ``pooled`` the head reads the mean of each sequence's unscored context
(an SFT prompt) and one vector per sequence is added at every position. The base is frozen; with ``hf.path`` it
may be 4-bit and carry LoRA adapters, which train alongside the head. At the end of training the same multi-turn
prompt is answered by the base (injection and adapters off) and by the modified model, greedily, and both are
written to ``consistency.jsonl``.

    research: {recipe: injection, options: {layers: '1-2', scale: 0.5, source: variational, rank: 8}}
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from model import generate
from parallel.comm import reduce_from_tp
from parallel.tp import FullLogits
from train.config.fields import ConfigError
from train.research.api import Extension, RecipeContext, Term, check_layers, outputs

SOURCES = ("fixed", "head", "variational")


@dataclass
class InjectionOptions:
    layers: str = "0"  # layers after which the vector is added: an index, 'a-b' (inclusive) or 'i,j,k'
    scale: float = 1.0  # lambda: 0 leaves the base exactly as it is
    source: str = "head"  # 'fixed', 'head' or 'variational'
    rank: int = 16  # the head's bottleneck width
    fixed_norm: float = 1.0  # source='fixed': the vector's L2 norm
    prompts: list[str] = field(default_factory=lambda: ["Hello, who are you?", "Say that again, shorter."])
    max_new_tokens: int = 24  # tokens per answer in the consistency evaluation (0 skips it)
    pooled: bool = False  # one vector per sequence: the head reads the mean of its unscored context (SFT prompts)

    def __post_init__(self) -> None:
        if self.source not in SOURCES:
            raise ValueError(f"source={self.source!r}: use one of {', '.join(SOURCES)}")
        if self.rank < 1:
            raise ValueError(f"rank={self.rank}: must be >= 1")
        if self.max_new_tokens < 0:
            raise ValueError(f"max_new_tokens={self.max_new_tokens}: must be >= 0")


class InjectionHead(nn.Module):
    """Residual stream (B, T, D) -> injected vector (B, T, D) through a rank-r bottleneck (optionally Gaussian).

    Its parameters are its own (no submodules), so ZeRO-3 gathers them whenever the head is called.
    """

    def __init__(self, dim: int, rank: int, variational: bool) -> None:
        super().__init__()
        self.variational = variational
        width = 2 * rank if variational else rank
        self.down_weight = nn.Parameter(torch.randn(width, dim) * dim**-0.5)
        self.down_bias = nn.Parameter(torch.zeros(width))
        self.up_weight = nn.Parameter(torch.randn(dim, rank) * rank**-0.5)
        self.up_bias = nn.Parameter(torch.zeros(dim))

    def forward(self, h: torch.Tensor, noise: Any = torch.randn_like,
                shared: Any = lambda p: p) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``noise(mu)``: standard normal draws shaped like ``mu`` (B, T, r); ``shared(p)``: each parameter as
        it is used (under sequence parallelism, with its gradient summed over the slices' ranks)."""
        z = F.linear(h.float(), shared(self.down_weight), shared(self.down_bias))  # (B, T, r) or (B, T, 2r)
        kl = None
        if self.variational:
            mu, logvar = z.chunk(2, dim=-1)
            logvar = logvar.clamp(-10.0, 10.0)
            z = mu + noise(mu) * (0.5 * logvar).exp() if self.training else mu
            kl = 0.5 * (mu.square() + logvar.exp() - 1.0 - logvar).sum(-1).mean()  # per position, averaged
        return F.linear(torch.tanh(z), shared(self.up_weight), shared(self.up_bias)), kl


class Injection(Extension):
    Options = InjectionOptions
    terms: ClassVar[dict[str, Term]] = {"lm": Term(1.0), "kl": Term(0.01, schedule="linear", end=100)}

    @classmethod
    def check(cls, options: InjectionOptions, ctx: RecipeContext) -> None:
        check_layers(options.layers, ctx.n_layers, "research.options.layers")
        cfg = ctx.config
        if options.pooled and options.source == "fixed":
            raise ConfigError("research.options.pooled=true pools the stream into the head's input; source='fixed' "
                              "has no head (its vector is the same for every sequence already).")
        if options.pooled and cfg is not None and cfg.data.corpus != "sft":
            raise ConfigError(f"research.options.pooled=true pools each sequence's unscored context (the prompt of "
                              f"data.corpus='sft'); with data.corpus={cfg.data.corpus!r} every position is scored, "
                              f"so a pooled vector would carry later tokens back to earlier predictions.")
        if options.pooled and cfg is not None and cfg.parallel.sequence_parallel:
            raise ConfigError("research.options.pooled=true needs every position of a sequence on each rank: set "
                              "parallel.sequence_parallel=false.")
        if options.source != "variational" and ctx.config is not None and "kl" in ctx.config.research.terms:
            raise ConfigError(f"research.terms.kl: there is no KL term with research.options.source="
                              f"{options.source!r} (only 'variational' has one).")

    def setup(self) -> None:
        o, ctx = self.options, self.ctx
        self.layer_ids = check_layers(o.layers, ctx.n_layers, "research.options.layers")
        if o.source == "fixed":
            g = torch.Generator().manual_seed(ctx.seed)
            v = torch.randn(ctx.dim, generator=g)
            self.register_buffer("vector", v * (o.fixed_norm / v.norm()))  # (D,)
            self.head = None
        else:
            self.head = InjectionHead(ctx.dim, o.rank, variational=o.source == "variational")
        self.scale = o.scale
        self._v: torch.Tensor | None = None
        self._kl: torch.Tensor | None = None
        self._context: torch.Tensor | None = None  # pooled: (B, T) 1 where the position is unscored context
        self.hooks.add(self.layer_ids, self._inject)

    def _inject(self, layer: int, h: torch.Tensor) -> torch.Tensor:
        if self.head is None:
            v = self.vector.to(h.dtype)
        else:
            if layer == self.layer_ids[0]:  # made from the stream where the range starts, reused after
                self._v, self._kl = self.head(self._pool(h), self._noise, self.shared)  # (B, T or 1, D)
            v = self._v.to(h.dtype)
        return h + self.scale * v

    def _pool(self, h: torch.Tensor) -> torch.Tensor:
        """pooled: (B, T, D) -> (B, 1, D), the mean over each sequence's context positions (zeros without any),
        or over every position outside training batches (the consistency answers: all of it was seen); else ``h``."""
        if not self.options.pooled:
            return h
        if self._context is None or self._context.shape != h.shape[:2]:
            return h.mean(1, keepdim=True)
        w = self._context.to(h.dtype)[..., None]  # (B, T, 1)
        return (h * w).sum(1, keepdim=True) / w.sum(1, keepdim=True).clamp(min=1)

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, Any]:
        self._kl = None
        labels = batch.get("labels")
        self._context = (labels == -100) if self.options.pooled and labels is not None else None
        lm, logits = self.base_lm(batch)
        terms = {"lm": lm}
        if self.options.source == "variational":
            kl = self._kl if self._kl is not None else lm.new_zeros(())
            terms["kl"] = self._mean_over_sequence_slices(kl)
        return outputs(terms, logits=logits)

    def _noise(self, mu: torch.Tensor) -> torch.Tensor:
        """Normal draws for the whole sequence, of which a sequence-parallel rank keeps its slice: the same
        numbers as one process draws, whatever the layout."""
        tp = self.ctx.tp_ctx
        if tp is None or tp.size == 1 or not tp.sequence_parallel:
            return torch.randn_like(mu)
        B, t, r = mu.shape  # t: this rank's positions
        full = torch.randn(B, t * tp.size, r, dtype=mu.dtype, device=mu.device)
        return full[:, tp.rank * t:(tp.rank + 1) * t]

    def _mean_over_sequence_slices(self, x: torch.Tensor) -> torch.Tensor:
        """Under sequence parallelism each TP rank saw its slice of the positions: average them."""
        tp = self.ctx.tp_ctx
        if tp is None or tp.size == 1 or not tp.sequence_parallel:
            return x

        return reduce_from_tp(x, tp.group) / tp.size

    # ----------------------------------------------------------------------------------- consistency
    @contextlib.contextmanager
    def base_only(self) -> Iterator[None]:
        """The base as it was: no injection, LoRA adapters off."""
        peft = getattr(self.base, "model", None)
        adapters = peft.disable_adapter() if hasattr(peft, "disable_adapter") else contextlib.nullcontext()
        with self.hooks.disabled(), adapters:
            yield

    def report(self, step: int) -> dict[str, Any]:
        o, ctx = self.options, self.ctx
        self._context = None  # generation: pooled over every position seen
        if o.max_new_tokens == 0 or ctx.tokenizer is None:
            return {}
        rows = []
        histories: dict[str, list[dict[str, str]]] = {"base": [], "modified": []}
        for turn, prompt in enumerate(o.prompts):
            row: dict[str, Any] = {"step": step, "turn": turn, "prompt": prompt}
            for which in ("base", "modified"):
                histories[which].append({"role": "user", "content": prompt})
                with self.base_only() if which == "base" else contextlib.nullcontext():
                    answer = self._answer(histories[which])
                histories[which].append({"role": "assistant", "content": answer})
                row[which] = answer
            row["same"] = row["base"] == row["modified"]
            rows.append(row)
        if ctx.rank == 0:
            with open(ctx.out_dir / "consistency.jsonl", "a") as f:
                for row in rows:
                    f.write(json.dumps(row) + "\n")
        return {"consistency_same_turns": sum(r["same"] for r in rows), "consistency_turns": len(rows)}

    def _answer(self, messages: list[dict[str, str]]) -> str:
        tok, ctx = self.ctx.tokenizer, self.ctx
        if getattr(tok, "chat_template", None):
            ids = tok.apply_chat_template(messages, add_generation_prompt=True)
        else:
            text = "".join(f"{m['role'].capitalize()}: {m['content']}\n" for m in messages) + "Assistant:"
            ids = tok.encode(text)
        base: nn.Module = self.base
        if ctx.tp_ctx is not None and ctx.tp_ctx.size > 1:
            base = FullLogits(base, ctx.tp_ctx)
        limit = getattr(self.base, "max_seq_len", None) or self.base.args.max_seq_len
        ids = ids[-(limit - self.options.max_new_tokens):]
        x = torch.tensor([ids], device=ctx.device)
        out = generate(base, x, self.options.max_new_tokens, temperature=0.0,
                       stop_tokens=(tok.eos_token_id,) if tok.eos_token_id is not None else ())
        return tok.decode(out[0, len(ids):].tolist(), skip_special_tokens=True).strip()

