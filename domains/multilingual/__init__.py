"""Multilingual: per-language prompts (data files), parallel captions, per-language retrieval.

* ``languages.py`` -- templates and class names of the other domains' classes in every language
  with a file in ``languages/`` (en, de, fr, es, cs, zh); a new language is a new YAML file.
* ``parallel.py`` / ``retrieval.py`` -- Flickr8k + Multi30k parallel captions, a held-out split,
  recall@1/5/10 per language, their mean and Mean Rank Variance.
* ``tokenization.py`` -- does a tokenizer keep a script intact?

Multilingual text towers are the core ``dual_encoder`` backbone with any Hugging Face text
encoder; teacher learning and the 1-to-K loss are core methods (``core/methods/cross_lingual.py``)
run by the one training loop. See docs/multilingual.md.
"""
from __future__ import annotations

from pathlib import Path

from domainclip.core.cards import CardDomain, register_card_domain

from .languages import (DomainPrompts, LanguagePack, available_languages, load_language, localise,
                        localised_prompts)
from .parallel import DEFAULT_LANGUAGES, ParallelCaptions, load_parallel
from .retrieval import benchmark_records, evaluate_languages, language_ranks, mean_rank_variance
from .tokenization import RoundTrip, round_trip, round_trip_report, tokenizer_coverage

__all__ = ["DEFAULT_LANGUAGES", "DomainPrompts", "LanguagePack", "ParallelCaptions", "RoundTrip",
           "available_languages", "benchmark_records", "evaluate_languages", "language_ranks", "load_language",
           "load_parallel", "localise", "localised_prompts", "mean_rank_variance", "round_trip",
           "round_trip_report", "tokenizer_coverage"]

register_card_domain(CardDomain("multilingual", Path(__file__).with_name("card_template.md"), package=__name__))
