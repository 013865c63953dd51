"""``domainclip`` command line: train and evaluate recipes.

    domainclip train RECIPE [KEY=VALUE ...]     train; writes runs/NAME
    domainclip eval RECIPE|RUN [KEY=VALUE ...]  evaluate a base model (recipe) or a finished run
    domainclip show RUN                         a run's recipe, method, steps, metrics and weights
    domainclip precision-guard RECIPE|RUN       do bf16 / fp16 weights change its decisions? (vs fp32)
    domainclip config RECIPE [KEY=VALUE ...]    print the resolved recipe
    domainclip quickstart [KEY=VALUE ...]       offline demo on the bundled sample
    domainclip compare SPEC [KEY=VALUE ...]     methods side by side (k-shot or base-to-novel)
    domainclip wise-ft RUN --select-on TASK     WiSE-FT sweep over the mixing weight
    domainclip merge RUN                        LoRA adapters merged into full weights
    domainclip convert-weights IN.pt OUT.safetensors  a downloaded .pt state dict as safetensors
    domainclip build-base [KEY=VALUE ...]       rebuild the offline compact base
    domainclip export RUN --format F --out DIR  open_clip / hf / adapter / dual_encoder folder
    domainclip publish RUN --repo-id ORG/NAME   export + model card to the Hub (--dry-run DIR: only write it)
    domainclip classify --model M --labels a,b IMAGES...  zero-shot labels (JSON/CSV; ONNX export)
    domainclip index MODEL DATA --out INDEX     embed images into a searchable FAISS index (resumable)
    domainclip search INDEX --text T | --image P  top-k images of an index
    domainclip serve MODEL [--index INDEX]      HTTP service (classify, embed, search) and web page

RECIPE is a YAML path or the name of a bundled recipe (``remote_sensing/full``).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import sys
from pathlib import Path

from . import config as config_lib
from .errors import UserError
from .recipe_files import list_recipes, resolve_recipe  # noqa: F401  (list_recipes: public CLI helper)


def _cmd_train(args: argparse.Namespace) -> int:
    from .plots import plot_run
    from .run_summary import metric_lines
    from .train import load_run_config, train

    result = train(load_run_config(resolve_recipe(args.recipe), args.overrides))
    plot = plot_run(result.run_dir)
    for line in metric_lines(result.metrics):  # the final metrics, readable; stdout stays one JSON line
        print(f"  {line}", file=sys.stderr)
    print(json.dumps({"run_dir": str(result.run_dir), "global_step": result.global_step,
                      "trainable_parameters": result.trainable_parameters,
                      "samples_per_second": round(result.samples_per_second, 2),
                      "metrics": metric_lines(result.metrics), "summary_png": str(plot)}))
    return 0


def _cmd_show(args: argparse.Namespace) -> int:
    from .run_summary import run_summary

    print(run_summary(args.run))
    return 0


# what evaluating a trained run folder may change: the tasks, their loading, the merge setting
RUN_EVAL_OVERRIDABLE = ("eval", "data.num_workers", "token_merging")


def _eval_target(target_arg: str, overrides: list[str], run_file: str, base_file: str):
    """(model, method, config, default output file) of a run folder or a recipe's base model."""
    from .run_config import RunConfig
    from .train import build_model, load_trained

    target = Path(target_arg)
    if target.is_dir():
        fixed = [o for o in overrides if not o.split("=", 1)[0].strip().startswith(RUN_EVAL_OVERRIDABLE)]
        if fixed:  # the run's weights are loaded as trained: such an override would only be recorded
            raise SystemExit(f"{target_arg}: override {fixed[0]!r} cannot apply to a trained run (its model, "
                             f"method and training are fixed); a run folder takes overrides of "
                             f"{', '.join(k + '*' for k in RUN_EVAL_OVERRIDABLE)} only")
        model, method, cfg = load_trained(target)
        if overrides:
            cfg = config_lib.load(RunConfig, None, overrides, base=config_lib.to_dict(cfg))
        out = target / run_file
    else:
        cfg = config_lib.load(RunConfig, resolve_recipe(target_arg), overrides)
        model, method = build_model(cfg)[0], None
        out = Path(cfg.output_dir) / cfg.name / base_file
    if not cfg.eval:
        raise SystemExit(f"{target_arg}: the recipe has no eval tasks (add an 'eval:' list)")
    return model, method, cfg, out


