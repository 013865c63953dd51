"""Teacher learning and the 1-to-K loss through the one training loop (tiny open_clip, fake Multi30k)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from accelerate.utils import set_seed
from safetensors.torch import load_file

from domainclip.core import config as config_lib
from domainclip.core.backbones import create_backbone
from domainclip.core.backbones.factory import ModelConfig
from domainclip.core.losses import ClipLoss, OneToKLoss
from domainclip.core.run_config import RunConfig
from domainclip.core.train import train
from domainclip.core.train import load_trained
from domainclip.domains.multilingual import load_parallel

from .make_fake_data import write_parallel

RECIPES = Path(__file__).resolve().parents[3] / "recipes" / "multilingual"
TINY = "model={kind: open_clip, name: domainclip-tiny-vit}"


def test_one_to_k_with_one_language_is_clip() -> None:
    torch.manual_seed(0)
    images, texts = F.normalize(torch.randn(6, 8), dim=-1), F.normalize(torch.randn(6, 8), dim=-1)
    expected = ClipLoss()(images, texts, torch.tensor(10.0))
    torch.testing.assert_close(OneToKLoss()(images, texts[:, None], torch.tensor(10.0)), expected)


def test_one_to_k_by_hand() -> None:
    torch.manual_seed(1)
    images, texts = F.normalize(torch.randn(3, 4), dim=-1), F.normalize(torch.randn(3, 2, 4), dim=-1)
    scale = 5.0
    terms = []
    for i in range(3):
        for k in range(2):
            positive = scale * images[i] @ texts[i, k]
            negatives = [scale * images[i] @ texts[j, m] for j in range(3) if j != i for m in range(2)]
            terms.append(-positive + torch.logsumexp(torch.stack([positive, *negatives]), 0))
            terms.append(F.cross_entropy(scale * texts[i, k] @ images.T, torch.tensor(i)))
    torch.testing.assert_close(OneToKLoss()(images, texts, scale), torch.stack(terms).sum() / 12)
    with pytest.raises(ValueError, match=r"text_features \(B, K, D\)"):
        OneToKLoss()(images, texts[0], scale)


def data_overrides(recipe: str, data: Path) -> list[str]:
    """Point every data source of a recipe at ``data`` with no hold-out (the fake set is tiny)."""
    cfg = config_lib.load(RunConfig, RECIPES / f"{recipe}.yaml")
    sources = ["data.train", *(f"data.train_extra.{i}" for i in range(len(cfg.data.train_extra))),
               *(f"eval.{i}.data" for i in range(len(cfg.eval)))]
    if recipe == "teacher":
        sources.append("method.teacher_data")
    if recipe == "one_to_k":
        sources += [f"method.parallel_data.{i}" for i in range(len(cfg.method.parallel_data))]
    return [override for source in sources for override in (f"{source}.path={data}", f"{source}.holdout=''")]


def smoke(recipe: str, data: Path, out: Path, steps: int, lr: float, extra: tuple[str, ...] = ()) -> RunConfig:
    overrides = [f"output_dir={out}", TINY, *data_overrides(recipe, data), "data.batch_size=4", "data.num_workers=0",
                 f"train.max_steps={steps}", f"train.lr={lr}", "train.precision='no'", "train.progress=false",
                 "train.tensorboard=false", "train.log_every=1", "train.warmup_steps=0", "train.weight_decay=0.0",
                 *extra]
    return config_lib.load(RunConfig, RECIPES / f"{recipe}.yaml", overrides)


def teacher_gap(model: torch.nn.Module, teacher: torch.nn.Module, data_path: Path) -> float:
    """Mean squared distance of student(de) to the teacher's mean English feature per image."""
    data = load_parallel(data_path, languages=["en", "de"], holdout="")
    raw = [json.loads(line) for line in data_path.read_text(encoding="utf-8").splitlines()]
    english = {str(data_path.parent / r["image"]): r["captions"]["en"] for r in raw}
    with torch.no_grad():
        student = model.encode_text(model.tokenize(data.captions["de"]))
        targets = torch.stack([F.normalize(teacher.encode_text(teacher.tokenize(english[image])).mean(0), dim=-1)
                               for image in data.images])
    return float(F.mse_loss(student, targets))


def test_teacher_learning_moves_only_the_text_tower_towards_the_teacher(tmp_path: Path) -> None:
    data = write_parallel(tmp_path / "m30k", copies=2)
    cfg = smoke("teacher", data, tmp_path / "runs", steps=12, lr=3e-3)
    assert cfg.method.name == "teacher" and cfg.method.teacher_data.caption_key == "captions.en"
    result = train(cfg)
    saved = load_file(str(result.run_dir / "model" / "trainable.safetensors"))
    assert saved and all(not name.startswith("model.visual.") for name in saved)
    set_seed(cfg.train.seed)
    teacher = create_backbone(ModelConfig(kind="open_clip", name="domainclip-tiny-vit")).eval()
    student, _, _ = load_trained(result.run_dir)
    student.eval()
    image_before = {n: p for n, p in teacher.named_parameters() if n.startswith("model.visual.")}
    assert len(image_before) > 10
    for name, param in student.named_parameters():
        if name in image_before:
            assert torch.equal(param, image_before[name]), f"image tower changed: {name}"
    before, after = teacher_gap(teacher, teacher, data), teacher_gap(student, teacher, data)
    assert after < 0.5 * before, (before, after)
    metrics = {m["dataset"]: m for m in json.loads((result.run_dir / "metrics.json").read_text())}
    assert set(metrics) == {"m30k_holdout_de", "m30k_holdout_en"}
    assert metrics["m30k_holdout_de"]["metrics"]["n_images"] == 8  # English-only images have no German caption


