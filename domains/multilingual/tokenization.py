"""Check that a text tower's tokenizer keeps every script intact (round trip text -> ids -> text).

A multilingual model is only as good as its tokenizer: an English uncased WordPiece vocabulary
(all-MiniLM-L6-v2, the compact base's text tower) strips accents ("dřevěného" -> "dreveneho")
and maps most Chinese characters to ``[UNK]``, so such text reaches the encoder damaged whatever
the training. :func:`round_trip_report` measures this on any Hugging Face tokenizer (or a
backbone with one): ``lossless`` (the text comes back exactly, whitespace aside), ``script_kept``
(the same up to letter case, whitespace aside: accents and characters survive) and the number
of unknown tokens.
"""
from __future__ import annotations

import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from domainclip.core.data.coverage import REMEDY, UNKNOWN_WARN_SHARE, hf_tokenizer, tokenizer_coverage  # noqa: F401


@dataclass(frozen=True)
class RoundTrip:
    """One text through a tokenizer and back."""

    text: str
    decoded: str
    unknown_tokens: int

    @property
    def lossless(self) -> bool:
        return _squash(self.decoded) == _squash(self.text)

    @property
    def script_kept(self) -> bool:
        return _squash(self.decoded).casefold() == _squash(self.text).casefold() and self.unknown_tokens == 0


def _squash(text: str) -> str:
    return "".join(unicodedata.normalize("NFC", text).split())


def round_trip(tokenizer_or_model: Any, text: str) -> RoundTrip:
    """Encode ``text`` (no truncation) and decode it without special tokens."""
    tokenizer = hf_tokenizer(tokenizer_or_model)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    unknown_id = getattr(tokenizer, "unk_token_id", None)
    unknown = sum(1 for i in ids if unknown_id is not None and i == unknown_id)
    decoded = tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)
    return RoundTrip(text, decoded, unknown)


def round_trip_report(tokenizer_or_model: Any, texts: Sequence[str]) -> dict[str, Any]:
    """``{"lossless": fraction, "script_kept": fraction, "failures": [(text, decoded), ...]}``."""
    if not texts:
        raise ValueError("round_trip_report needs at least one text")
    trips = [round_trip(tokenizer_or_model, text) for text in texts]
    return {"lossless": sum(t.lossless for t in trips) / len(trips),
            "script_kept": sum(t.script_kept for t in trips) / len(trips),
            "failures": [(t.text, t.decoded) for t in trips if not t.script_kept]}
