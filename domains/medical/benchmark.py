"""Medical benchmark pieces: report-parser section counts (IU X-ray) and CT organ-presence
zero-shot slice classification (TotalSegmentator volume), printed as Markdown tables.

    python -m domainclip.domains.medical.benchmark reports ../shared/data/medical/iu_xray_reports/reports.csv
    python -m domainclip.domains.medical.benchmark ct recipes/medical/ct_totalsegmentator.csv

``ct`` encodes every axial slice of the manifest's volumes once per rendering (stacked lung /
mediastinum / bone windows, and abdomen-window 2.5D slabs) with the offline compact base (or
``--model`` kind), then for each organ with at least ``--min-each`` present and absent slices
scores "the <organ>" against "no <organ>" prompts: balanced accuracy and AUROC of the log-odds
(core ``classification_metrics``). A second table reports the same per pseudo-volume: blocks of
``--block`` consecutive slices of one manifest row (the shared data hold one labelled scan, so
these are blocks of one scan, not independent volumes), scored by ``--aggregate`` (core
``group_metrics``) and labelled present if any slice is.
"""
from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from domainclip.core.backbones.factory import ModelConfig, create_backbone
from domainclip.core.data.dataset import Collator, ImageTextDataset
from domainclip.core.data.sources import DataSourceConfig, read_csv_rows
from domainclip.core.data.transforms import build_image_transform
from domainclip.core.eval.groups import AGGREGATIONS, group_metrics
from domainclip.core.eval.metrics import classification_metrics
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
    encoded = encode_loader_images(model, loader, None, need_labels=False)
    if encoded.bad:  # the features would no longer line up with the slices' labels
        raise ValueError(f"{len(encoded.bad)} CT slice renderings could not be read, e.g. {encoded.bad[:3]}")
    return encoded.features


def organ_logits(model: torch.nn.Module, features: torch.Tensor, class_names: list[str]) -> torch.Tensor:
    """Zero-shot logits (slices, 2) of "no <organ>" / "the <organ>" from the CT prompt ensemble."""
    with torch.no_grad():
        classifier = build_zeroshot_classifier(model, class_names, CT_TEMPLATES).cpu()
        return ZEROSHOT_LOGIT_SCALE * features @ classifier


def pseudo_volumes(records, block: int) -> list[str]:
    """Each slice's group id, cut into blocks of ``block`` consecutive slices of its manifest row
    (``<row>/block<i>``: pseudo-volumes); ``block`` 0 keeps one group per manifest row."""
    seen: dict[str, int] = {}
    groups = []
    for record in records:
        position = seen.get(record.group, 0)
        seen[record.group] = position + 1
        groups.append(f"{record.group}/block{position // block}" if block else record.group)
    return groups


def ct_results(manifest: str, model_kind: str, min_each: int, block: int, aggregate: str
               ) -> tuple[dict[str, dict[str, dict[str, float]]], dict[str, tuple[int, int, int, int]], list[str]]:
    """Per organ and rendering: slice AUROC / balanced accuracy and pseudo-volume ones (core
    ``group_metrics``, label "present if any slice is"); counts (slices and pseudo-volumes present / absent)."""
    model = create_backbone(ModelConfig(kind=model_kind))
    model.eval()
    base = DataSourceConfig(format="ct_slices", path=manifest)
    names = read_label_names(Path(manifest).parent / _first_label_names(manifest))
    renderings = {"3 windows": SliceOptions(), "2.5D": SliceOptions(slab_window="abdomen")}
    results: dict[str, dict[str, dict[str, float]]] = {}
    counts: dict[str, tuple[int, int, int, int]] = {}
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
            logits = organ_logits(model, features, records.class_names)
            slices = classification_metrics(logits, labels, records.class_names)
            volumes = group_metrics(logits, labels, pseudo_volumes(records, block), records.class_names, aggregate,
                                    label_rule="any", prefix="volume")
            results.setdefault(organ, {})[rendering] = {
                "auroc": slices["auroc"], "balanced": slices["balanced_accuracy"],
                "volume_auroc": volumes.get("volume_auroc", float("nan")),
                "volume_balanced": volumes["volume_balanced_accuracy"]}
            matrix = volumes["volume_confusion_matrix"]
            counts[organ] = (present, len(labels) - present, sum(matrix[1]), sum(matrix[0]))
    return results, counts, list(renderings)


def number(value: float) -> str:
    """Three decimals, or "n/a" for NaN (an AUROC over groups of one class)."""
    return "n/a" if value != value else f"{value:.3f}"


def ct_table(manifest: str, model_kind: str, min_each: int, block: int = 5, aggregate: str = "max") -> str:
    """Zero-shot organ-presence metrics per organ, both renderings side by side, and their means:
    per slice, then per pseudo-volume (blocks of ``block`` slices, scores aggregated by ``aggregate``)."""
    results, counts, keys = ct_results(manifest, model_kind, min_each, block, aggregate)

    def table(unit: str, count: slice, auroc: str, balanced: str) -> list[str]:
        header = " | ".join(f"AUROC {k} | bal. acc. {k}" for k in keys)
        lines = [f"| organ | {unit} present / absent | {header} |",
                 "|---|---|" + "---|---|" * len(keys)]
        for organ, by_rendering in results.items():
            cells = " | ".join(f"{number(by_rendering[k][auroc])} | {number(by_rendering[k][balanced])}" for k in keys)
            lines.append(f"| {organ} | {' / '.join(map(str, counts[organ][count]))} | {cells} |")
        # means over the organs with both classes (an organ present in every block has no AUROC)
        kept = [r for r in results.values() if r[keys[0]][auroc] == r[keys[0]][auroc]]
        means = " | ".join(f"{number(sum(r[k][auroc] for r in kept) / len(kept))} | "
                           f"{number(sum(r[k][balanced] for r in kept) / len(kept))}" for k in keys) if kept else "n/a"
        return lines + [f"| **mean of {len(kept)} organs** | | {means} |"]

    title = (f"\nPseudo-volumes: blocks of {block} consecutive slices of a manifest row, scored by the {aggregate} "
             "of their slices' probability of \"present\", labelled present if any slice is. Means over the organs "
             "with both present and absent blocks.\n")
    return "\n".join(table("slices", slice(0, 2), "auroc", "balanced") + [title] +
                     table("pseudo-volumes", slice(2, 4), "volume_auroc", "volume_balanced"))


def _first_label_names(manifest: str) -> str:
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
    ct.add_argument("--block", type=int, default=5,
                    help="pseudo-volume size: consecutive slices of a manifest row (0 = one per manifest row)")
    ct.add_argument("--aggregate", default="max", choices=AGGREGATIONS, help="slice scores -> pseudo-volume score")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    print(report_table(args.csv) if args.what == "reports" else
          ct_table(args.manifest, args.model, args.min_each, args.block, args.aggregate))


if __name__ == "__main__":
    main()