def test_teacher_errors(tmp_path: Path) -> None:
    data = write_parallel(tmp_path / "m30k", copies=1)
    other = write_parallel(tmp_path / "other", copies=1)
    cfg = smoke("teacher", data, tmp_path / "runs", steps=1, lr=1e-3, extra=(f"method.teacher_data.path={other}",))
    with pytest.raises(ValueError, match="training images have no caption in method.teacher_data"):
        train(cfg)
    with pytest.raises(ValueError, match="method.distance must be one of"):
        smoke("teacher", data, tmp_path / "runs2", steps=1, lr=1e-3, extra=("method.distance=l1",))


@pytest.mark.parametrize("recipe", ["one_to_k", "contrastive"])
def test_one_to_k_and_contrastive_recipes_train_the_image_tower(recipe: str, tmp_path: Path) -> None:
    data = write_parallel(tmp_path / "m30k", copies=2)
    cfg = smoke(recipe, data, tmp_path / "runs", steps=2, lr=1e-3)
    result = train(cfg)
    assert result.global_step == 2
    metrics = json.loads((result.run_dir / "metrics.json").read_text())
    assert {m["dataset"] for m in metrics} == {"m30k_holdout_de", "m30k_holdout_en"}
    saved = load_file(str(result.run_dir / "model" / "trainable.safetensors"))
    assert any(name.startswith("model.visual.") for name in saved)
    assert not any(name.startswith(("model.transformer.", "model.token_embedding", "model.text_projection")) for name in saved)


def test_one_to_k_needs_every_language(tmp_path: Path) -> None:
    data = write_parallel(tmp_path / "m30k", copies=1)
    cfg = smoke("one_to_k", data, tmp_path / "runs", steps=1, lr=1e-3,
                extra=("data.train.split=''",))  # English-only images join the training set
    with pytest.raises(ValueError, match="has no caption in method.parallel_data"):
        train(cfg)


def test_one_to_k_refuses_a_loss_it_would_ignore(tmp_path: Path) -> None:
    data = write_parallel(tmp_path / "m30k", copies=1)
    cfg = smoke("one_to_k", data, tmp_path / "runs", steps=1, lr=1e-3, extra=("loss.name=siglip",))
    with pytest.raises(ValueError, match=r"one_to_k brings its own loss.*SigLipLoss"):
        train(cfg)


def test_one_to_k_reports_tokenizer_coverage_and_warns_for_an_unread_language(tmp_path: Path,
                                                                              caplog: pytest.LogCaptureFixture) -> None:
    data = write_parallel(tmp_path / "m30k", copies=1, english_only=0)
    lines = [json.loads(line) for line in data.read_text(encoding="utf-8").splitlines()]
    for line in lines:
        line["captions"]["zh"] = ["一只狗在绿色的草地上奔跑"]
    data.write_text("".join(json.dumps(line, ensure_ascii=False) + "\n" for line in lines), encoding="utf-8")
    cfg = smoke("one_to_k", data, tmp_path / "runs", steps=1, lr=1e-3,
                extra=("model={kind: compact_base}", "method.parallel_data.2.caption_key=captions.zh"))
    with caplog.at_level("INFO", logger="domainclip.data"):
        train(cfg)
    lines = [record.getMessage() for record in caplog.records if record.name == "domainclip.data"]
    assert any(line.startswith("tokenizer coverage of data.train") for line in lines)
    warnings = [record.getMessage() for record in caplog.records if record.levelname == "WARNING"
                and record.name == "domainclip.data"]
    assert len(warnings) == 1 and "method.parallel_data.2" in warnings[0] and "unknown to the tokenizer" in warnings[0]


def test_one_to_k_resumed_mid_run_draws_the_same_extra_captions(tmp_path: Path) -> None:
    """The extra languages' captions are drawn per (epoch, image); a step counter restarting at 0 on
    resume drew different ones (weights differed by 8e-4)."""
    import shutil

    data = write_parallel(tmp_path / "m30k", copies=2)
    extra = ("train.save_every=2", "train.keep_checkpoints=5", "eval=[]",
             "method.parallel_data.2.caption_key=captions.en")  # a 'language' with two captions per image
    whole = train(smoke("one_to_k", data, tmp_path / "runs", steps=4, lr=1e-3, extra=(*extra, "name=whole"))).run_dir
    resumed = whole.parent / "resumed"
    shutil.copytree(whole, resumed)  # the run as a kill after checkpoint 2 would have left it
    shutil.rmtree(resumed / "model")
    shutil.rmtree(resumed / "checkpoints" / "step_0000004")
    (resumed / "train_summary.json").unlink()
    (resumed / "checkpoints" / "latest").write_text("step_0000002\n")
    result = train(smoke("one_to_k", data, tmp_path / "runs", steps=4, lr=1e-3, extra=(*extra, "name=resumed")))
    assert "resumed from step 2" in (resumed / "logs" / "train.log").read_text() and result.global_step == 4
    a, b = (load_file(str(run / "model" / "trainable.safetensors")) for run in (whole, resumed))
    assert [name for name in a if not torch.equal(a[name], b[name])] == []
