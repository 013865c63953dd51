"""Distillation: a small ViT student with the teacher, the student alone, and the teacher.

accuracy: the teacher is the compact base fine-tuned by a domain's full recipe (agriculture/full:
PlantVillage apple zero-shot accuracy; remote_sensing/full: RSICD retrieval mean recall); the
student is agriculture/distill.yaml's model (a ViT with under a quarter of the teacher's image-tower
parameters, MiniLM text tower shared and locked), trained with ``method: distill`` (teacher = that
run) and alone (``method: full, lock_text: true``) on the same data and steps. Seeds vary student
training; the teacher is trained once per seed list. Prints the headline metric (mean ± std),
image-tower parameters of each.

speed: images/s of the student's and the teacher's image towers (eval, no grad), alternated rounds.

  python bench/distill.py accuracy --domain agriculture --steps 500 --seeds 0 1 2
  python bench/distill.py accuracy --domain remote_sensing --steps 500 --seeds 0 1 2
  python bench/distill.py speed --batch 64 --rounds 3
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _runs import load_average, mean_std, print_table, run, shared_data_present, sized_recipe  # noqa: E402
from measure import LoadLog, alternating, finish  # noqa: E402

from domainclip.core import config as config_lib  # noqa: E402
from domainclip.core.backbones import ModelConfig, create_backbone  # noqa: E402
from domainclip.core.methods import MethodConfig  # noqa: E402
from domainclip.core.recipe_files import resolve_recipe  # noqa: E402

STUDENT_RECIPE = "agriculture/distill"
TEACHER_RECIPES = {"agriculture": "agriculture/full", "remote_sensing": "remote_sensing/full"}


def student_model() -> ModelConfig:
    return config_lib.load(ModelConfig, None, (), base=config_lib.read_yaml(resolve_recipe(STUDENT_RECIPE))["model"])


def image_parameters(model) -> int:
    names = set(model.tower_parameter_names("image"))
    return sum(p.numel() for n, p in model.named_parameters() if n in names)


def accuracy(args: argparse.Namespace) -> int:
    if not shared_data_present():
        print("SKIPPED: the shared data is absent")
        return 0
    spec = TEACHER_RECIPES[args.domain]
    size = dict(steps=args.steps, train_limit=args.train_limit, eval_limit=args.eval_limit, batch_size=args.batch,
                cpu=args.cpu, workers=args.workers)
    teacher_cfg = sized_recipe(spec, args.out, "teacher", 0, **size)
    teacher_cfg = dataclasses.replace(teacher_cfg, eval=teacher_cfg.eval[:1])
    teacher = run(teacher_cfg)
    student = student_model()
    scores = {"student with teacher": [], "student alone": []}
    for seed in args.seeds:
        for label, method in (("student with teacher", {"name": "distill", "lock_text": True,
                                                        "teacher": {"run": teacher["run_dir"]}}),
                              ("student alone", {"name": "full", "lock_text": True})):
            cfg = sized_recipe(spec, args.out, f"{method['name']}_s{seed}", seed, **size)
            cfg = dataclasses.replace(cfg, model=student, method=config_lib.from_dict(MethodConfig, method),
                                      eval=cfg.eval[:1])
            scores[label].append(run(cfg)["main"])
    teacher_params = image_parameters(create_backbone(teacher_cfg.model))
    student_params = image_parameters(create_backbone(student))
    print(f"domain={args.domain} steps={args.steps} seeds={args.seeds} train_limit={args.train_limit} "
          f"eval_limit={args.eval_limit} batch={args.batch} (teacher: one run, seed 0)")
    print_table(["model", "headline metric", "image-tower parameters"], [
        ["student with teacher (distill)", mean_std(scores["student with teacher"]), f"{student_params:,}"],
        ["student alone (full)", mean_std(scores["student alone"]), f"{student_params:,}"],
        ["teacher (compact base, full)", f"{teacher['main']:.4f}", f"{teacher_params:,}"]])
    return 0


def speed(args: argparse.Namespace) -> int:
    device = "cuda" if torch.cuda.is_available() and not args.cpu else "cpu"
    models = {"teacher": create_backbone(ModelConfig(kind="compact_base")).to(device).eval(),
              "student": create_backbone(student_model()).to(device).eval()}
    size = models["teacher"].preprocess.image_size
    images = torch.randn(args.batch, 3, size, size, device=device)
    rates: dict[str, list[float]] = {name: [] for name in models}
    load = LoadLog()
    with torch.no_grad():
        for round_index in range(args.rounds):
            for name in alternating(["teacher", "student"], round_index):
                models[name].encode_image(images)  # warm-up
                if device == "cuda":
                    torch.cuda.synchronize()
                with load.around(name, round_index):
                    start = time.perf_counter()
                    for _ in range(args.repeats):
                        models[name].encode_image(images)
                    if device == "cuda":
                        torch.cuda.synchronize()
                    rates[name].append(args.batch * args.repeats / (time.perf_counter() - start))
    print(f"device={device} batch={args.batch} image size={size} rounds={args.rounds} load average={load_average()}")
    print_table(["image tower", "images/s", "parameters"],
                [[name, mean_std(rates[name]), f"{image_parameters(models[name]):,}"] for name in models])
    ratios = [s / t for s, t in zip(rates["student"], rates["teacher"])]
    print(f"student / teacher images/s: {mean_std(ratios)}")
    return finish({"device": device, "batch": args.batch, "images_per_s": rates, "student_over_teacher": ratios}, load)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="part", required=True)
    acc = sub.add_parser("accuracy")
    acc.add_argument("--domain", choices=sorted(TEACHER_RECIPES), default="agriculture")
    acc.add_argument("--steps", type=int, default=500)
    acc.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    acc.add_argument("--train-limit", type=int, default=0)
    acc.add_argument("--eval-limit", type=int, default=0)
    acc.add_argument("--batch", type=int, default=64)
    acc.add_argument("--cpu", action="store_true")
    acc.add_argument("--workers", type=int, default=0, help="data-loader workers (8 on a GPU machine)")
    acc.add_argument("--out", type=Path, default=Path("runs/bench_distill"))
    spd = sub.add_parser("speed")
    spd.add_argument("--batch", type=int, default=64)
    spd.add_argument("--rounds", type=int, default=3)
    spd.add_argument("--repeats", type=int, default=5)
    spd.add_argument("--cpu", action="store_true")
    args = parser.parse_args(argv)
    return accuracy(args) if args.part == "accuracy" else speed(args)


if __name__ == "__main__":
    raise SystemExit(main())
