"""Soft prompts on an instruct base: the QA rendering frames every mode with the base's BOS and chat template (or
plain text with ``chat: false``), and generated answers end at the stop strings before EM / F1."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from tests.conftest import free_port
from train.config.load import load_config
from train.objectives.lm import lm_loss
from train.research.api import RecipeContext, resolve_terms
from train.research.qa_data import QAExample, cut_at_stop, render, scaffold
from train.research.soft_prompt import SoftPrompt, SoftPromptOptions

TEMPLATE = ("{% for m in messages %}<|user|>{{ m['content'] }}\n{% endfor %}"
            "{% if add_generation_prompt %}<|assistant|>{% endif %}")


@pytest.fixture(scope="module")
def instruct(tiny_bases: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny Llama with a chat template and a tokenizer that puts its BOS before text."""
    from tokenizers.processors import TemplateProcessing
    from transformers import AutoTokenizer

    out = tmp_path_factory.mktemp("instruct") / "llama"
    shutil.copytree(tiny_bases / "llama", out)
    tok = AutoTokenizer.from_pretrained(str(out))
    bos = tok.bos_token
    tok._tokenizer.post_processor = TemplateProcessing(single=f"{bos} $A", special_tokens=[(bos, tok.bos_token_id)])
    tok.chat_template = TEMPLATE
    tok.save_pretrained(str(out))
    return out


def _tok(path: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path))


def test_render_frames_the_prompt_with_bos_and_the_chat_template(instruct: Path, tiny_bases: Path) -> None:
    tok = _tok(instruct)
    ex = QAExample("q", "Alice lives in Paris.", "Where does Alice live?", ("Paris",))
    frame = scaffold(tok)
    assert frame.head[0] == tok.bos_token_id and tok.decode(frame.head[1:]) == "<|user|>"
    r = render(ex, tok, max_prompt_tokens=64, max_answer_tokens=8, anchor="\nAnswer:", frame=frame)
    assert tok.decode(r["prompt"]) == ex.prompt  # the prompt itself is unchanged: truncation keeps the question
    assert tok.decode(r["anchor"]) == "\nAnswer:\n<|assistant|>"
    assert tok.decode(r["answer"][:-1]) == "Paris" and r["answer"][-1] == tok.eos_token_id  # no leading space
    plain = render(ex, tok, max_prompt_tokens=64, max_answer_tokens=8, anchor="\nAnswer:", frame=scaffold(tok, chat=False))
    assert plain["head"] == [] and tok.decode(plain["anchor"]) == "\nAnswer:" and tok.decode(plain["answer"][:-1]) == " Paris"
    base = _tok(tiny_bases / "llama")  # neither BOS before text nor a template: plain text, as before
    assert scaffold(base).head == () and not scaffold(base).chat
    tok.chat_template = "{{ bos_token }}" + TEMPLATE  # a template that writes its own BOS: not twice
    assert scaffold(tok).head.count(tok.bos_token_id) == 1


def _recipe(instruct: Path, tiny_bases: Path, tmp: Path, **options: object) -> tuple[SoftPrompt, object]:
    from model.hf_causal import CausalLM, load_causal_lm

    opts = SoftPromptOptions(synthetic=24, latents=4, encoder_dim=32, max_new_tokens=3, eval_examples=4,
                             bases=[str(tiny_bases / "qwen2")], **options)
    cfg = load_config(None, [f"hf.path={instruct}", "data.corpus=qa", "research.recipe=soft_prompt",
                             f"train.out_dir={tmp}", "data.val_fraction=0.25"])
    train_ds, val_ds = SoftPrompt.datasets(opts, cfg)
    base = CausalLM(load_causal_lm(instruct))
    base.requires_grad_(False)
    ctx = RecipeContext(dim=64, n_layers=2, vocab_size=300, device=torch.device("cpu"), out_dir=tmp, rank=0, seed=0,
                        lm_loss=lm_loss, config=cfg, terms=resolve_terms(SoftPrompt, {}), val_data=val_ds)
    torch.manual_seed(0)
    return SoftPrompt(base, ctx, opts), train_ds


def test_every_mode_reads_the_same_frame(instruct: Path, tiny_bases: Path, tmp_path: Path) -> None:
    """The full prompt through the latent path equals the text baseline inside the frame, exactly; the frame is in
    the training batch of the instruct base only; ``chat: false`` drops it."""
    ext, data = _recipe(instruct, tiny_bases, tmp_path)
    batch = data.batch([0, 1, 2])
    head = scaffold(_tok(instruct)).head
    assert batch["head_0"].tolist() == [list(head)] * 3 and "head_1" not in batch
    for i in range(3):
        one = data.batch([i])
        n = int(one["prompt_mask_0"].sum())
        with torch.no_grad():
            prompt = ext._embed(0, one["prompt_0"][:, :n])
            assert torch.equal(ext._student(0, one, prompt, None), ext._text(0, one))
            framed = ext._text(0, one)
            plain = {k: v for k, v in one.items() if k != "head_0"}
            assert not torch.allclose(framed, ext._text(0, plain))  # the frame changes what the base predicts
    out = ext(batch)
    assert torch.isfinite(out["terms"]["answer_ce"])
    _, plain_data = _recipe(instruct, tiny_bases, tmp_path, chat=False)
    assert "head_0" not in plain_data.batch([0])


def test_answers_end_at_the_stop_strings(instruct: Path, tiny_bases: Path, tmp_path: Path) -> None:
    assert cut_at_stop("  Paris\nQuestion: Where", ["\n"]) == "Paris"
    assert cut_at_stop("Paris. Rome", [".", "\n"]) == "Paris"
    assert cut_at_stop("Paris\nRome", []) == "Paris\nRome"
    ext, _ = _recipe(instruct, tiny_bases, tmp_path, stop=["\n", " and"])
    tok = ext.tokenizers[1]
    assert ext._decode(1, tok.encode(" Rome and Oslo\nQuestion")) == "Rome"
    assert ext._decode(1, tok.encode(" Rome") + [tok.eos_token_id] + tok.encode(" x")) == "Rome"
    ext.options.max_new_tokens = 6
    val = ext.ctx.val_data
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    try:
        with torch.no_grad():
            metrics = ext.eval().evaluate(lambda: iter([val.batch([0, 1]), val.batch([2, 3])]), step=1)
    finally:
        dist.destroy_process_group()
    rows = [json.loads(r) for r in (tmp_path / "predictions" / "qa_step_1.jsonl").read_text().splitlines()]
    assert len(rows) == 8 and 0 <= metrics["b0_text_f1"] <= 100
    assert not any("\n" in r[mode] or " and" in r[mode] for r in rows for mode in ("text", "truncated", "latent"))
