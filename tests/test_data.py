import pytest
import torch
from PIL import Image
from transformers import ViTConfig

from vitq.data import SYNSETS, BadImages, DataError, ImageSet, batches, label_index, load_rgb, split_dir


def _config(labels):
    return ViTConfig(id2label={i: l for i, l in enumerate(labels)}, label2id={l: i for i, l in enumerate(labels)})


def test_synset_prefixed_labels_map_by_synset_not_folder_order():
    cfg = _config([f"{s}: name {i}" for i, s in enumerate(SYNSETS)])
    # a val folder holding 3 of 1000 classes: sorted-folder indices would be 0, 1, 2
    assert label_index(cfg, ["n01443537", "n01530575", "n15075141"]) == {
        "n01443537": 1, "n01530575": 10, "n15075141": 999}


def test_plain_imagenet_labels_fall_back_to_the_synset_list():
    cfg = _config([f"class name {i}" for i in range(1000)])  # like google/vit-base-patch16-224
    assert label_index(cfg, ["n01440764", "n01484850"]) == {"n01440764": 0, "n01484850": 2}


def test_folders_named_by_label():
    assert label_index(_config(["cat", "dog", "ankle_boot"]), ["ankle_boot", "Cat"]) == {"ankle_boot": 2, "Cat": 0}


def test_unknown_folders_are_listed():
    with pytest.raises(DataError, match=r"2 class folder\(s\) match no label of the model: bird, fish"):
        label_index(_config(["cat", "dog"]), ["cat", "fish", "bird"])


def _folder(tmp_path, split, classes, n=2, size=(20, 16), mode="RGB"):
    for c in classes:
        (tmp_path / split / c).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            Image.new(mode, size, color=i * 40).save(tmp_path / split / c / f"{i}.png")


@pytest.mark.parametrize("name", ["val", "valid", "validation"])
def test_val_folder_names(tmp_path, name):
    _folder(tmp_path, name, ["cat"])
    assert split_dir(tmp_path, "val") == tmp_path / name


def test_missing_and_empty_data_folders(tmp_path):
    with pytest.raises(DataError, match="no such folder"):
        split_dir(tmp_path / "nope", "val")
    with pytest.raises(DataError, match="no val/ or valid/ or validation/ folder"):
        split_dir(tmp_path, "val")
    (tmp_path / "val").mkdir()
    with pytest.raises(DataError, match="no class folders"):
        ImageSet.from_folder(tmp_path, "val", _config(["cat"]))
    (tmp_path / "val" / "cat").mkdir()
    with pytest.raises(DataError, match="hold no images"):
        ImageSet.from_folder(tmp_path, "val", _config(["cat"]))


def test_seeded_sample_is_deterministic(tmp_path):
    _folder(tmp_path, "train", ["cat", "dog"], n=10)
    images = ImageSet.from_folder(tmp_path, "train", _config(["cat", "dog"]))
    assert images.sample(5, seed=3).items == images.sample(5, seed=3).items
    assert images.sample(5, seed=3).items != images.sample(5, seed=4).items
    assert len(images.sample(None, 0)) == 20


@pytest.mark.parametrize("mode", ["L", "CMYK", "RGBA", "I;16", "P"])
def test_odd_image_modes_become_rgb(tmp_path, mode):
    path = tmp_path / ("x.tif" if mode in ("CMYK", "I;16") else "x.png")
    Image.new(mode, (8, 8)).save(path)
    img = load_rgb(path)
    assert img.mode == "RGB" and img.size == (8, 8)


class _Processor:
    def __call__(self, images, return_tensors):
        return {"pixel_values": torch.zeros(1, 3, 4, 4)}


def test_corrupt_files_are_skipped_and_counted(tmp_path):
    _folder(tmp_path, "val", ["cat"], n=4)
    (tmp_path / "val" / "cat" / "broken.JPEG").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    (tmp_path / "val" / "cat" / "empty.JPEG").write_bytes(b"")
    images = ImageSet.from_folder(tmp_path, "val", _config(["cat"]))
    bad = BadImages(len(images), max_fraction=0.5)
    with pytest.warns(UserWarning, match="skipping unreadable image"):
        got = sum(len(idx) for _, _, idx in batches(images, _Processor(), 2, bad))
    assert got == 4 and sorted(p.rsplit("/", 1)[1] for p in bad.paths) == ["broken.JPEG", "empty.JPEG"]


def test_too_many_bad_files_fail(tmp_path):
    _folder(tmp_path, "val", ["cat"], n=1)
    (tmp_path / "val" / "cat" / "notes.txt").write_text("hello")
    images = ImageSet.from_folder(tmp_path, "val", _config(["cat"]))
    with pytest.raises(DataError, match=r"1 of 2 images are unreadable \(more than --max-bad 0.10%\)"):
        list(batches(images, _Processor(), 2, BadImages(len(images), 0.001)))