def _cmd_eval(args: argparse.Namespace) -> int:
    from .eval import write_metrics
    from .train.evaluation import run_eval_tasks

    model, method, cfg, out = _eval_target(args.target, args.overrides, "metrics_eval.json", "metrics_base.json")
    out = Path(args.out) if args.out else out
    results = run_eval_tasks(cfg, model, method=method)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_metrics(out, results)
    print(json.dumps(results, indent=2))
    return 0


def _cmd_precision_guard(args: argparse.Namespace) -> int:
    from .checkpoint import atomic_write_text
    from .eval.precision_guard import format_guard, run_precision_guard
    from .token_merging import token_merging

    model, method, cfg, out = _eval_target(args.target, args.overrides, "precision_guard.json",
                                           "precision_guard_base.json")
    out = Path(args.out) if args.out else out
    precisions = [p.strip() for p in args.precisions.split(",") if p.strip()]
    # the model as it is evaluated: with the recipe's (or an override's) token merging
    with token_merging(model, cfg.token_merging) if cfg.token_merging.active else contextlib.nullcontext():
        report = run_precision_guard(cfg.eval, model, precisions, num_workers=cfg.data.num_workers, method=method,
                                     refine_ties=args.refine_ties)
    report["target"] = args.target
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out, json.dumps(report, indent=2) + "\n")
    print(format_guard(report))
    print(f"written: {out}")
    return 0 if report["passed"] else 1


def _cmd_config(args: argparse.Namespace) -> int:
    from .run_config import RunConfig

    if args.reference:
        from .reference import recipe_reference_markdown

        print(recipe_reference_markdown(), end="")
        return 0
    if not args.recipe:
        raise ValueError("config: give a RECIPE, or --reference for the documentation of every key")

    cfg = config_lib.load(RunConfig, resolve_recipe(args.recipe), args.overrides)
    import yaml

    print(yaml.safe_dump(config_lib.to_dict(cfg), sort_keys=False, allow_unicode=True), end="")
    return 0


def _cmd_quickstart(args: argparse.Namespace) -> int:
    from .cards import write_run_card
    from .plots import plot_run
    from .train import load_run_config, train

    overrides = [f"output_dir={args.out}", *args.overrides] if args.out else list(args.overrides)
    result = train(load_run_config(resolve_recipe("examples/quickstart"), overrides))
    print(f"\nquickstart: {result.global_step} steps, {result.trainable_parameters:,} trained parameters, "
          f"{result.train_seconds:.0f} s")
    for record in result.metrics:
        retention = record.get("retention")
        if retention:
            print(f"  {record['dataset']}: zero-shot {retention['metric']} before {retention['before']:.3f} "
                  f"-> after {retention['after']:.3f} ({retention['change']:+.3f})")
    card = write_run_card(result.run_dir, name="quickstart-plantvillage-lora", domain="agriculture")
    print(f"  run folder: {result.run_dir}\n  plot: {plot_run(result.run_dir)}\n  model card: {card}")
    return 0


def _cmd_compare(args: argparse.Namespace) -> int:
    from .compare import compare, load_spec

    spec_path = resolve_recipe(args.spec)
    out = compare(load_spec(spec_path, args.overrides), spec_path.parent)
    print((out / "compare.md").read_text())
    return 0


def _cmd_wise_ft(args: argparse.Namespace) -> int:
    from .wise_ft import DEFAULT_ALPHAS, wise_ft_sweep

    alphas = [float(a) for a in args.alphas.split(",")] if args.alphas else list(DEFAULT_ALPHAS)
    result = wise_ft_sweep(args.run, alphas, args.select_on, args.out or None, min_retention=args.min_retention)
    print(json.dumps(result, indent=2))
    return 0


def _cmd_merge(args: argparse.Namespace) -> int:
    from .export.merge import merge_run

    print(json.dumps({"merged": str(merge_run(args.run, args.out or None))}))
    return 0


def _cmd_convert_weights(args: argparse.Namespace) -> int:
    from .checkpoint import convert_torch_checkpoint

    print(json.dumps(convert_torch_checkpoint(args.source, args.target, args.key)))
    return 0


