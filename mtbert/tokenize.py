"""WordPiece tokenization from a checkpoint's own files (Rust `tokenizers`).

Texts are tokenized without special tokens; `build_inputs` adds [CLS]/[SEP]
and token types, so the token cache serves both pair encodings. Fixed padding
and truncation that a tokenizer.json may switch on (minilm-l6 pads everything
to 128) are switched off: batches are padded to their own longest member.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer as RustTokenizer
from tokenizers.implementations import BertWordPieceTokenizer

from mtbert.errors import EncoderError


class Tokenizer:
    def __init__(self, directory: Path):
        self.directory = Path(directory)
        tokenizer_json = self.directory / "tokenizer.json"
        vocab = self.directory / "vocab.txt"
        if tokenizer_json.exists():
            self._tok = RustTokenizer.from_file(str(tokenizer_json))
            self.fingerprint = _sha256(tokenizer_json)
        elif vocab.exists():
            self._tok = BertWordPieceTokenizer(str(vocab), lowercase=self._lowercase())
            self.fingerprint = _sha256(vocab) + f"-lower={self._lowercase()}"
        else:
            raise EncoderError(f"{self.directory} has neither tokenizer.json nor vocab.txt")
        self._tok.no_padding()
        self._tok.no_truncation()
        self.cls_id = self.special_id("[CLS]")
        self.sep_id = self.special_id("[SEP]")
        self.pad_id = self.special_id("[PAD]")

    def _lowercase(self) -> bool:
        config = self.directory / "tokenizer_config.json"
        if config.exists():
            return bool(json.loads(config.read_text(encoding="utf-8")).get("do_lower_case", True))
        return True

    def special_id(self, token: str) -> int:
        token_id = self._tok.token_to_id(token)
        if token_id is None:
            raise EncoderError(f"the tokenizer in {self.directory} has no {token} token")
        return token_id

    def encode(self, texts: list[str]) -> list[np.ndarray]:
        """Token ids of each text, without special tokens."""
        encodings = self._tok.encode_batch(texts, add_special_tokens=False)
        return [np.asarray(e.ids, dtype=np.int32) for e in encodings]

    def build_inputs(self, a: np.ndarray, b: np.ndarray | None,
                     max_length: int) -> tuple[np.ndarray, np.ndarray]:
        """'[CLS] a [SEP]' or '[CLS] a [SEP] b [SEP]' and token types, at most max_length."""
        if b is None:
            a = a[: max_length - 2]
            ids = np.concatenate([[self.cls_id], a, [self.sep_id]])
            return ids.astype(np.int64), np.zeros(len(ids), dtype=np.int64)
        la, lb = _longest_first(len(a), len(b), max_length - 3)
        ids = np.concatenate([[self.cls_id], a[:la], [self.sep_id], b[:lb], [self.sep_id]])
        types = np.concatenate([np.zeros(la + 2), np.ones(lb + 1)])
        return ids.astype(np.int64), types.astype(np.int64)

    def files(self) -> list[Path]:
        """The tokenizer files to copy into an exported model directory."""
        names = ("tokenizer.json", "vocab.txt", "tokenizer_config.json", "special_tokens_map.json")
        return [self.directory / n for n in names if (self.directory / n).exists()]


def _longest_first(la: int, lb: int, budget: int) -> tuple[int, int]:
    """Lengths of a pair cut longest-first to `budget` tokens as Hugging Face's tokenizers
    cut it: the shorter sentence is kept whole where the longer can give up enough; else
    both get half, the odd token going to the longer (to b on a tie)."""
    if la + lb <= budget:
        return la, lb
    swap = la > lb
    short, long = (lb, la) if swap else (la, lb)
    long = short if short > budget else max(short, budget - short)
    if short + long > budget:
        short, long = budget // 2, budget // 2 + budget % 2
    return (long, short) if swap else (short, long)


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]
