"""Tokenizers: train a byte-level BPE, load one, and fingerprint it so prepared data can be matched.

A tokenizer directory is anything `transformers.AutoTokenizer.from_pretrained(dir)` loads that
also holds a `tokenizer.json` (a "fast" tokenizer): the ones trained here, or a HF model's.
Preparing data only needs `tokenizer.json` plus the eos token named in `tokenizer_config.json`
(or `special_tokens_map.json`), so it never imports transformers.

The trained tokenizer is byte-level (every string encodes, decoding gives the exact text back),
with one special token, `<|endoftext|>`, used as eos, bos and pad; it adds no bos/eos by itself.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from train.data.corpus import DataError, atomic_dir, iter_documents, sha256_file

if TYPE_CHECKING:
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerBase

EOS_TOKEN = "<|endoftext|>"
"""The special token that ends every document (also bos and pad) in tokenizers trained here."""
TOKENIZER_FILE = "tokenizer.json"
"""The fast-tokenizer file that identifies a tokenizer directory."""
MIN_VOCAB_SIZE = 257
"""256 byte tokens plus the eos token."""


class TokenizerMismatchError(DataError):
    """Prepared data was made with a different tokenizer than the one in use."""


def train_bpe_tokenizer(
    files: Sequence[Path | str],
    vocab_size: int,
    out_dir: Path | str,
    *,
    text_field: str = "text",
    min_frequency: int = 2,
    overwrite: bool = False,
) -> Path:
    """Train a byte-level BPE on the documents of `files` and save it as a HF tokenizer dir.

    `files` take any input `iter_documents` reads (text, .jsonl, .parquet, dataset dirs).
    Training is deterministic. The vocabulary may end up smaller than `vocab_size` when the corpus
    has fewer pairs seen `min_frequency` times. Returns `out_dir`.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    if vocab_size < MIN_VOCAB_SIZE:
        raise DataError(f"vocab_size={vocab_size} is too small; use >= {MIN_VOCAB_SIZE} (256 bytes + eos)")
    if min_frequency < 1:
        raise DataError(f"min_frequency={min_frequency} must be >= 1")
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=[EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    documents = iter_documents(files, text_field=text_field)
    with atomic_dir(out_dir, overwrite=overwrite) as tmp:
        tokenizer.train_from_iterator(documents, trainer=trainer)
        tokenizer.save(str(tmp / TOKENIZER_FILE))
        config = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": EOS_TOKEN,
            "eos_token": EOS_TOKEN,
            "pad_token": EOS_TOKEN,
            "clean_up_tokenization_spaces": False,
        }
        (tmp / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    return Path(out_dir)


_RESAVE = ("train one (tools/train_tokenizer.py) or re-save a HF tokenizer with "
           "AutoTokenizer.from_pretrained(src).save_pretrained(dir)")


def _tokenizer_file(tok_dir: Path | str) -> Path:
    path = Path(tok_dir) / TOKENIZER_FILE
    if not path.is_file():
        raise DataError(f"tokenizer_dir={tok_dir}: no {TOKENIZER_FILE}; {_RESAVE}")
    return path


def _broken(path: Path, why: str) -> DataError:
    return DataError(f"tokenizer_dir={path.parent}: {path.name} {why}; {_RESAVE}")


def load_tokenizer(tok_dir: Path | str) -> PreTrainedTokenizerBase:
    """Load the tokenizer dir with `transformers.AutoTokenizer` (for training, generation, decoding)."""
    from transformers import AutoTokenizer

    load_raw_tokenizer(tok_dir)  # a broken tokenizer.json is named here, not deep inside transformers
    eos_token(tok_dir)
    try:
        return AutoTokenizer.from_pretrained(str(tok_dir))
    except (OSError, ValueError, TypeError, KeyError, AttributeError) as e:
        raise DataError(f"tokenizer_dir={tok_dir}: transformers cannot load it ({str(e).splitlines()[0]}); "
                        f"{_RESAVE}") from None


def load_raw_tokenizer(tok_dir: Path | str) -> Tokenizer:
    """Load the dir's `tokenizer.json` with HF `tokenizers` (fast batch encoding, no transformers).

    An empty or malformed file is a DataError naming it (`tokenizers` reports it as a bare Exception)."""
    from tokenizers import Tokenizer

    path = _tokenizer_file(tok_dir)
    if path.stat().st_size == 0:
        raise _broken(path, "is empty")
    try:
        return Tokenizer.from_file(str(path))
    except Exception as e:  # noqa: BLE001 (tokenizers raises plain Exception for every parse error of the file)
        raise _broken(path, f"is not a valid tokenizer ({str(e).splitlines()[0]})") from None


def eos_token(tok_dir: Path | str) -> str | None:
    """The eos token string named by the dir's tokenizer_config.json / special_tokens_map.json."""
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        path = Path(tok_dir) / name
        if path.is_file():
            try:
                config: Any = json.loads(path.read_text(encoding="utf-8"))
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise _broken(path, f"is not valid JSON ({str(e).splitlines()[0]})") from None
            if not isinstance(config, dict):
                raise _broken(path, f"holds a JSON {type(config).__name__}, not an object")
            token = config.get("eos_token")
            if isinstance(token, dict):  # serialized AddedToken
                token = token.get("content")
            if isinstance(token, str):
                return token
    return None


def tokenizer_identity(tok_dir: Path | str) -> dict[str, Any]:
    """Fingerprint of a tokenizer dir: name, path, sha256 of tokenizer.json and vocab size."""
    path = _tokenizer_file(tok_dir)
    return {
        "name": Path(tok_dir).resolve().name,
        "path": str(Path(tok_dir).resolve()),
        "sha256": sha256_file(path),
        "vocab_size": load_raw_tokenizer(tok_dir).get_vocab_size(with_added_tokens=True),
    }


def same_tokenizer(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """True when two identities describe the same tokenizer (same sha256 and vocab size; paths may differ)."""
    return a.get("sha256") == b.get("sha256") and a.get("vocab_size") == b.get("vocab_size")


def check_same_tokenizer(prepared: dict[str, Any], expected: dict[str, Any], where: str) -> None:
    """Raise TokenizerMismatchError when `prepared` (from a data header) differs from `expected`."""
    if not same_tokenizer(prepared, expected):
        raise TokenizerMismatchError(
            f"{where} was tokenized with {prepared.get('path')} (sha256 {str(prepared.get('sha256'))[:12]}, "
            f"vocab {prepared.get('vocab_size')}) but the run uses {expected.get('path')} "
            f"(sha256 {str(expected.get('sha256'))[:12]}, vocab {expected.get('vocab_size')}); "
            "prepare the data again with this tokenizer, or point tokenizer_dir at the one it was made with"
        )