def _cmd_build_base(args: argparse.Namespace) -> int:
    from .build_base import build_base

    folder = build_base(args.overrides, args.out or None)
    print(json.dumps({"compact_base": str(folder)}))
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from .export import export_run

    out = export_run(args.run, args.format, args.out)
    print(json.dumps({"format": args.format, "out": str(out)}))
    return 0


def _cmd_classify(args: argparse.Namespace) -> int:
    from .zeroshot.output import format_results, parse_labels

    labels = parse_labels(args.labels)
    if not args.images and not args.export_onnx:
        raise ValueError("classify: give at least one image path (or --export-onnx PATH)")
    if args.model.endswith(".onnx"):
        from .zeroshot import OnnxZeroShotClassifier

        ignored = [flag for flag, value in (("--templates", args.templates), ("--export-onnx", args.export_onnx),
                                            ("--device", args.device), ("--precision", args.precision),
                                            ("--token-merging", args.token_merging),
                                            ("--decode-on-device", args.decode_on_device),
                                            ("--refine-ties", args.refine_ties)) if value]
        if ignored:
            raise ValueError(f"classify: {', '.join(ignored)} cannot apply to an .onnx model (its prompts are baked "
                             f"in at export, and so is its merge schedule; it runs on onnxruntime's CPU provider)")

        onnx_classifier = OnnxZeroShotClassifier(args.model, batch_size=args.batch_size, workers=args.workers)
        results = onnx_classifier.classify(args.images, labels, top_k=args.top_k) if args.images else []
    else:
        from .zeroshot import ZeroShotClassifier, export_onnx

        classifier = ZeroShotClassifier.from_pretrained(args.model, device=args.device or None,
                                                        batch_size=args.batch_size, workers=args.workers,
                                                        precision=args.precision or "auto",
                                                        token_merging=args.token_merging or None,
                                                        decode_on_device=args.decode_on_device,
                                                        refine_ties=args.refine_ties)
        if args.export_onnx:
            path = export_onnx(classifier, labels, args.export_onnx, templates=args.templates)
            print(json.dumps({"onnx": str(path), "labels": labels}), file=sys.stderr)
        results = classifier.classify(args.images, labels, args.templates, top_k=args.top_k) if args.images else []
    if args.images:
        print(format_results(results, args.format), end="" if args.format == "csv" else "\n")
    return 0


