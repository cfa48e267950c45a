"""Tokenizers: text <-> token ids, saved as one `tokenizer.json`.

Two kinds:
- "bpe": a byte-level BPE (GPT-2's scheme) trained with the `tokenizers` library. Every string encodes
  losslessly, because any byte has a token of its own.
- "char": the classic tutorial tokenizer: one id per distinct character of the training text, sorted by
  code point; characters never seen in training map to one unknown id.

Both end every document with the special `<|endoftext|>` token. Text that merely contains the characters
"<|endoftext|>" encodes as ordinary text, so no document can inject a document boundary.
"""

import json
from abc import ABC, abstractmethod
from collections.abc import Iterable, Sequence
from functools import cached_property, lru_cache
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import tiktoken
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from model.fast_bpe import encode_batch as fast_encode_batch
from model.fast_bpe import fast_encoder
from storage.errors import DataIntegrityError

FILENAME = "tokenizer.json"
EOT = "<|endoftext|>"
UNKNOWN_CHAR = "\ufffd"  # what decode shows for the char tokenizer's unknown id
_CHAR_FORMAT = "gptflow-char"
_BYTES = 256  # byte-level BPE starts from one token per byte value


class Tokenizer(ABC):
    """Common interface of both kinds; `Tokenizer.load` returns the right one for a file."""

    kind: ClassVar[str]
    eot_token: ClassVar[str] = EOT

    @property
    @abstractmethod
    def vocab_size(self) -> int:
        """Number of ids, special ones included: every id is below it."""

    @property
    @abstractmethod
    def eot_id(self) -> int:
        """The id of <|endoftext|>, which follows every document in the token files."""

    @abstractmethod
    def encode(self, text: str) -> list[int]: ...

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [self.encode(text) for text in texts]

    @abstractmethod
    def decode(self, ids: Iterable[int]) -> str: ...

    @abstractmethod
    def to_json(self) -> str:
        """The content of `tokenizer.json`: the same tokenizer always gives the same string."""

    def save(self, path: str | Path) -> Path:
        """Write `tokenizer.json` (into `path` when it is a folder); returns the file written."""
        path = Path(path)
        if path.is_dir():
            path = path / FILENAME
        path.write_text(self.to_json(), encoding="utf-8")
        return path

    @classmethod
    def load(cls, path: str | Path) -> "Tokenizer":
        """Read a `tokenizer.json` (or the one inside folder `path`), whichever kind it holds."""
        path = Path(path)
        if path.is_dir():
            path = path / FILENAME
        try:
            content = path.read_text(encoding="utf-8")
            data = json.loads(content)
        except FileNotFoundError:
            raise DataIntegrityError(f"{path}: no tokenizer file") from None
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise DataIntegrityError(f"{path}: not a tokenizer file ({exc})") from exc
        if isinstance(data, dict) and data.get("format") == _CHAR_FORMAT:
            return CharTokenizer.from_dict(data, path)
        if isinstance(data, dict) and isinstance(data.get("model"), dict) and data["model"].get("type") == "BPE":
            return BPETokenizer(HFTokenizer.from_str(content))
        raise DataIntegrityError(f"{path}: neither a byte-level BPE nor a char tokenizer")

    def __repr__(self) -> str:
        return f"{type(self).__name__}(vocab_size={self.vocab_size}, eot_id={self.eot_id})"


@lru_cache(maxsize=2)
def _fast_encoder_of(content: str) -> "tiktoken.Encoding | None":
    # Once per process and tokenizer: the checks read every merge (~0.3 s for 50k), and a worker encoding
    # shard after shard loads the same tokenizer for each.
    return fast_encoder(json.loads(content))


