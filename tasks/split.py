"""The train/validation split: decided per document from a seeded hash of its id.

A document's side depends on its id and the seed only, never on the order in which shards or files are
listed, so the tokenizer (trained on train documents only) and the token files agree, and a document can
never be on both sides.
"""

import hashlib

from pydantic import BaseModel, ConfigDict, Field

# A float holds 53 bits of mantissa: keeping the top 53 bits of a 64-bit hash maps it exactly into [0, 1).
_UNIT_BITS = 53


class SplitConfig(BaseModel):
    """How documents are split between training and validation."""

    model_config = ConfigDict(extra="forbid", strict=True)

    seed: int = Field(
        default=1337,
        ge=0,
        le=2**64 - 1,
        description="Salt of the per-document hash; another seed draws another validation set.",
    )
    val_fraction: float = Field(
        default=0.05,
        gt=0.0,
        le=0.5,
        description="Expected fraction of documents held out for validation (nanoGPT holds out 0.05% of "
        "OpenWebText; a small corpus needs a larger share for a stable validation loss).",
    )


def split_unit(doc_id: str, seed: int) -> float:
    """A number in [0, 1) that is uniform over documents and fixed for (doc_id, seed)."""
    digest = hashlib.blake2b(doc_id.encode("utf-8"), digest_size=8, key=seed.to_bytes(8, "little")).digest()
    return (int.from_bytes(digest, "little") >> (64 - _UNIT_BITS)) / (1 << _UNIT_BITS)


def is_val(doc_id: str, seed: int, val_fraction: float) -> bool:
    """True when the document belongs to the validation split."""
    return split_unit(doc_id, seed) < val_fraction
