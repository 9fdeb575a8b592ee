"""End to end: a tensor-parallel checkpoint whose vocabulary does not divide by tp exports to HF.

Each TP rank holds ceil(V / tp) embedding (and head) rows, the last rank's padded; consolidation cuts the merged
tensor back to V rows. That cut must be a tensor of its own (safetensors refuses a view into a larger buffer),
tied or untied. The exported directory must load in transformers and give the logits of Tessera's own model
built from the consolidated weights; a directory that cannot be written is one `tessera: error:` line.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
import transformers

from model import ModelArgs, Transformer
from tests.conftest import REPO, run_job
from tests.e2e.test_train_e2e import _common, _deepspeed
from train.export.consolidate import consolidated_state_dict

pytestmark = pytest.mark.slow

EXPORT_TOOL = str(REPO / "tools" / "export_hf.py")
ODD_VOCAB = 509  # a prime: divides by neither 2 nor 4


@pytest.mark.parametrize(("tp", "tied"), [(2, True), (4, False)], ids=["tp2-tied", "tp4-untied"])
def test_tp_checkpoint_with_odd_vocabulary_exports(tmp_path: Path, data_cache: Path, tp: int, tied: bool) -> None:
    run_dir = tmp_path / "run"
    args = _common(run_dir, data_cache, f"data.vocab_size={ODD_VOCAB}", f"parallel.tp={tp}",
                   f"model.n_kv_heads={tp}", f"model.tie_embeddings={str(tied).lower()}", "train.steps=2",
                   "train.warmup_steps=1", "train.eval_interval=0", "train.save_interval=0",
                   "sample.max_new_tokens=0")
    run_job(_deepspeed(tp, *args), tmp_path)
    tag_dir = run_dir / "checkpoints" / "step_00000002"
    meta = json.loads((tag_dir / "tessera.json").read_text())
    assert meta["model_args"]["vocab_size"] == ODD_VOCAB and meta["model_args"]["tie_embeddings"] is tied

    out = tmp_path / "hf"
    proc = run_job([sys.executable, EXPORT_TOOL, str(run_dir), "--out", str(out)], tmp_path)
    assert proc.stdout.strip() == str(out)
    hf = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert hf.config.vocab_size == ODD_VOCAB and hf.config.tie_word_embeddings is tied
    model = Transformer(ModelArgs(**meta["model_args"])).eval()
    model.load_state_dict(consolidated_state_dict(tag_dir), strict=True)
    x = torch.randint(0, ODD_VOCAB, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want, got = model(x), hf(x, use_cache=False).logits  # (2, 24, V)
    assert got.shape == (2, 24, ODD_VOCAB)
    assert (want - got).abs().max().item() < 1e-5
    if not tied:  # the head's own rows were exported, not the embedding's
        assert not torch.equal(hf.lm_head.weight, hf.model.embed_tokens.weight)

    blocker = tmp_path / "a_file"
    blocker.write_text("")
    proc = run_job([sys.executable, EXPORT_TOOL, str(run_dir), "--out", str(blocker / "hf")], tmp_path, check=False)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 1 and len(lines) == 1 and lines[0].startswith("tessera: error: "), proc.stderr
