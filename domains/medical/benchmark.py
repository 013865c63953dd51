"""Medical benchmark pieces: report-parser section counts (IU X-ray) and CT organ-presence
zero-shot slice classification (TotalSegmentator volume), printed as Markdown tables.

    python -m domainclip.domains.medical.benchmark reports ../shared/data/medical/iu_xray_reports/reports.csv
    python -m domainclip.domains.medical.benchmark ct recipes/medical/ct_totalsegmentator.csv

``ct`` encodes every axial slice of the manifest's volumes once per rendering (stacked lung /
mediastinum / bone windows, and abdomen-window 2.5D slabs) with the offline compact base (or
``--model`` kind), then for each organ with at least ``--min-each`` present and absent slices
scores "the <organ>" against "no <organ>" prompts: accuracy, balanced accuracy and AUROC of the
log-odds (core ``auroc``).
"""
from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from domainclip.core.backbones.factory import ModelConfig, create_backbone
from domainclip.core.data.dataset import Collator, ImageTextDataset
from domainclip.core.data.sources import DataSourceConfig
from domainclip.core.data.transforms import build_image_transform
from domainclip.core.eval.metrics import auroc
from domainclip.core.eval.zeroshot import ZEROSHOT_LOGIT_SCALE, build_zeroshot_classifier, encode_loader_images

from .ct_records import SliceOptions, load_ct_slices, read_label_names
from .prompts import CT_TEMPLATES
from .reports import DEID_POLICIES, read_iu_reports, section_counts


def report_table(csv: str) -> str:
    """Section counts of every report under each de-identification policy."""
    lines = ["| deid_policy | reports | findings | impression | both | neither |", "|---|---|---|---|---|---|"]
    for policy in DEID_POLICIES:
        counts = section_counts(report for _, report in read_iu_reports(csv, policy))
        lines.append(f"| {policy} | " + " | ".join(str(counts[k]) for k in
                                                   ("reports", "findings", "impression", "both", "neither")) + " |")
    return "\n".join(lines)


def encode(model: torch.nn.Module, records) -> torch.Tensor:
    dataset = ImageTextDataset(records, build_image_transform(model.preprocess, train=False), train=False)
    loader = DataLoader(dataset, batch_size=32, collate_fn=Collator(None))
    return encode_loader_images(model, loader, None, need_labels=False).features


def ct_table(manifest: str, model_kind: str, min_each: int) -> str:
    """Zero-shot organ-presence metrics per organ, both renderings side by side, and their means."""
    model = create_backbone(ModelConfig(kind=model_kind))
    model.eval()
    base = DataSourceConfig(format="ct_slices", path=manifest)
    names = read_label_names(Path(manifest).parent / _first_label_names(manifest))
    renderings = {"3 windows": SliceOptions(), "2.5D": SliceOptions(slab_window="abdomen")}
    results: dict[str, dict[str, tuple[float, float]]] = {}
    counts: dict[str, tuple[int, int]] = {}
    for rendering, options in renderings.items():
        features = None
        for organ in sorted(set(names.values())):
            records = load_ct_slices(dataclasses.replace(base, label_key=organ), options)
            labels = torch.tensor([r.label for r in records])
            present = int((labels == 1).sum())
            if min(present, len(labels) - present) < min_each:
                continue
            if features is None:
                features = encode(model, records)
            with torch.no_grad():
                classifier = build_zeroshot_classifier(model, records.class_names, CT_TEMPLATES).cpu()
                logits = ZEROSHOT_LOGIT_SCALE * features @ classifier
            predicted = logits.argmax(1)
            balanced = sum(float((predicted[labels == c] == c).float().mean()) for c in (0, 1)) / 2
            results.setdefault(organ, {})[rendering] = (auroc(logits[:, 1] - logits[:, 0], labels.float()), balanced)
            counts[organ] = (present, len(labels) - present)
    keys = list(renderings)
    lines = ["| organ | slices present / absent | " + " | ".join(f"AUROC {k} | bal. acc. {k}" for k in keys) + " |",
             "|---|---|" + "---|---|" * len(keys)]
    for organ, by_rendering in results.items():
        cells = " | ".join(f"{by_rendering[k][0]:.3f} | {by_rendering[k][1]:.3f}" for k in keys)
        lines.append(f"| {organ} | {counts[organ][0]} / {counts[organ][1]} | {cells} |")
    means = " | ".join(f"{sum(r[k][0] for r in results.values()) / len(results):.3f} | "
                       f"{sum(r[k][1] for r in results.values()) / len(results):.3f}" for k in keys)
    lines.append(f"| **mean of {len(results)} organs** | | {means} |")
    return "\n".join(lines)


def _first_label_names(manifest: str) -> str:
    from domainclip.core.data.sources import read_csv_rows

    rows, _, _ = read_csv_rows(Path(manifest))
    return rows[0]["label_names"]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="what", required=True)
    sub.add_parser("reports").add_argument("csv")
    ct = sub.add_parser("ct")
    ct.add_argument("manifest", help="ct_slices manifest (every row's slices are used; split ignored)")
    ct.add_argument("--model", default="compact_base", help="backbone kind (default: the offline compact base)")
    ct.add_argument("--min-each", type=int, default=3, help="organs need this many present and absent slices")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    print(report_table(args.csv) if args.what == "reports" else ct_table(args.manifest, args.model, args.min_each))


if __name__ == "__main__":
    main()
