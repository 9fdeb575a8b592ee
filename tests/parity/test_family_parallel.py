"""Imported Llama 3.x / Mistral / Qwen2 / Qwen3 models under tensor parallelism (with sequence parallelism), the
pipeline's stage pieces and the KV-cache generator on 2 gloo ranks equal the single-process model.

One launch covers every family: tp=2 with SP (logits, loss and every gradient, q/k norms and o_proj biases
included), greedy generation with a KV cache through `FullLogits`, and a two-stage pipeline cut from the
pipeline's own pieces (hidden states sent from stage 0 to stage 1).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.family_models import FAMILIES, SEQ_LEN, family_config, perturb, sample_ids
from tests.gloo import run_ranks

TOL = 1e-5


def _save_with_two_kv_heads(root: Path, family: str) -> Path:
    """The family's awkward model with 2 KV heads (tp=2 splits whole KV heads) and 4 layers (2 per stage)."""
    from transformers import AutoModelForCausalLM

    config = family_config(family, layers=4)
    config.num_key_value_heads = 2
    torch.manual_seed(3)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    perturb(model, 3)
    model.save_pretrained(root / family)
    return root / family


def _imported(path: str):
    from model import Transformer
    from model.hf import load_hf_pretrained

    args, state = load_hf_pretrained(path)
    model = Transformer(args)
    model.load_state_dict(state)
    return model


def _check_tp(path: str, world: int) -> float:
    import torch.distributed as dist
    import torch.nn.functional as F

    from model import generate
    from parallel.tp import FullLogits, apply_tp, gather_full_grads, tp_lm_loss

    ref = _imported(path)
    x = sample_ids(ref.args.vocab_size, seq_len=SEQ_LEN)
    y = sample_ids(ref.args.vocab_size, seq_len=SEQ_LEN, seed=2)
    ref_logits = ref(x)
    ref_loss = F.cross_entropy(ref_logits.flatten(0, 1), y.flatten())
    ref_loss.backward()
    ref_grads = {n: p.grad for n, p in ref.named_parameters(remove_duplicate=False)}

    model = _imported(path)
    ctx = apply_tp(model, dist.group.WORLD, sequence_parallel=True)
    loss = tp_lm_loss(model, ctx)(model(x), y)
    loss.backward()
    worst = abs(loss.item() - ref_loss.item())
    whole = FullLogits(model, ctx)
    with torch.no_grad():
        worst = max(worst, (whole(x) - ref_logits).abs().max().item())
    grads = gather_full_grads(model)
    assert grads.keys() == ref_grads.keys()
    for name, grad in grads.items():
        err = (grad - ref_grads[name]).abs().max().item()
        assert err < TOL, f"{path}: {name} gradient differs by {err}"
        worst = max(worst, err)
    prompt = x[:, :5]
    assert torch.equal(generate(whole, prompt, 20), generate(ref, prompt, 20)), f"{path}: TP generation differs"
    return worst


def _check_pp(path: str, rank: int) -> float:
    """Two stages cut from the pipeline's pieces: embedding + first half of the blocks, then the rest + head."""
    import torch.distributed as dist

    from parallel.pipeline import BlockPipe, EmbeddingPipe, HeadPipe, NormPipe

    model = _imported(path).eval()
    x = sample_ids(model.args.vocab_size, seq_len=SEQ_LEN)
    blocks = [BlockPipe(b, model.rope_cos, model.rope_sin, None) for b in model.layers]
    half = len(blocks) // 2
    with torch.no_grad():
        if rank == 0:
            h = EmbeddingPipe(model.embed_tokens)(x)
            for block in blocks[:half]:
                h = block(h)
            dist.send(h.contiguous(), dst=1)
            return 0.0
        h = torch.empty(x.shape[0], x.shape[1], model.args.dim)
        dist.recv(h, src=0)
        for block in blocks[half:]:
            h = block(h)
        logits = HeadPipe(model.lm_head)(NormPipe(model.norm)(h))
        return (logits - model(x)).abs().max().item()


def check_families(rank: int, world: int, paths: list[str]) -> dict[str, float]:
    torch.manual_seed(0)
    out = {}
    for path in paths:
        out[f"tp {Path(path).name}"] = _check_tp(path, world)
        out[f"pp {Path(path).name}"] = _check_pp(path, rank)
    return out


@pytest.mark.slow
def test_families_under_tp_sp_pp_and_cache_match_one_process(tmp_path: Path) -> None:
    paths = [str(_save_with_two_kv_heads(tmp_path, family)) for family in FAMILIES]
    results = run_ranks(2, check_families, (paths,), timeout=300)
    for rank_result in results:
        for what, worst in rank_result.items():
            assert worst < TOL, f"{what}: differs by {worst}"
