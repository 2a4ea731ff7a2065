"""diffalign.data: table formats, Pick-a-Pic pairs, unpaired/KTO, captions, transforms, collate."""

from __future__ import annotations

import io
import json
import logging

import datasets
import numpy as np
import pytest
import torch
from PIL import Image

from diffalign.data import (
    CaptionedImages,
    Captions,
    DataError,
    PreferencePairs,
    UnpairedImages,
    collate,
    load_table,
    preprocess,
    split_key,
)
from diffalign.data.transforms import TransformParams

R = 16
RED, BLUE, GREEN, YELLOW = (255, 0, 0), (0, 0, 255), (0, 255, 0), (255, 255, 0)
CORRUPT = b"\xff\xd8\xff\xe0 not really a jpeg"


def png(color, size=(24, 20)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return buf.getvalue()


def halves(left, right, size=(40, 24), fmt="PNG") -> bytes:
    """An image whose left and right halves differ, to see flips."""
    w, h = size
    image = Image.new("RGB", size, left)
    image.paste(Image.new("RGB", (w - w // 2, h), right), (w // 2, 0))
    buf = io.BytesIO()
    image.save(buf, format=fmt)
    return buf.getvalue()


def rgb(pixels: torch.Tensor) -> tuple[int, ...]:
    """Mean colour of a `[3, H, W]` tensor in [-1, 1], back in 0..255."""
    return tuple(round(v) for v in ((pixels.mean(dim=(1, 2)) + 1) * 127.5).tolist())


# rows: 0 kept (jpg_0 wins), 1 kept (jpg_1 wins), 2-3 ties, 4 empty caption, 5 both 1, 6 kept but corrupt jpg_0,
# 7 labels 0.3/0.7, 8 missing label
PICKAPIC = {
    "caption": ["red wins", "yellow wins", "tie a", "tie b", "", "both one", "corrupt", "odd", "none"],
    "jpg_0": [png(RED), png(GREEN), png(RED), png(RED), png(RED), png(RED), CORRUPT, png(RED), png(RED)],
    "jpg_1": [png(BLUE), png(YELLOW), png(BLUE), png(BLUE), png(BLUE), png(BLUE), png(BLUE), png(BLUE), png(BLUE)],
    "label_0": [1.0, 0.0, 0.5, 0.5, 1.0, 1.0, 1.0, 0.3, None],
    "label_1": [0.0, 1.0, 0.5, 0.5, 0.0, 1.0, 0.0, 0.7, 1.0],
}
EXPECTED_STATS = dict(rows=9, kept=3, ties_dropped=2, bad_caption=1, bad_label=3, undecodable=0)


@pytest.fixture(scope="module", autouse=True)
def hf_cache(tmp_path_factory):
    """Keep `datasets`' Arrow conversions out of the user's HF cache."""
    old = datasets.config.HF_DATASETS_CACHE
    datasets.config.HF_DATASETS_CACHE = tmp_path_factory.mktemp("hf_cache")
    yield
    datasets.config.HF_DATASETS_CACHE = old


@pytest.fixture(scope="module")
def pickapic(tmp_path_factory):
    path = tmp_path_factory.mktemp("pickapic") / "train.parquet"
    datasets.Dataset.from_dict(PICKAPIC).to_parquet(str(path))
    return path


@pytest.fixture(scope="module")
def flip_pairs(tmp_path_factory):
    """Two non-tie pairs of 40×24 images with distinct left/right halves (winner red|blue, loser green|yellow)."""
    path = tmp_path_factory.mktemp("flip") / "pairs.parquet"
    table = {
        "caption": ["one", "two"],
        "jpg_0": [halves(RED, BLUE), halves(GREEN, YELLOW)],
        "jpg_1": [halves(GREEN, YELLOW), halves(RED, BLUE)],
        "label_0": [1.0, 0.0],
        "label_1": [0.0, 1.0],
    }
    datasets.Dataset.from_dict(table).to_parquet(str(path))
    return path


# ---- loading ------------------------------------------------------------------------------------------------------
def test_pairs_winner_first_and_exact_stats(pickapic):
    ds = PreferencePairs(pickapic, resolution=R)
    assert ds.stats == EXPECTED_STATS
    assert len(ds) == 3
    first, second = ds[0], ds[1]
    assert (first["row"], second["row"]) == (0, 1)
    assert rgb(first["pixels_w"]) == RED and rgb(first["pixels_l"]) == BLUE
    # label_0 == 0: jpg_1 (yellow) is the winner
    assert rgb(second["pixels_w"]) == YELLOW and rgb(second["pixels_l"]) == GREEN
    assert second["caption"] == "yellow wins"
    assert first["pixels_w"].shape == (3, R, R) and first["pixels_w"].dtype == torch.float32
    assert first["pixels_w"].min() == -1.0 and first["pixels_w"].max() == 1.0


def test_swap_puts_loser_first(pickapic):
    ds, swapped = PreferencePairs(pickapic, resolution=R), PreferencePairs(pickapic, resolution=R, swap=True)
    for i in (0, 1):
        assert torch.equal(swapped[i]["pixels_w"], ds[i]["pixels_l"])
        assert torch.equal(swapped[i]["pixels_l"], ds[i]["pixels_w"])
    assert rgb(swapped[1]["pixels_w"]) == GREEN


def test_corrupt_image_is_none_logged_once_counted_and_skipped_by_collate(pickapic, caplog):
    ds = PreferencePairs(pickapic, resolution=R)
    with caplog.at_level(logging.WARNING, logger="diffalign.data"):
        assert ds[2] is None
        assert ds[(1, 2)] is None  # same row again: no second warning
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "row 6" in warnings[0] and "jpg_0" in warnings[0] and str(pickapic) in warnings[0]
    assert ds.stats["undecodable"] == 1
    batch = collate([ds[0], ds[2], ds[1]])
    assert batch["skipped"] == 1 and batch["kept"] == [0, 2]
    assert batch["pixels_w"].shape == (2, 3, R, R)
    assert batch["row"].tolist() == [0, 1]
    assert batch["caption"] == ["red wins", "yellow wins"]
    assert collate([None, None]) == {"skipped": 2, "kept": []}


def test_init_logs_summary(pickapic, caplog):
    with caplog.at_level(logging.INFO, logger="diffalign.data"):
        PreferencePairs(pickapic, resolution=R)
    (line,) = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO]
    assert "9 rows -> 3 kept" in line and "ties_dropped=2" in line and "bad_label=3" in line


def test_missing_column_raises_data_error(tmp_path):
    path = tmp_path / "nolabel.parquet"
    table = {k: v for k, v in PICKAPIC.items() if k != "label_1"}
    datasets.Dataset.from_dict(table).to_parquet(str(path))
    with pytest.raises(DataError, match=r"nolabel\.parquet.*missing required column\(s\) \['label_1'\].*found"):
        PreferencePairs(path, resolution=R)
    with pytest.raises(DataError, match="'prompt'"):
        PreferencePairs(path, resolution=R, caption_column="prompt")


def test_missing_source_and_bad_arguments(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere.parquet"):
        load_table(tmp_path / "nowhere.parquet")
    (tmp_path / "x.csv").write_text("a\n1\n")
    with pytest.raises(DataError, match="unknown suffix '.csv'"):
        load_table(tmp_path / "x.csv")
    with pytest.raises(ValueError, match="`resolution` must be a positive int divisible by 8, got 500"):
        PreferencePairs(tmp_path / "x.csv", resolution=500)
    with pytest.raises(TypeError, match="dataset key"):
        split_key("0")


def test_arrow_save_to_disk_and_parquet_folder(tmp_path, pickapic):
    table = datasets.Dataset.from_dict(PICKAPIC)
    table.save_to_disk(str(tmp_path / "saved"))
    arrow_file = next((tmp_path / "saved").glob("*.arrow"))
    folder = tmp_path / "hub" / "data"
    folder.mkdir(parents=True)
    for split in ("train", "test"):
        table.to_parquet(str(folder / f"{split}-00000-of-00001.parquet"))
    datasets.DatasetDict(train=table, test=table.select(range(2))).save_to_disk(str(tmp_path / "dict"))
    sources = [(tmp_path / "saved", None), (arrow_file, None), (folder, "train"), (tmp_path / "dict", "train")]
    for source, split in sources:
        ds = PreferencePairs(source, resolution=R, split=split)
        assert ds.stats == EXPECTED_STATS, source
        assert rgb(ds[1]["pixels_w"]) == YELLOW
    assert len(load_table(tmp_path / "dict", split="test")) == 2
    with pytest.raises(DataError, match=r"several splits \['test', 'train'\]; pass `split`"):
        load_table(folder)
    with pytest.raises(DataError, match=r"`split` must be one of \['test', 'train'\].*got 'valid'"):
        load_table(tmp_path / "dict", split="valid")


def test_jsonl_with_relative_and_absolute_paths(tmp_path):
    images = tmp_path / "imgs"
    images.mkdir()
    for name, color in [("r.png", RED), ("b.jpg", BLUE), ("g.png", GREEN)]:
        Image.new("RGB", (20, 20), color).save(images / name)
    rows = [
        {"caption": "a", "jpg_0": "imgs/r.png", "jpg_1": str(images / "b.jpg"), "label_0": 0, "label_1": 1},
        {"caption": "b", "jpg_0": "imgs/g.png", "jpg_1": "imgs/missing.png", "label_0": 1, "label_1": 0},
    ]
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    ds = PreferencePairs(tmp_path / "pairs.jsonl", resolution=R)
    assert len(ds) == 2
    winner = rgb(ds[0]["pixels_w"])  # JPEG: approximately blue
    assert max(abs(a - b) for a, b in zip(winner, BLUE)) <= 3
    assert rgb(ds[0]["pixels_l"]) == RED
    assert ds[1] is None and ds.stats["undecodable"] == 1


def test_imagefolder_and_captioned_images(tmp_path):
    folder = tmp_path / "imf"
    folder.mkdir()
    meta = []
    for i, (color, caption) in enumerate([(RED, "red"), (BLUE, ""), (GREEN, "green")]):
        Image.new("RGB", (30, 20), color).save(folder / f"{i}.png")
        meta.append({"file_name": f"{i}.png", "caption": caption})
    (folder / "metadata.jsonl").write_text("".join(json.dumps(m) + "\n" for m in meta))
    ds = CaptionedImages(folder, resolution=R)
    assert ds.stats == dict(rows=3, kept=2, bad_caption=1, undecodable=0)
    item = ds[1]
    assert item["caption"] == "green" and item["row"] == 2 and rgb(item["pixels"]) == GREEN
    assert item["original_size"].tolist() == [20, 30]
    assert set(item) == {"pixels", "caption", "original_size", "crop_top_left", "row"}
    # the same data as a parquet table with an HF Image column (bytes)
    images = [{"bytes": png(RED), "path": None}, {"bytes": CORRUPT, "path": None}]
    table = datasets.Dataset.from_dict(
        {"image": images, "caption": ["r", "x"], "negative": ["not r", "not x"]},
        features=datasets.Features(
            {"image": datasets.Image(), "caption": datasets.Value("string"), "negative": datasets.Value("string")}
        ),
    )
    table.to_parquet(str(tmp_path / "ic.parquet"))
    ds = CaptionedImages(tmp_path / "ic.parquet", resolution=R, extra_columns=["negative"])
    assert rgb(ds[0]["pixels"]) == RED and ds[0]["negative"] == "not r" and ds[1] is None
    with pytest.raises(DataError, match="'image'"):
        CaptionedImages(tmp_path / "ic.parquet", resolution=R, image_column="picture")


def test_captions_from_txt_json_jsonl_parquet(tmp_path):
    (tmp_path / "p.txt").write_text("a cat\n\n  \na dog\n")
    (tmp_path / "p.json").write_text(json.dumps(["a cat", "", "a dog"]))
    (tmp_path / "p.jsonl").write_text('{"caption": "a cat"}\n{"caption": null}\n{"caption": "a dog"}\n')
    datasets.Dataset.from_dict({"caption": ["a cat", "a dog"]}).to_parquet(str(tmp_path / "p.parquet"))
    expected_rows = {"p.txt": [0, 3], "p.json": [0, 2], "p.jsonl": [0, 2], "p.parquet": [0, 1]}
    for name, rows in expected_rows.items():
        ds = Captions(tmp_path / name)
        expected = [{"caption": "a cat", "row": rows[0]}, {"caption": "a dog", "row": rows[1]}]
        assert [ds[i] for i in range(len(ds))] == expected, name
    assert Captions(tmp_path / "p.txt").stats == dict(rows=4, kept=2, bad_caption=2)
    assert list(Captions(tmp_path / "p.json")) == [{"caption": "a cat", "row": 0}, {"caption": "a dog", "row": 2}]


# ---- unpaired (KTO) -----------------------------------------------------------------------------------------------
def test_unpaired_from_pairs_gives_two_items_per_pair(pickapic):
    ds = UnpairedImages(pickapic, resolution=R)
    assert len(ds) == 6 and ds.stats["kept"] == 6 and ds.stats["ties_dropped"] == 2
    items = [ds[i] for i in range(4)]
    assert [it["desirable"] for it in items] == [True, False, True, False]
    assert [rgb(it["pixels"]) for it in items] == [RED, BLUE, YELLOW, GREEN]
    assert [it["row"] for it in items] == [0, 0, 1, 1]
    assert ds[4] is None and ds[5] is not None  # row 6: corrupt winner, fine loser
    batch = collate(items)
    assert batch["desirable"].dtype == torch.bool and batch["desirable"].tolist() == [True, False, True, False]


def test_unpaired_table_with_desirable_or_label(tmp_path):
    for flag, values in [("desirable", [True, False, None]), ("label", [1, 0, 2])]:
        path = tmp_path / f"{flag}.parquet"
        table = {"image": [png(RED), png(BLUE), png(GREEN)], "caption": ["a", "b", "c"], flag: values}
        datasets.Dataset.from_dict(table).to_parquet(str(path))
        ds = UnpairedImages(path, resolution=R)
        assert ds.stats == dict(rows=3, kept=2, bad_caption=0, bad_label=1, undecodable=0)
        assert [ds[0]["desirable"], ds[1]["desirable"]] == [True, False]
        assert rgb(ds[1]["pixels"]) == BLUE
    datasets.Dataset.from_dict({"image": [png(RED)], "caption": ["a"]}).to_parquet(str(tmp_path / "none.parquet"))
    with pytest.raises(DataError, match="'desirable' \\(or 'label'\\)"):
        UnpairedImages(tmp_path / "none.parquet", resolution=R)


# ---- transforms and determinism -----------------------------------------------------------------------------------
def side_colors(pixels: torch.Tensor) -> tuple[tuple[int, ...], tuple[int, ...]]:
    return rgb(pixels[:, :, :2]), rgb(pixels[:, :, -2:])


def test_same_key_same_sample_and_pair_shares_flip_and_crop(flip_pairs):
    make = lambda: PreferencePairs(flip_pairs, resolution=R, center_crop=False, random_flip=True, seed=3)  # noqa: E731
    ds, again = make(), make()
    flips, lefts = set(), set()
    for epoch in range(12):
        item = ds[(epoch, 0)]
        twin = again[(epoch, 0)]
        assert all(torch.equal(item[k], twin[k]) for k in item if torch.is_tensor(item[k]))
        flipped = side_colors(item["pixels_w"]) == (BLUE, RED)
        assert side_colors(item["pixels_w"]) == ((BLUE, RED) if flipped else (RED, BLUE))
        assert side_colors(item["pixels_l"]) == ((YELLOW, GREEN) if flipped else (GREEN, YELLOW))
        assert torch.equal(item["crop_top_left_w"], item["crop_top_left_l"])
        assert item["original_size_w"].tolist() == [24, 40]
        flips.add(flipped)
        lefts.add(int(item["crop_top_left_w"][1]))
    assert flips == {True, False}
    assert len(lefts) > 3 and max(lefts) <= 27 - R  # resized width round(40·16/24) = 27
    assert torch.equal(ds[1]["pixels_w"], ds[(0, 1)]["pixels_w"])
    other_seed = PreferencePairs(flip_pairs, resolution=R, center_crop=False, random_flip=True, seed=4)
    assert any(not torch.equal(ds[(e, 0)]["pixels_w"], other_seed[(e, 0)]["pixels_w"]) for e in range(4))


def test_center_crop_coordinates_and_original_size():
    image = Image.new("RGB", (40, 24))
    out = preprocess(image, R)
    # shortest side 24 -> 16, width 40 -> 27; centre crop left = round(11 / 2) = 6 (Python rounds half to even)
    assert out.original_size.tolist() == [24, 40] and out.crop_top_left.tolist() == [0, 6]
    tall = preprocess(Image.new("RGB", (24, 72)), R)
    assert tall.original_size.tolist() == [72, 24] and tall.crop_top_left.tolist() == [16, 0]


@pytest.mark.parametrize("flip", [False, True])
def test_flip_happens_before_crop(flip):
    """Height == R, so no resampling: each output column is an exact input column we can name."""
    columns = np.arange(48, dtype=np.uint8) * 5
    array = np.broadcast_to(columns[None, :, None], (R, 48, 3)).copy()
    params = TransformParams(flip=flip, crop_fraction=(0.0, 0.25))
    out = preprocess(Image.fromarray(array), R, params)
    left = int(out.crop_top_left[1])
    assert left == int(0.25 * (48 - R + 1)) == 8  # an off-centre crop, so crop-then-flip would differ
    seen = torch.round((out.pixels[0, 0] + 1) * 127.5).long().tolist()
    frame = columns[::-1] if flip else columns  # crop coordinates live in the flipped image's frame
    assert seen == frame[left : left + R].tolist()


def test_lanczos_and_bad_resample():
    image = Image.new("RGB", (32, 32), RED)
    assert rgb(preprocess(image, R, resample="lanczos").pixels) == RED
    with pytest.raises(ValueError, match="`resample` must be one of"):
        preprocess(image, R, resample="nearest")


def test_collate_nested_dicts_and_types():
    items = [
        {"text": {"e": torch.ones(2, 3)}, "desirable": True, "row": 4, "w": 0.5, "caption": "a"},
        {"text": {"e": torch.zeros(2, 3)}, "desirable": False, "row": 7, "w": 1.5, "caption": "b"},
    ]
    batch = collate(items)
    assert batch["text"]["e"].shape == (2, 2, 3) and batch["text"]["e"][0].sum() == 6
    assert batch["row"].dtype == torch.long and batch["w"].tolist() == [0.5, 1.5]
    assert batch["skipped"] == 0 and batch["caption"] == ["a", "b"]
    with pytest.raises(KeyError, match="different keys"):
        collate([{"a": 1}, {"b": 1}])
