"""tools/embeddings_to_snapshot.py: a full embed_tokens matrix and its token list become an embedding snapshot that
loads into a fresh base with the new rows bitwise; a token order that does not line up, a changed base row or an
untied head without its matrix is one line and exit 2."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from tests.unit.embed_models import NEW_WORDS, load_model, make_tokenizer, save_model
from tools.embeddings_to_snapshot import main
from train.data.tokenizer import load_tokenizer
from train.vocab.extend import embedding_weights, extend_vocabulary
from train.vocab.snapshot import load_embedding_snapshot


@pytest.fixture(scope="module")
def bases(tmp_path_factory: pytest.TempPathFactory) -> dict[bool, Path]:
    root = tmp_path_factory.mktemp("e2s")
    tok = make_tokenizer(root)
    return {tied: save_model(root, tok, "llama", tied) for tied in (True, False)}


def _extended(base: Path, out: Path, *, pad: int = 0) -> tuple[list[torch.Tensor], list[str], list[Path]]:
    """A researcher's extended model: the new rows trained elsewhere (here: random), written as full matrices."""
    model, tok = load_model(base), load_tokenizer(base)
    info = extend_vocabulary(model, tok, NEW_WORDS)
    params = embedding_weights(model, info)
    torch.manual_seed(1)
    with torch.no_grad():
        for p in params:
            p[info.base_vocab_size:] = torch.randn(len(NEW_WORDS), p.shape[1])
    tokens = tok.convert_ids_to_tokens(list(range(len(tok))))
    files = []
    for i, p in enumerate(params):
        full = torch.cat([p.detach(), torch.zeros(pad, p.shape[1])])  # vocabulary padding past the tokens
        f = out / f"m{i}.pt"
        torch.save({"model.embed_tokens.weight": full, "step": torch.tensor(5)}, f)
        files.append(f)
    return [p.detach()[info.base_vocab_size:].clone() for p in params], tokens, files


def test_a_full_matrix_becomes_a_snapshot_with_the_new_rows_bitwise(bases: dict[bool, Path], tmp_path: Path) -> None:
    for tied in (True, False):
        rows, tokens, files = _extended(bases[tied], tmp_path, pad=3)
        (tmp_path / "tokens.txt").write_text("\n".join(tokens) + "\n", encoding="utf-8")
        out = tmp_path / f"snap_{tied}"
        head = [] if tied else ["--lm-head", str(files[1])]
        assert main([str(bases[tied]), str(files[0]), str(tmp_path / "tokens.txt"), "--out", str(out), *head]) == 0
        model, tok = load_model(bases[tied]), load_tokenizer(bases[tied])
        info, step = load_embedding_snapshot(model, tok, out)
        assert step == 0 and list(info.new_tokens) == NEW_WORDS
        for p, want in zip(embedding_weights(model, info), rows, strict=True):
            assert torch.equal(p[info.base_vocab_size:info.new_vocab_size], want)
        assert tok.encode("zorblax", add_special_tokens=False) == [info.new_ids[0]]


def test_safetensors_and_a_json_token_list(bases: dict[bool, Path], tmp_path: Path) -> None:
    _, tokens, files = _extended(bases[True], tmp_path)
    save_file({"embed": torch.load(files[0])["model.embed_tokens.weight"]}, str(tmp_path / "e.safetensors"))
    (tmp_path / "tokens.json").write_text(json.dumps(tokens), encoding="utf-8")
    out = tmp_path / "snap"
    assert main([str(bases[True]), str(tmp_path / "e.safetensors"), str(tmp_path / "tokens.json"), "--out", str(out),
                 "--step", "7"]) == 0
    info, step = load_embedding_snapshot(load_model(bases[True]), load_tokenizer(bases[True]), out)
    assert step == 7 and len(info.new_ids) == len(NEW_WORDS)


def test_what_does_not_line_up_is_one_line(bases: dict[bool, Path], tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    _, tokens, files = _extended(bases[True], tmp_path)
    tok_file = tmp_path / "tokens.json"

    def run(token_list: list[str], matrix: Path = files[0], base: Path = bases[True]) -> str:
        tok_file.write_text(json.dumps(token_list), encoding="utf-8")
        capsys.readouterr()  # what building the inputs printed
        assert main([str(base), str(matrix), str(tok_file), "--out", str(tmp_path / "x")]) == 2
        assert not (tmp_path / "x").exists()
        err = capsys.readouterr().err.strip()
        assert err.startswith("tessera: error: ") and "\n" not in err
        return err

    swapped = [tokens[1], tokens[0], *tokens[2:]]
    assert f"row 0 is {tokens[1]!r} but the base tokenizer's id 0 is {tokens[0]!r}" in run(swapped)
    assert "none after the base's" in run(tokens[:-len(NEW_WORDS)])
    assert "expected at least" in run([*tokens, "extra"])
    changed = torch.load(files[0])["model.embed_tokens.weight"].clone()
    changed[3] += 1.0
    torch.save(changed, tmp_path / "changed.pt")
    assert "not an embedding-only extension" in run(tokens, tmp_path / "changed.pt")
    _, untied_tokens, untied_files = _extended(bases[False], tmp_path / "..")
    assert "give --lm-head" in run(untied_tokens, untied_files[0], bases[False])
