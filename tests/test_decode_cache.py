"""Decode once: every stage (calibration, plan, confirm, errors, eval) and every rerun
reads the preprocessed crops from the store; each image file is decoded once."""

import collections

import pandas as pd
import torch
from PIL import Image

import vitq.data as data
from tests.test_cli import data_dir, model_dir  # noqa: F401  (module fixtures)
from vitq.cli import main
from vitq.data import CropStore, ImageSet, batches, cacheable
from vitq.models import load_model


def _count_decodes(monkeypatch) -> collections.Counter:
    counts: collections.Counter = collections.Counter()
    real = data.load_rgb

    def counting(path):
        counts[str(path)] += 1
        return real(path)

    monkeypatch.setattr(data, "load_rgb", counting)
    return counts


def test_every_stage_and_rerun_decode_each_image_once(model_dir, data_dir, tmp_path, monkeypatch, capsys):  # noqa: F811
    counts = _count_decodes(monkeypatch)
    args = ["analyze", "--model", str(model_dir), "--data", str(data_dir), "--calib", "8", "--batch-size", "5",
            "--eval-images", "6", "--confirm-images", "6", "--error-images", "4", "--max-steps", "1", "--cost", "macs",
            "--no-progress", "--decode-cache", str(tmp_path / "decoded"), "--out", str(tmp_path / "out")]
    assert main(args) == 0
    assert counts and max(counts.values()) == 1  # calibration, plan, confirm, errors, eval: one decode each
    assert sum(1 for p in counts if "/train/" in p) == 8 and sum(1 for p in counts if "/val/" in p) == 12
    first = pd.read_csv(tmp_path / "out" / "accuracy.csv")
    counts.clear()
    assert not list((tmp_path / "out").rglob("*.npy"))  # the crops live outside the output folder
    # a rerun in a new output folder (same cache): nothing is decoded, results identical
    assert main([*args[:-1], str(tmp_path / "again")]) == 0
    assert not counts
    pd.testing.assert_frame_equal(first, pd.read_csv(tmp_path / "again" / "accuracy.csv"))


def test_cached_pixels_equal_the_processors(model_dir, data_dir, tmp_path):  # noqa: F811
    loaded = load_model(str(model_dir))
    assert cacheable(loaded.processor)
    images = ImageSet.from_folder(data_dir, "val", loaded.model.config)
    store = CropStore(tmp_path, loaded.processor, images.split)
    assert store.ensure(images, progress=False, batch_size=4) == len(images)
    assert store.ensure(images, progress=False) == 0
    bad = data.BadImages(len(images), 0.5)
    got = list(store.batches(images, 5, bad))
    want = list(batches(images, loaded.processor, 5))
    for (p, lab, idx), (q, lab2, idx2) in zip(got, want, strict=True):
        assert torch.equal(p, q) and torch.equal(lab, lab2) and list(idx) == list(idx2)


def test_unreadable_and_edited_files(model_dir, data_dir, tmp_path, monkeypatch):  # noqa: F811
    root = tmp_path / "d"
    for split in ("train", "val"):
        for c in ("cat", "dog"):
            (root / split / c).mkdir(parents=True)
            for i in range(3):
                Image.new("RGB", (40, 36), (30 * i, 60, 9)).save(root / split / c / f"{i}.png")
    (root / "val" / "dog" / "broken.png").write_bytes(b"not an image")
    loaded = load_model(str(model_dir))
    images = ImageSet.from_folder(root, "val", loaded.model.config)
    store = CropStore(tmp_path / "cache", loaded.processor, images.split)
    store.ensure(images, progress=False)
    bad = data.BadImages(len(images), 0.5)
    assert sum(len(i) for _, _, i in store.batches(images, 4, bad)) == 6
    assert bad.count == 1 and bad.paths[0].endswith("broken.png")
    counts = _count_decodes(monkeypatch)
    Image.new("RGB", (40, 36), (255, 0, 0)).save(root / "val" / "cat" / "0.png")  # edited: new size/mtime
    again = CropStore(tmp_path / "cache", loaded.processor, images.split)
    assert again.ensure(images, progress=False) == 1 and len(counts) == 1
