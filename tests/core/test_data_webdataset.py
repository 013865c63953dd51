"""write_shards + build_webdataset: round trip, exact coverage with workers, bad samples."""
from __future__ import annotations

import io
import sys
import tarfile
from collections import Counter
from pathlib import Path

import pytest
from torch.utils.data import DataLoader

from domainclip.core.backbones.base import PreprocessConfig
from domainclip.core.data import (
    Collator,
    DataSourceConfig,
    ImageTextRecord,
    RecordSet,
    build_image_transform,
    build_webdataset,
    write_shards,
)

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "fixtures"))
import make_fake_images as fake  # noqa: E402

TRANSFORM = build_image_transform(PreprocessConfig(image_size=8), train=False)


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory):
    """Five good fake rows, a truncated JPEG and a missing file, written 3 samples per shard."""
    root = tmp_path_factory.mktemp("wds")
    data = fake.make_fake_dataset(root / "data")
    records = [ImageTextRecord(str(data.root / row.image), list(row.captions), k) for k, row in enumerate(fake.ROWS)]
    records.insert(2, ImageTextRecord(str(data.special["truncated"]), ["broken"], 9))
    records.append(ImageTextRecord(str(data.root / "gone.jpg"), ["missing"], 0))
    result = write_shards(RecordSet(records), str(root / "out" / "train-%04d.tar"), samples_per_shard=3)
    return records, result


def read_all(stream, num_workers: int) -> list[dict]:
    loader = DataLoader(stream, batch_size=None, num_workers=num_workers,
                        multiprocessing_context="fork" if num_workers else None)
    return list(loader)


def test_write_shards_reports_files_pattern_and_skips(shards) -> None:
    records, result = shards
    assert result.written == 6
    assert [Path(s).name for s in result.shards] == ["train-0000.tar", "train-0001.tar"]
    assert result.pattern == str(Path(result.shards[0]).parent / "train-{0000..0001}.tar")
    assert result.skipped == [(records[-1].image, "file not found")]
    with tarfile.open(result.shards[0]) as tar:
        names = tar.getnames()
        assert names[:3] == ["000000000.cls", "000000000.jpg", "000000000.txt"]
        assert tar.extractfile("000000000.txt").read().decode() == "\n".join(records[0].captions)
        assert tar.extractfile("000000001.png").read() == Path(records[1].image).read_bytes()


@pytest.mark.parametrize("num_workers", [0, 2])
def test_every_sample_exactly_once_per_epoch_and_corrupt_image_is_bad(shards, num_workers: int) -> None:
    records, result = shards
    stream = build_webdataset(DataSourceConfig(format="webdataset", path=result.pattern), TRANSFORM, seed=1,
                              collate=Collator(image_shape=(3, 8, 8)), batch_size=2, train=True, shuffle_buffer=4)
    for epoch in (0, 1):
        stream.set_epoch(epoch)
        batches = read_all(stream, num_workers)
        good = [i for b in batches for i in b["indices"].tolist()]
        bad = [entry for b in batches for entry in b["bad"]]
        assert sorted(good) == [0, 1, 3, 4, 5]
        assert len(bad) == 1 and bad[0][0].endswith("train-0000.tar#000000002") and "truncated" in bad[0][1]
        for batch in batches:
            for index, caption, label in zip(batch["indices"].tolist(), batch["captions"], batch["labels"].tolist()):
                assert caption in records[index].captions and label == records[index].label
            assert batch["images"].shape == (len(batch["indices"]), 3, 8, 8)  # all-bad batches too


def test_eval_stream_keeps_order_and_first_caption(shards) -> None:
    records, result = shards
    stream = build_webdataset(DataSourceConfig(format="webdataset", path=result.pattern), TRANSFORM, train=False)
    items = read_all(stream, 0)
    assert [item["index"] for item in items] == [0, 1, 2, 3, 4, 5]
    assert [item["caption"] for item in items if "bad" not in item] == [records[i].captions[0] for i in (0, 1, 3, 4, 5)]


def test_training_draws_every_caption_and_shuffles_by_epoch(shards) -> None:
    records, result = shards
    stream = build_webdataset(DataSourceConfig(format="webdataset", path=result.pattern), TRANSFORM, seed=0, shuffle_buffer=10)
    orders, drawn = set(), Counter()
    for epoch in range(12):
        stream.set_epoch(epoch)
        items = read_all(stream, 0)
        orders.add(tuple(item["index"] for item in items))
        drawn.update(item["caption"] for item in items if item["index"] == 3)
    assert len(orders) > 1
    assert set(drawn) == set(records[3].captions)


def test_resampled_stream_yields_exact_batch_count(shards) -> None:
    _, result = shards
    cfg = DataSourceConfig(format="webdataset", path=result.pattern, num_samples=10)
    stream = build_webdataset(cfg, TRANSFORM, batch_size=4, resampled=True)
    assert len(stream) == 3
    assert len(read_all(stream, 2)) == 3


