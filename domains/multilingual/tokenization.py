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

import logging
import unicodedata
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

log = logging.getLogger("domainclip.multilingual")


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


def hf_tokenizer(tokenizer_or_model: Any) -> Any:
    """The Hugging Face tokenizer of a tokenizer, an ``HFTokenize`` wrapper or a backbone."""
    candidate = getattr(tokenizer_or_model, "text_tokenizer", tokenizer_or_model)
    candidate = getattr(candidate, "tokenizer", candidate)
    if not (hasattr(candidate, "decode") and callable(candidate)):
        raise TypeError(f"{type(tokenizer_or_model).__name__} has no Hugging Face tokenizer (with encode/decode); "
                        "the round-trip check needs one")
    return candidate


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


UNKNOWN_WARN_SHARE = 0.10
REMEDY = ("use a text tower whose vocabulary covers this language (a multilingual tokenizer, e.g. a dual_encoder "
          "with model.text: a multilingual sentence-transformer such as paraphrase-multilingual-MiniLM-L12-v2); "
          "training cannot recover text the tokenizer already turned into [UNK]")


def tokenizer_coverage(tokenizer_or_model: Any, captions: Mapping[str, Sequence[str]],
                       warn_above: float = UNKNOWN_WARN_SHARE) -> dict[str, dict[str, float]]:
    """Per language: tokens, unknown tokens and their share, over ``captions[lang]``.

    Logs one line per language and a warning naming the language, the share of unknown tokens
    and the remedy when the share is above ``warn_above`` (10 %): an English vocabulary turns most
    Chinese characters into ``[UNK]``, which no training undoes.
    """
    tokenizer = hf_tokenizer(tokenizer_or_model)
    unknown_id = getattr(tokenizer, "unk_token_id", None)
    report: dict[str, dict[str, float]] = {}
    for lang, texts in captions.items():
        ids = [i for text in texts for i in tokenizer(text, add_special_tokens=False)["input_ids"]]
        unknown = sum(1 for i in ids if unknown_id is not None and i == unknown_id)
        share = unknown / len(ids) if ids else 0.0
        report[lang] = {"tokens": len(ids), "unknown_tokens": unknown, "unknown_share": share}
        log.info("tokenizer coverage of %s: %d tokens, %.1f %% unknown", lang, len(ids), 100 * share)
        if share > warn_above:
            log.warning("captions in %r: %.1f %% of the tokens are unknown to the tokenizer ([UNK]); %s",
                        lang, 100 * share, REMEDY)
    return report
