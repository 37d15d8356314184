"""Clinical-note tokenization with the `tokenizers` library only (no transformers), so the hospital
agent tokenizes exactly as training did from the checkpoint's ``tokenizer.json``."""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer, decoders, normalizers, pre_tokenizers, processors
from tokenizers.models import WordPiece

from fedlite.errors import InputError

TOKENIZER_FILE = "tokenizer.json"
# JSON rather than vocab.txt: Flower app bundles carry only code and JSON/TOML/YAML files.
BUILTIN_VOCAB = "clinical_wordpiece_vocab.json"
SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")


def _bert_tokenizer(vocab: dict[str, int], lowercase: bool) -> Tokenizer:
    tok = Tokenizer(WordPiece(vocab, unk_token="[UNK]", max_input_chars_per_word=100))
    tok.normalizer = normalizers.BertNormalizer(lowercase=lowercase, strip_accents=lowercase)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.post_processor = processors.BertProcessing(("[SEP]", vocab["[SEP]"]), ("[CLS]", vocab["[CLS]"]))
    tok.decoder = decoders.WordPiece()
    return tok


def _read_vocab(lines: list[str]) -> dict[str, int]:
    vocab = {token: i for i, token in enumerate(t.rstrip("\n") for t in lines)}
    missing = [t for t in SPECIAL_TOKENS if t not in vocab]
    if missing:
        raise InputError(f"vocabulary lacks the special tokens {missing}")
    return vocab


def builtin_tokenizer() -> Tokenizer:
    """Cased WordPiece vocabulary shipped with fedlite, used when no pretrained text model is given."""
    tokens = json.loads(resources.files("fedlite.resources").joinpath(BUILTIN_VOCAB).read_text(encoding="utf-8"))
    return _bert_tokenizer(_read_vocab(tokens), lowercase=False)


def load_tokenizer(path: str | Path) -> Tokenizer:
    """A tokenizer from a ``tokenizer.json`` file, or a model directory holding one or a ``vocab.txt``."""
    path = Path(path)
    if path.is_dir():
        if (path / TOKENIZER_FILE).is_file():
            path = path / TOKENIZER_FILE
        elif (path / "vocab.txt").is_file():
            lines = (path / "vocab.txt").read_text(encoding="utf-8").splitlines()
            lowercase = _lowercase_from_config(path)
            return _bert_tokenizer(_read_vocab(lines), lowercase=lowercase)
        else:
            raise InputError(f"no {TOKENIZER_FILE} or vocab.txt in the directory", path=path)
    try:
        return Tokenizer.from_file(str(path))
    except Exception as exc:  # tokenizers raises bare Exception subclasses
        raise InputError(f"cannot read tokenizer: {exc}", path=path) from None


def _lowercase_from_config(model_dir: Path) -> bool:
    cfg = model_dir / "tokenizer_config.json"
    if cfg.is_file():
        return bool(json.loads(cfg.read_text(encoding="utf-8")).get("do_lower_case", False))
    return False


@dataclass
class EncodedNotes:
    """Token ids per note (no padding: batches pad dynamically) and how many notes were cut."""

    ids: list[list[int]]
    truncated: int


def encode_notes(tokenizer: Tokenizer, texts: list[str], max_length: int) -> EncodedNotes:
    """Tokenize with truncation to the model's window; truncation is counted, never silent."""
    tokenizer.no_padding()
    tokenizer.enable_truncation(max_length=max_length)
    encodings = tokenizer.encode_batch(list(texts))
    truncated = sum(1 for e in encodings if e.overflowing)
    return EncodedNotes(ids=[e.ids for e in encodings], truncated=truncated)


def pad_id(tokenizer: Tokenizer) -> int:
    pid = tokenizer.token_to_id("[PAD]")
    return 0 if pid is None else pid


def pad_token_ids(sequences: list[list[int]], pad: int) -> tuple[np.ndarray, np.ndarray]:
    """Token ids padded to the longest sequence, and the attention mask (int64, as the encoders take)."""
    longest = max(len(seq) for seq in sequences)
    ids = np.full((len(sequences), longest), pad, dtype=np.int64)
    mask = np.zeros((len(sequences), longest), dtype=np.int64)
    for row, seq in enumerate(sequences):
        ids[row, : len(seq)] = seq
        mask[row, : len(seq)] = 1
    return ids, mask