def _cmd_publish(args: argparse.Namespace) -> int:
    from .publish import publish_run

    result = publish_run(args.run, args.repo_id, args.format, private=args.private, revision=args.revision,
                         dry_run=args.dry_run or None, card=args.card or None, domain=args.domain,
                         license_id=args.license)
    print(json.dumps(result, indent=2))
    return 0


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("domainclip")
    except PackageNotFoundError:  # a source checkout that was not pip-installed
        return "unknown (not installed)"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="domainclip", description=__doc__.split("\n")[0])
    parser.add_argument("--version", action="version", version=f"domainclip {_version()}")
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser("train", help="train a recipe (resumes automatically)")
    train.add_argument("recipe")
    train.add_argument("overrides", nargs="*", help="KEY=VALUE, e.g. train.lr=1e-4 data.batch_size=64")
    train.set_defaults(func=_cmd_train)
    show_run = sub.add_parser("show", help="print a run's summary: recipe, method, steps, metrics, weights")
    show_run.add_argument("run", help="run folder")
    show_run.set_defaults(func=_cmd_show)
    evaluate = sub.add_parser("eval", help="evaluate a recipe's base model or a finished run folder")
    evaluate.add_argument("target", help="recipe (base model) or run folder (trained model)")
    evaluate.add_argument("overrides", nargs="*")
    evaluate.add_argument("--out", default="", help="metrics JSON to write")
    evaluate.add_argument("--quiet", action="store_true", help="no progress bar (none shows when stderr is no terminal)")
    evaluate.set_defaults(func=_cmd_eval)
    guard = sub.add_parser("precision-guard", help="do bf16 / fp16 weights change the top-1 decisions of a recipe's "
                           "base model or a run on its eval tasks? (exit status 1 when they do)")
    guard.add_argument("target", help="recipe (base model) or run folder (trained model)")
    guard.add_argument("overrides", nargs="*")
    guard.add_argument("--precisions", default="bf16", help="comma-separated, each compared with fp32 (bf16, fp16)")
    guard.add_argument("--refine-ties", action="store_true",
                       help="re-encode near-tied zero-shot images in fp32 (as eval tasks' refine_ties does)")
    guard.add_argument("--out", default="", help="report JSON to write (default: RUN/precision_guard.json)")
    guard.set_defaults(func=_cmd_precision_guard)
    show = sub.add_parser("config", help="print the resolved recipe")
    show.add_argument("recipe", nargs="?", default="")
    show.add_argument("overrides", nargs="*")
    show.add_argument("--reference", action="store_true", help="print the documentation of every recipe key")
    show.set_defaults(func=_cmd_config)
    quick = sub.add_parser("quickstart", help="offline demo: LoRA-adapt the compact base to the bundled sample")
    quick.add_argument("overrides", nargs="*", help="KEY=VALUE overrides of recipes/examples/quickstart.yaml")
    quick.add_argument("--out", default="", help="parent folder of the run (default: runs)")
    quick.set_defaults(func=_cmd_quickstart)
    comp = sub.add_parser("compare", help="run several methods on the same data and tabulate them")
    comp.add_argument("spec", help="comparison spec YAML (or a bundled name such as compare/plantvillage_apple)")
    comp.add_argument("overrides", nargs="*", help="KEY=VALUE, e.g. seeds=[0] shots=[4]")
    comp.add_argument("--quiet", action="store_true", help="no progress bar (none shows when stderr is no terminal)")
    comp.set_defaults(func=_cmd_compare)
    wise = sub.add_parser("wise-ft", help="interpolate base and fine-tuned weights; pick alpha on validation data")
    wise.add_argument("run", help="finished run folder")
    wise.add_argument("--select-on", required=True, help="name of the run's eval task to choose alpha on (validation)")
    wise.add_argument("--alphas", default="", help="comma-separated mixing weights (default 0,0.1,...,1)")
    wise.add_argument("--out", default="", help="output folder (default RUN/wise_ft)")
    wise.add_argument("--min-retention", type=float, default=None, metavar="SHARE",
                      help="best alpha whose retention tasks keep at least SHARE (e.g. 0.95) of the base's score")
    wise.set_defaults(func=_cmd_wise_ft)
    merge = sub.add_parser("merge", help="merge a LoRA run's adapters into full backbone weights")
    merge.add_argument("run")
    merge.add_argument("--out", default="", help="safetensors file (default RUN/model/merged.safetensors)")
    merge.set_defaults(func=_cmd_merge)
    conv = sub.add_parser("convert-weights", help="rewrite a downloaded .pt/.bin state dict as safetensors "
                                                  "(restricted loader: tensors only)")
    conv.add_argument("source", help=".pt or .bin checkpoint (e.g. RemoteCLIP-ViT-B-32.pt)")
    conv.add_argument("target", help=".safetensors file to write")
    conv.add_argument("--key", default="", help="nested state dict to take (default: state_dict / model if present)")
    conv.set_defaults(func=_cmd_convert_weights)
    base = sub.add_parser("build-base", help="rebuild the offline compact base (model_cards/compact_base)")
    base.add_argument("overrides", nargs="*", help="KEY=VALUE overrides of recipes/base/compact_base.yaml")
    base.add_argument("--out", default="", help="folder to write (default: the package's model_cards/compact_base)")
    base.set_defaults(func=_cmd_build_base)
    exp = sub.add_parser("export", help="export a finished run for open_clip, transformers or as a pinned adapter")
    exp.add_argument("run", help="finished run folder")
    exp.add_argument("--format", required=True, help="open_clip, hf, adapter or dual_encoder (see docs/export.md)")
    exp.add_argument("--out", required=True, help="new (or empty) folder to write")
    exp.set_defaults(func=_cmd_export)
    classify = sub.add_parser("classify", help="zero-shot classify images with a run, model folder or model id")
    classify.add_argument("images", nargs="*", help="image files")
    classify.add_argument("--model", required=True,
                          help="run folder, open_clip / Hugging Face / compact-base folder, model id, compact_base, "
                               "or an .onnx file written by --export-onnx")
    classify.add_argument("--labels", required=True, help="comma-separated class names: a,b,c")
    classify.add_argument("--templates", "--template", dest="templates", action="append", default=None,
                          help="prompt template with {} for the label; repeat for an ensemble "
                               "(default: the run's templates, else 'a photo of a {}.')")
    classify.add_argument("--top-k", type=int, default=None, help="labels per image (default: all)")
    classify.add_argument("--format", choices=["json", "csv"], default="json")
    classify.add_argument("--batch-size", type=int, default=32)
    classify.add_argument("--workers", type=int, default=2,
                          help="image-decoding threads, overlapping the forward pass (0 = main thread)")
    classify.add_argument("--precision", default="", choices=["", "auto", "fp32", "bf16", "fp16"],
                          help="dtype of the frozen weights (default auto: bf16 where the device computes it "
                               "fast, else fp32; see docs/zeroshot.md)")
    classify.add_argument("--refine-ties", action="store_true",
                          help="with bf16 / fp16 weights, re-encode in fp32 the images whose top label is near a tie "
                               "(fp32's decisions at close to bf16's speed; docs/zeroshot.md)")
    classify.add_argument("--device", default="", help="cpu, cuda, cuda:1 ... (default: GPU if there is one)")
    classify.add_argument("--decode-on-device", action="store_true",
                          help="decode JPEG files on --device (nvJPEG on a GPU) instead of with PIL in the threads; "
                               "pixels can differ from PIL's by a few levels")
    classify.add_argument("--export-onnx", default="", metavar="PATH",
                          help="also write the image tower + classifier for these labels as ONNX")
    classify.add_argument("--token-merging", default="", metavar="ALGO:R",
                          help="merge image tokens: tome:8 (8 per block), pitome:flops=0.6, tome:0 (off; default: "
                               "the run's recipe setting, else off)")
    classify.set_defaults(func=_cmd_classify)
    pub = sub.add_parser("publish", help="export a run with its model card and upload it to the Hugging Face Hub")
    pub.add_argument("run", help="finished run folder")
    pub.add_argument("--repo-id", required=True, help="ORG/NAME of the Hub model repo")
    pub.add_argument("--format", default="",
                     help="export format (default: the full format of the run's backbone)")
    pub.add_argument("--private", action="store_true", help="create the repo private (refused if it exists public)")
    pub.add_argument("--revision", default="", metavar="TAG", help="tag the uploaded commit with TAG (e.g. v1.0)")
    pub.add_argument("--dry-run", default="", metavar="DIR", help="write the folder that would be uploaded; upload nothing")
    pub.add_argument("--card", default="", help="card config YAML (default: RUN/card.yaml when present)")
    pub.add_argument("--domain", default="", help="card template: generic, medical, remote_sensing, agriculture, multilingual")
    pub.add_argument("--license", default="", help="licence id for the card metadata (default: the card config's, else other)")
    pub.set_defaults(func=_cmd_publish)
    _add_index_and_serve_commands(sub)
    return parser


