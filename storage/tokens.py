"""Token files: nanoGPT's raw layout (a flat array of token ids) with a meta.json beside it.

The .bin files stay headerless so that nanoGPT-style readers can memory-map them directly; what a reader
needs to interpret them (dtype, vocabulary size, counts, tokenizer) lives in meta.json and is checked here.
"""

import json
from pathlib import Path
from typing import Any

import numpy as np

from storage.errors import DataIntegrityError

META = "meta.json"


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 while every id fits (GPT-2's 50,257 does), uint32 past 65,535 ids."""
    if vocab_size <= 0:
        raise ValueError(f"vocab_size must be positive, got {vocab_size}")
    return np.dtype(np.uint16) if vocab_size <= 2**16 else np.dtype(np.uint32)


class TokenFileWriter:
    """Appends token ids to a .bin file through a bounded buffer; memory stays flat however long the file."""

    def __init__(self, path: Path, dtype: np.dtype, buffer_tokens: int = 1 << 20) -> None:
        self.path = Path(path)
        self.dtype = np.dtype(dtype)
        self._limit = np.iinfo(self.dtype).max
        self._buffer = np.empty(buffer_tokens, dtype=self.dtype)
        self._filled = 0
        self._file = open(self.path, "wb")
        self.tokens = 0

    def write(self, ids: np.ndarray | list[int]) -> int:
        """Append ids; returns the offset (in tokens) at which they start."""
        ids = np.asarray(ids)
        if ids.size and (ids.min() < 0 or ids.max() > self._limit):
            raise ValueError(f"{self.path.name}: token id out of range for {self.dtype}")
        start = self.tokens
        ids = ids.astype(self.dtype, copy=False)
        if self._filled + ids.size > self._buffer.size:
            self._flush()
        if ids.size > self._buffer.size:
            ids.tofile(self._file)
        else:
            self._buffer[self._filled : self._filled + ids.size] = ids
            self._filled += ids.size
        self.tokens += int(ids.size)
        return start

    def _flush(self) -> None:
        self._buffer[: self._filled].tofile(self._file)
        self._filled = 0

    def close(self) -> int:
        if not self._file.closed:
            self._flush()
            self._file.flush()
            self._file.close()
        return self.tokens

    def __enter__(self) -> "TokenFileWriter":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def read_meta(folder: Path) -> dict[str, Any]:
    path = Path(folder) / META
    if not path.is_file():
        raise DataIntegrityError(f"{path}: missing; the token files cannot be interpreted without it")
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        # Damage that keeps the size passes the store's cheap check; --verify compares every file's sha256.
        raise DataIntegrityError(
            f"{path}: damaged, not JSON ({type(exc).__name__}); `gptflow run --verify` rebuilds the version"
        ) from None
    if not isinstance(meta, dict):
        raise DataIntegrityError(f"{path}: damaged, not a JSON object; `gptflow run --verify` rebuilds the version")
    return meta


def open_tokens(folder: Path, split: str) -> np.memmap:
    """Memory-map `<folder>/<split>.bin`, checking its size against meta.json."""
    meta = read_meta(folder)
    path = Path(folder) / f"{split}.bin"
    dtype = np.dtype(meta["dtype"])
    expected = meta[f"{split}_tokens"]
    actual = path.stat().st_size // dtype.itemsize if path.is_file() else -1
    if actual != expected:
        raise DataIntegrityError(f"{path}: holds {actual} tokens, meta.json says {expected}")
    if expected == 0:
        return np.zeros(0, dtype=dtype)  # np.memmap refuses empty files
    return np.memmap(path, dtype=dtype, mode="r")
