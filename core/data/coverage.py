"""How much of each language's captions a text tower's tokenizer can read.

An English uncased WordPiece vocabulary (all-MiniLM-L6-v2, the compact base's text tower) maps most
Chinese characters to ``[UNK]``: text in such a language reaches the encoder damaged whatever the
training. :func:`tokenizer_coverage` counts the unknown tokens per language and warns, naming the
language, the share and the remedy, above 10 %; the cross-lingual training methods and the
multilingual evaluation call it when they load captions.
"""
from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

log = logging.getLogger("domainclip.data")


def hf_tokenizer(tokenizer_or_model: Any) -> Any:
    """The Hugging Face tokenizer of a tokenizer, an ``HFTokenize`` wrapper or a backbone."""
    candidate = getattr(tokenizer_or_model, "text_tokenizer", tokenizer_or_model)
    candidate = getattr(candidate, "tokenizer", candidate)
    if not (hasattr(candidate, "decode") and callable(candidate)):
        raise TypeError(f"{type(tokenizer_or_model).__name__} has no Hugging Face tokenizer (with encode/decode); "
                        "the round-trip check needs one")
    return candidate


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