@pytest.mark.parametrize("cut_in", ["data", "header"])
def test_truncated_shard_is_reported_and_samples_before_the_cut_still_load(shards, tmp_path: Path, cut_in: str) -> None:
    _, result = shards
    with tarfile.open(result.shards[0]) as tar:
        members = tar.getmembers()  # 3 samples x (cls, image, txt)
    fourth = members[3]  # first member of sample 1; sample 0 is complete before it
    cut = fourth.offset_data + 10 if cut_in == "data" else fourth.offset + 100
    broken = tmp_path / "broken.tar"
    broken.write_bytes(Path(result.shards[0]).read_bytes()[:cut])
    items = read_all(build_webdataset(DataSourceConfig(format="webdataset", path=str(broken)), TRANSFORM, train=False), 0)
    assert [item["index"] for item in items if "bad" not in item] == [0]
    shard_errors = [item["bad"][1] for item in items if "bad" in item and item["bad"][0] == str(broken)]
    expected = "ReadError: unexpected end of data" if cut_in == "data" else "EOFError: shard ends inside a tar member"
    assert len(shard_errors) == 1 and shard_errors[0].startswith(f"unreadable shard: {expected}")


def test_samples_without_image_or_caption_become_bad_items(shards, tmp_path: Path) -> None:
    odd = tmp_path / "odd.tar"
    with tarfile.open(odd, "w") as tar:
        for name, payload in [("a.txt", b"no image here"), ("b.jpg", Path(shards[0][0].image).read_bytes()),
                              ("c.jpg", Path(shards[0][0].image).read_bytes()), ("c.txt", b"\n \n")]:
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    items = read_all(build_webdataset(DataSourceConfig(format="webdataset", path=str(odd)), TRANSFORM, train=False), 0)
    assert [tuple(item["bad"]) for item in items] == [
        (f"{odd}#a", "sample has no image (jpg/jpeg/png); keys: ['txt']"),
        (f"{odd}#b", "sample has no txt caption; keys: ['jpg']"),
        (f"{odd}#c", "txt caption is empty"),
    ]
    assert [item["index"] for item in items] == [-1, -1, -1]


def test_missing_shards_are_named(tmp_path: Path) -> None:
    pattern = str(tmp_path / "s-{0..2}.tar")
    with pytest.raises(FileNotFoundError, match=r"3 of 3 shards not found: .*s-0\.tar"):
        build_webdataset(DataSourceConfig(format="webdataset", path=pattern), TRANSFORM)


def test_a_transform_with_its_own_image_reader_is_refused(tmp_path: Path) -> None:
    from domainclip.core.data.transforms import ReadingTransform

    reading = ReadingTransform(TRANSFORM, reader=lambda path: None)
    with pytest.raises(ValueError, match="webdataset streams decode RGB images only"):
        build_webdataset(DataSourceConfig(format="webdataset", path=str(tmp_path / "s-{0..2}.tar")), reading)


def test_stream_length_needs_num_samples(shards) -> None:
    _, result = shards
    stream = build_webdataset(DataSourceConfig(format="webdataset", path=result.pattern), TRANSFORM)
    with pytest.raises(TypeError, match="no length unless num_samples is set"):
        len(stream)
    with pytest.raises(ValueError, match="resampled streams are endless"):
        build_webdataset(DataSourceConfig(format="webdataset", path=result.pattern), TRANSFORM, resampled=True)


def test_captions_with_unusual_line_breaks_stay_one_caption(tmp_path: Path) -> None:
    data = fake.make_fake_dataset(tmp_path / "data")
    image = Path(data.root / fake.ROWS[0].image)
    result = write_shards(RecordSet([ImageTextRecord(str(image), ["a\u2028b", "c\r\nd", "x\x85y"], 0)]),
                          str(tmp_path / "out" / "s-%04d.tar"))
    with tarfile.open(result.shards[0]) as tar:  # three captions, three lines
        assert tar.extractfile("000000000.txt").read().decode().split("\n") == ["a b", "c d", "x y"]
    other = tmp_path / "other.tar"  # a shard from another writer: only "\n" separates captions
    with tarfile.open(other, "w") as tar:
        for name, payload in [("k.jpg", image.read_bytes()), ("k.txt", "a\u2028b\nsecond".encode())]:
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    items = read_all(build_webdataset(DataSourceConfig(format="webdataset", path=str(other)), TRANSFORM, train=False), 0)
    assert [item["caption"] for item in items] == ["a\u2028b"]


@pytest.mark.parametrize("cut", [False, True])
def test_gzipped_shards_read_whole_and_a_cut_one_is_reported(shards, tmp_path: Path, cut: bool) -> None:
    import gzip

    _, result = shards
    packed = gzip.compress(Path(result.shards[0]).read_bytes())
    shard = tmp_path / "train-0000.tar.gz"
    shard.write_bytes(packed[: len(packed) // 2] if cut else packed)
    items = read_all(build_webdataset(DataSourceConfig(format="webdataset", path=str(shard)), TRANSFORM, train=False), 0)
    shard_errors = [item["bad"][1] for item in items if "bad" in item and item["bad"][0] == str(shard)]
    if cut:
        assert len(shard_errors) == 1 and shard_errors[0].startswith("unreadable shard: ReadError: unexpected end of data")
    else:
        assert shard_errors == [] and [item["index"] for item in items if "bad" not in item] == [0, 1]