class BPETokenizer(Tokenizer):
    kind = "bpe"

    def __init__(self, backend: HFTokenizer) -> None:
        eot_id = backend.token_to_id(EOT)
        if eot_id is None:
            raise DataIntegrityError(f"BPE tokenizer has no {EOT} token")
        self._backend = backend
        self._backend.encode_special_tokens = True  # "<|endoftext|>" inside a document is just text
        self._eot_id = eot_id

    @cached_property
    def _fast(self) -> "tiktoken.Encoding | None":
        """tiktoken's encoder for this vocabulary, where it gives the same ids (model/fast_bpe.py)."""
        return _fast_encoder_of(self._backend.to_str())

    @property
    def vocab_size(self) -> int:
        return self._backend.get_vocab_size(with_added_tokens=True)

    @property
    def eot_id(self) -> int:
        return self._eot_id

    def encode(self, text: str) -> list[int]:
        fast = self._fast
        if fast is not None:
            return fast.encode_ordinary(text)
        return self._backend.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        fast = self._fast
        if fast is not None:
            return fast_encode_batch(fast, texts)
        # The library encodes a batch on all cores.
        return [enc.ids for enc in self._backend.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Iterable[int]) -> str:
        return self._backend.decode(list(ids), skip_special_tokens=False)

    def to_json(self) -> str:
        return self._backend.to_str(pretty=False)


class CharTokenizer(Tokenizer):
    kind = "char"

    def __init__(self, chars: Sequence[str]) -> None:
        chars = sorted(set(chars))
        if any(len(ch) != 1 for ch in chars):
            raise ValueError("a char tokenizer's vocabulary holds single characters only")
        self.chars = chars
        self._eot_id = len(chars)
        self.unk_id = len(chars) + 1
        self._stoi = {ch: i for i, ch in enumerate(chars)}
        # A dense code point -> id table makes encoding a vectorised lookup; code points past it are unknown.
        top = max((ord(ch) for ch in chars), default=0) + 1
        self._table = np.full(top, self.unk_id, dtype=np.int64)
        self._table[[ord(ch) for ch in chars]] = np.arange(len(chars))
        self._itos = [*chars, EOT, UNKNOWN_CHAR]

    @property
    def vocab_size(self) -> int:
        return len(self.chars) + 2  # the characters, <|endoftext|>, unknown

    @property
    def eot_id(self) -> int:
        return self._eot_id

    def encode(self, text: str) -> list[int]:
        points = np.frombuffer(text.encode("utf-32-le", errors="surrogatepass"), dtype=np.uint32)
        ids = np.full(points.size, self.unk_id, dtype=np.int64)
        known = points < self._table.size
        ids[known] = self._table[points[known]]
        return ids.tolist()

    def decode(self, ids: Iterable[int]) -> str:
        ids = [int(i) for i in ids]
        if ids and not 0 <= min(ids) <= max(ids) < self.vocab_size:
            raise ValueError(f"token id out of range for a char tokenizer of {self.vocab_size} ids")
        return "".join(self._itos[i] for i in ids)

    def to_json(self) -> str:
        data: dict[str, Any] = {"format": _CHAR_FORMAT, "version": 1, "eot_token": EOT, "chars": self.chars}
        return json.dumps(data, ensure_ascii=True, indent=1) + "\n"

    @classmethod
    def from_dict(cls, data: dict[str, Any], path: Path) -> "CharTokenizer":
        chars = data.get("chars")
        if data.get("version") != 1 or not isinstance(chars, list):
            raise DataIntegrityError(f"{path}: unsupported char tokenizer (version {data.get('version')!r})")
        try:
            return cls(chars)
        except (TypeError, ValueError) as exc:
            raise DataIntegrityError(f"{path}: corrupt char vocabulary ({exc})") from exc


def train_bpe(texts: Iterable[str], vocab_size: int, min_frequency: int = 2) -> Tokenizer:
    """Train a byte-level BPE of at most `vocab_size` ids (fewer when the text has no more merges)."""
    if vocab_size < _BYTES + 1:
        raise ValueError(f"vocab_size {vocab_size} is below {_BYTES + 1}: 256 byte tokens plus {EOT}")
    backend = HFTokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=[EOT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # every byte, seen in training or not
        show_progress=False,
    )
    backend.train_from_iterator(texts, trainer=trainer)
    return BPETokenizer(backend)


def train_char(texts: Iterable[str]) -> Tokenizer:
    """Every distinct character of `texts`, plus <|endoftext|> and the unknown id (no text: those two only)."""
    chars: set[str] = set()
    for text in texts:
        chars.update(text)
    return CharTokenizer(sorted(chars))