# --- index, search, serve (docs/serve.md) ----------------------------------------------------------
def _cmd_index(args: argparse.Namespace) -> int:
    from .index import Encoder, IndexOptions, build_index

    options = IndexOptions(batch_size=args.batch_size, workers=args.workers, shard_size=args.shard_size,
                           dtype=args.dtype, kind=args.kind, max_bad_fraction=args.max_bad_fraction,
                           progress=not args.no_progress)
    data_options = {key: value for key, value in (("image_key", args.image_key), ("caption_key", args.caption_key),
                                                  ("label_key", args.label_key),
                                                  ("caption_separator", args.caption_separator)) if value}
    encoder = Encoder.load(args.model, device=args.device or None, precision=args.precision)
    print(json.dumps(build_index(encoder, args.data, args.out, options, data_options, add=args.add)))
    return 0


def _cmd_search(args: argparse.Namespace) -> int:
    from .index import SearchIndex, plot_grid

    if bool(args.text) == bool(args.image):
        raise ValueError("search: give exactly one of --text or --image")
    index = SearchIndex.open(args.index, model=args.model)
    hits = index.search_text(args.text, args.top_k) if args.text else index.search_image(args.image, args.top_k)
    if args.plot:
        plot_grid(hits, args.plot, title=args.text or Path(args.image).name)
    if args.json:
        print(json.dumps({"query": {"text": args.text} if args.text else {"image": args.image}, "hits": hits}, indent=2))
    else:
        for hit in hits:
            extra = f"  [{hit['label']}]" if hit["label"] else ""
            print(f"{hit['rank']:>3}  {hit['score']:.4f}  {hit['path']}{extra}")
    return 0


