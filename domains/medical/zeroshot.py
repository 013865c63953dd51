"""CheXzero-style zero-shot findings: positive vs negative prompts per finding, AUROC per finding.

A thin layer over core ``evaluate_multilabel`` (core/eval/multilabel.py): it supplies the clinical
phrases of the findings (``prompts.finding_phrase``) and the positive / negative templates, and
builds the loader from records whose ``label`` is the target vector (``datasets.CheXpert``).
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import nn
from torch.utils.data import DataLoader

from domainclip.core.data.dataset import Collator, ImageTextDataset
from domainclip.core.data.records import RecordSet
from domainclip.core.data.transforms import build_image_transform
from domainclip.core.eval.multilabel import evaluate_multilabel

from .prompts import NEGATIVE_TEMPLATES, POSITIVE_TEMPLATES, finding_phrase


def evaluate_findings(model: nn.Module, records: RecordSet, findings: Sequence[str],
                      pos_templates: Sequence[str] = POSITIVE_TEMPLATES,
                      neg_templates: Sequence[str] = NEGATIVE_TEMPLATES, batch_size: int = 32) -> dict[str, Any]:
    """Per-finding zero-shot AUROC of a backbone on records with target vectors (0 / 1 / NaN).

    The result is core's (``auroc``, ``mean_auroc``, ``label_counts``...) keyed by the label
    column names (``Pleural Effusion``), not by the prompt phrases.
    """
    phrases = [finding_phrase(f) for f in findings]
    if len(set(phrases)) != len(phrases):
        raise ValueError(f"findings {list(findings)} map to repeated prompt phrases {phrases}")
    dataset = ImageTextDataset(records, build_image_transform(model.preprocess, train=False), train=False)
    loader = DataLoader(dataset, batch_size=batch_size, collate_fn=Collator(None))
    result = evaluate_multilabel(model, loader, phrases, pos_templates, neg_templates)
    rename = dict(zip(phrases, findings))
    for key in ("auroc", "label_counts"):
        result[key] = {rename[name]: value for name, value in result[key].items()}
    return result