def _cmd_serve(args: argparse.Namespace) -> int:
    from .serve import ServeSettings, serve

    settings = ServeSettings(max_batch=args.max_batch, max_wait_ms=args.max_wait_ms, device=args.device or None)
    serve(args.model, index=args.index or None, host=args.host, port=args.port, settings=settings)
    return 0


def _add_index_and_serve_commands(sub: argparse._SubParsersAction) -> None:
    index = sub.add_parser("index", help="embed images into a searchable FAISS index (resumable after a kill)")
    index.add_argument("model", help="run folder, export / model folder, model id, compact_base, or a base recipe")
    index.add_argument("data", help="image folder, .csv/.jsonl/.parquet manifest, or webdataset .tar shards")
    index.add_argument("--out", required=True, help="index folder (re-run the same command to resume)")
    index.add_argument("--add", action="store_true", help="add DATA to the existing index at --out")
    index.add_argument("--batch-size", type=int, default=64)
    index.add_argument("--workers", type=int, default=0, help="DataLoader processes decoding images")
    index.add_argument("--shard-size", type=int, default=None,
                       help="images per committed shard, a multiple of --batch-size (new index: default 4096; "
                            "resume / --add: the index's own)")
    index.add_argument("--dtype", choices=["float32", "float16"], default=None,
                       help="stored embedding type (new index: default float32; resume / --add: the index's own)")
    index.add_argument("--kind", default="auto", help="auto (flat up to 100,000 images, hnsw above), flat or hnsw")
    index.add_argument("--max-bad-fraction", type=float, default=0.01, help="stop when more images are unreadable")
    index.add_argument("--image-key", default="", help="manifest column with the image path (default image)")
    index.add_argument("--caption-key", default="", help="manifest column with captions (default caption)")
    index.add_argument("--label-key", default="", help="manifest column with the class name")
    index.add_argument("--caption-separator", default="", help="split a CSV caption cell on this string")
    index.add_argument("--device", default="", help="cpu, cuda, ... (default: GPU if there is one)")
    index.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
                       help="dtype of the frozen weights while encoding (auto: bf16 where the device computes it fast)")
    index.add_argument("--no-progress", action="store_true", help="no progress bar")
    index.set_defaults(func=_cmd_index)
    search = sub.add_parser("search", help="top-k images of an index for a text or an image")
    search.add_argument("index", help="index folder written by `domainclip index`")
    search.add_argument("--text", default="", help="text query")
    search.add_argument("--image", default="", help="query image file")
    search.add_argument("--top-k", type=int, default=10)
    search.add_argument("--json", action="store_true", help="print the hits as JSON")
    search.add_argument("--plot", default="", metavar="PNG", help="also save the hits as an image grid")
    search.add_argument("--model", default="", help="model to encode the query (default: the one that built the index)")
    search.set_defaults(func=_cmd_search)
    serve = sub.add_parser("serve", help="HTTP service: /classify, /embed, /search, a web page at /")
    serve.add_argument("model", help="run folder, export / model folder, model id, compact_base, or a base recipe")
    serve.add_argument("--index", default="", help="index folder for /search and the page's search box")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--max-batch", type=int, default=16, help="images per micro-batch (1 = batching off)")
    serve.add_argument("--max-wait-ms", type=float, default=5.0, help="how long a micro-batch waits to fill")
    serve.add_argument("--device", default="", help="cpu, cuda, ... (default: GPU if there is one)")
    serve.set_defaults(func=_cmd_serve)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "quiet", False):
        from .progress import set_quiet

        set_quiet(True)
    try:
        return args.func(args)
    except (UserError, FileNotFoundError, FileExistsError, ValueError, KeyError) as err:
        print(f"domainclip {args.command}: error: {err}", file=sys.stderr)  # one line, no traceback
        return 2


if __name__ == "__main__":
    sys.exit(main())
