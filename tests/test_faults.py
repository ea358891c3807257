"""Fault injection: the ``vitq`` CLI on broken inputs and killed runs.

Every fault case runs ``vitq eval ...`` on a tiny ViT saved to a tmp folder and a handful
of tiny images, and checks what a user sees. The cases call ``vitq.cli.main(argv)`` in
this process (``vitq()`` below: stdout/stderr captured, SystemExit turned into the exit
code) under the conditions of ``python -m vitq`` with HF_HUB_OFFLINE=1 and one torch
thread, and put back what a run changes in the process (``_cli_state``). A real
subprocess (``vitq_subprocess()``) runs where the process is what is tested: the
SIGKILLed and the SIGINTed run, and [model-offline-hub-id], which also checks that the
whole command, interpreter start and imports included, fails within 15 s with one line
on stderr.

* exit code 2 (a user error), stderr exactly ONE line ``vitq: error: ...`` carrying the
  key phrase, no ``Traceback``;
* no partial result left in ``--out``: no ``*.csv``/``*.json``/``*.yaml``/... result
  file and no ``*.tmp`` anywhere under it. Resume state is allowed to stay (the
  calibration cache ``calibration.pt`` and the ``*.jsonl`` result logs): it is what
  makes the rerun after a fix cheap.

Fault cases (USER_ERROR_CASES, ids in brackets):

  data      [data-missing-folder] [data-empty-folder] [data-no-train] [data-no-val]
            [data-unknown-classes] [data-val-zero-images] [data-val-no-class-folders]
  images    [image-corrupt-jpeg] [image-truncated-jpeg] [image-zero-bytes] [image-text-file]
            (default --max-bad: "unreadable ... more than --max-bad")
  model     [model-not-hf-folder] [model-no-weights] [model-unsupported-beit]
            [model-is-a-file] [model-offline-hub-id] (also: fails within 15 s)
  config    [config-unknown-site] [config-glob-matches-nothing] [config-bad-yaml]
            [config-unknown-observer] [config-bits-1] [config-bits-17] [config-file-missing]
  numerical [numeric-nan-weights] (a NaN fc1 bias: names the site, "non-finite")
  presets   [preset-unknown]
  scale-out [shard-bad-rank] (RANK/WORLD_SIZE of torchrun that are no shard)
  plan      [plan-negative-decide-images] (refused before calibration)

Other cases:

  --debug   [test_debug_shows_the_traceback]: the same fault with a traceback
  skipped   [skip-corrupt-jpeg] [skip-truncated-jpeg] [skip-zero-bytes] [skip-text-file]
            [skip-in-train]: with --max-bad 0.5 the run succeeds, prints "skipped N
            unreadable image(s)" and eval.json meta lists the files
  converted [mode-grayscale] [mode-cmyk-jpeg] [mode-rgba] [mode-palette-gif]
            [mode-png-16bit-gray] [mode-png-48bit-rgb] [mode-tiff-16bit]: exit 0, counted
            among the evaluated images
  long runs [test_sigkill_leaves_parseable_files_and_resume_is_identical]
            [test_sigkill_scratch_folder_is_cleaned_by_the_rerun]
            [test_sigint_exits_130_with_a_resume_hint]
            [test_eval_is_byte_identical_across_runs]

47 tests in all (27 fault + 1 debug + 5 skipped + 7 converted + 4 long runs + 3
housekeeping checks: the good data evaluates, the slow run is slow enough to be killed
mid-way, an in-process run leaves no state behind). About 30 s on 2 CPU cores (6-7 min
when every case was a subprocess).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import random
import shutil
import signal
import struct
import subprocess
import sys
import time
import traceback
import warnings
import zlib
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path
from typing import Callable
from unittest import mock

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from PIL import Image

from tests.conftest import ROOT, tiny_model
from vitq.cli import main
from vitq.data import DataError

LABELS = ["cat", "dog", "fish", "bird", "frog"]
TIMEOUT = 120  # seconds per CLI run
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
RESULT_SUFFIXES = (".csv", ".json", ".yaml", ".yml", ".html", ".npz", ".onnx", ".txt")
GOOD_VAL = 8  # val images of the good data folder (4 classes x 2)


# -- running the CLI -------------------------------------------------------------

@dataclass
class Run:
    """One in-process run: what a CompletedProcess tells of a subprocess run."""
    returncode: int
    stdout: str
    stderr: str
    elapsed: float


@contextlib.contextmanager
def _cli_state():
    """The conditions of ``python -m vitq`` with ENV, and afterwards back to how they were.

    main() replaces ``warnings.showwarning`` and adds a filter (catch_warnings restores
    both; inside, the filters are a fresh interpreter's defaults, not pytest's); Session
    seeds torch's generator; load_model turns off transformers' progress bars. Also
    restored: numpy's and random's generators, torch's thread count (1 here, as
    OMP_NUM_THREADS=1), transformers' verbosity, the environment (HF_HUB_OFFLINE=1 here)
    and the working directory (ROOT here)."""
    from transformers.utils import logging as hf_logging

    torch_rng, np_rng, py_rng = torch.random.get_rng_state(), np.random.get_state(), random.getstate()
    threads, cwd = torch.get_num_threads(), os.getcwd()
    verbosity, progress = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    with warnings.catch_warnings(), mock.patch.dict(os.environ, HF_HUB_OFFLINE="1"):
        warnings.resetwarnings()
        for category in (DeprecationWarning, PendingDeprecationWarning, ImportWarning, ResourceWarning):
            warnings.simplefilter("ignore", category)
        torch.set_num_threads(1)
        os.chdir(ROOT)
        try:
            yield
        finally:
            os.chdir(cwd)
            torch.set_num_threads(threads)
            torch.random.set_rng_state(torch_rng)
            np.random.set_state(np_rng)
            random.setstate(py_rng)
            hf_logging.set_verbosity(verbosity)
            (hf_logging.enable_progress_bar if progress else hf_logging.disable_progress_bar)()


def vitq(*args) -> Run:
    """``vitq *args`` in this process: ``vitq.cli.main`` with stdout and stderr captured,
    transformers' log messages included (its handler keeps the stream it was made with).
    Exceptions that main() lets through (--debug) propagate. Every case passes an absolute --out."""
    from transformers.utils import logging as hf_logging

    out, err = io.StringIO(), io.StringIO()
    hf_logging.get_logger("transformers")  # makes its handler, if no import has yet
    handler = hf_logging._default_handler
    t0 = time.monotonic()
    with _cli_state(), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        stream = handler.setStream(err)
        try:
            rc = main([str(a) for a in args])
        except SystemExit as e:  # argparse: usage errors and --help
            rc = e.code if isinstance(e.code, int) else int(e.code is not None)
        finally:
            handler.setStream(stream)
    return Run(rc, out.getvalue(), err.getvalue(), time.monotonic() - t0)


def vitq_subprocess(*args, cwd: Path = ROOT, timeout: float = TIMEOUT) -> subprocess.CompletedProcess:
    """``python -m vitq *args``. The working directory is the repository root, as for
    ``make``: the editable install maps only vitq/quant/analysis, so ``reports`` (imported
    by the CLI) is found through the working directory. Every case passes an absolute --out."""
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "vitq", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env=ENV, cwd=cwd)
    proc.elapsed = time.monotonic() - t0
    return proc


def stderr_lines(proc) -> list[str]:
    return [line for line in proc.stderr.splitlines() if line.strip()]


def leftovers(out: Path) -> list[str]:
    """Result files and temporary files under ``out`` (resume state excluded)."""
    if not out.exists():
        return []
    return sorted(str(p.relative_to(out)) for p in out.rglob("*")
                  if p.is_file() and (p.suffix in RESULT_SUFFIXES or ".tmp" in p.name))


# -- the material: tiny models, tiny image folders ------------------------------

def _save_tiny_vit(path: Path, nan_bias: bool = False, **overrides) -> Path:
    from transformers import ViTImageProcessor

    model = tiny_model("vit", id2label=dict(enumerate(LABELS)), label2id={l: i for i, l in enumerate(LABELS)},
                       **overrides)
    model.config.architectures = ["ViTForImageClassification"]
    if nan_bias:
        with torch.no_grad():
            model.get_submodule("vit.layers.0.mlp.fc1").bias[3] = float("nan")
    model.save_pretrained(path)
    size = overrides.get("image_size", 32)
    ViTImageProcessor(size={"height": size, "width": size}).save_pretrained(path)
    return path


def _save_tiny_beit(path: Path) -> Path:
    from transformers import BeitConfig, BeitForImageClassification, ViTImageProcessor

    torch.manual_seed(0)
    model = BeitForImageClassification(BeitConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                                  intermediate_size=64, image_size=32, patch_size=8,
                                                  num_labels=5, id2label=dict(enumerate(LABELS))))
    model.config.architectures = ["BeitForImageClassification"]
    model.save_pretrained(path)
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(path)
    return path


def _images(folder: Path, n: int, shade: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.new("RGB", (40, 36), color=(shade, 20 * i, 90)).save(folder / f"{i}.png")


def _good_data(root: Path, train: int = 2, val: int = 2) -> Path:
    for split, n in (("train", train), ("val", val)):
        for c, label in enumerate(LABELS[:4]):
            _images(root / split / label, n, 40 * c)
    return root


def _jpeg_bytes() -> bytes:
    """A valid JPEG whose second half is entropy-coded data (so cutting it truncates pixels)."""
    noise = np.random.default_rng(0).integers(0, 256, (128, 128, 3), dtype=np.uint8)
    buf = BytesIO()
    Image.fromarray(noise).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def _png_rgb48(path: Path, w: int = 20, h: int = 18) -> None:
    """A 16-bit-per-channel RGB PNG (Pillow cannot write one)."""
    rows = np.random.default_rng(1).integers(0, 65536, (h, w * 3), dtype=np.uint16).astype(">u2")
    raw = b"".join(b"\x00" + row.tobytes() for row in rows)

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


def _bad_file(kind: str, folder: Path) -> Path:
    """One unreadable file of ``kind`` in ``folder``."""
    jpeg = _jpeg_bytes()
    name, data = {
        "corrupt": ("corrupt.JPEG", b"\xff\xd8\xff\xe0" + random.Random(0).randbytes(3000)),
        "truncated": ("truncated.JPEG", jpeg[: len(jpeg) // 2]),
        "zero": ("empty.JPEG", b""),
        "text": ("notes.txt", b"this is not an image\n"),
    }[kind]
    (folder / name).write_bytes(data)
    return folder / name


def _odd_image(kind: str, folder: Path) -> Path:
    """A readable image in a mode other than 8-bit RGB."""
    grad16 = (np.arange(36 * 40, dtype=np.uint32).reshape(36, 40) * 40).astype(np.uint16)
    if kind == "grayscale":
        path = folder / "gray.png"
        Image.new("L", (40, 36), 128).save(path)
    elif kind == "cmyk":
        path = folder / "cmyk.jpg"
        Image.new("CMYK", (40, 36), (10, 200, 30, 40)).save(path)
    elif kind == "rgba":
        path = folder / "rgba.png"
        Image.new("RGBA", (40, 36), (10, 200, 30, 100)).save(path)
    elif kind == "palette":
        path = folder / "palette.gif"
        Image.new("RGB", (40, 36), (200, 10, 30)).convert("P").save(path)
    elif kind == "png16":
        path = folder / "gray16.png"
        Image.fromarray(grad16).save(path)
    elif kind == "png48":
        path = folder / "rgb48.png"
        _png_rgb48(path)
    elif kind == "tiff16":
        path = folder / "gray16.tif"
        Image.fromarray(grad16).save(path)
    else:
        raise ValueError(kind)
    return path


BAD_KINDS = {"corrupt-jpeg": "corrupt", "truncated-jpeg": "truncated", "zero-bytes": "zero", "text-file": "text"}
ODD_KINDS = {"grayscale": "grayscale", "cmyk-jpeg": "cmyk", "rgba": "rgba", "palette-gif": "palette",
             "png-16bit-gray": "png16", "png-48bit-rgb": "png48", "tiff-16bit": "tiff16"}


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict[str, Path]:
    """Every model folder, data folder and config file the fault cases point at."""
    root = tmp_path_factory.mktemp("faults")
    w: dict[str, Path] = {"root": root}
    w["model"] = _save_tiny_vit(root / "models" / "tiny-vit")
    w["model_nan"] = _save_tiny_vit(root / "models" / "nan-vit", nan_bias=True)
    w["model_beit"] = _save_tiny_beit(root / "models" / "tiny-beit")
    not_hf = root / "models" / "not-hf"
    not_hf.mkdir()
    (not_hf / "weights.pt").write_bytes(b"\0" * 16)
    w["model_not_hf"] = not_hf
    no_weights = root / "models" / "no-weights"
    no_weights.mkdir()
    for name in ("config.json", "preprocessor_config.json"):
        shutil.copy(w["model"] / name, no_weights / name)
    w["model_no_weights"] = no_weights
    w["model_file"] = w["model"] / "config.json"

    data = root / "data"
    w["data"] = good = _good_data(data / "good")
    w["data_empty"] = data / "empty"
    w["data_empty"].mkdir()
    w["data_no_train"] = data / "no-train"
    shutil.copytree(good / "val", w["data_no_train"] / "val")
    w["data_no_val"] = data / "no-val"
    shutil.copytree(good / "train", w["data_no_val"] / "train")
    w["data_unknown"] = data / "unknown-classes"
    shutil.copytree(good, w["data_unknown"])
    for i, name in enumerate(("zebra", "unicorn")):
        _images(w["data_unknown"] / "val" / name, 1, 200 + i)
    w["data_val_empty"] = data / "val-empty"
    shutil.copytree(good / "train", w["data_val_empty"] / "train")
    (w["data_val_empty"] / "val" / "cat").mkdir(parents=True)
    w["data_val_flat"] = data / "val-flat"
    shutil.copytree(good / "train", w["data_val_flat"] / "train")
    _images(w["data_val_flat"] / "val", 2, 10)
    for key, kind in BAD_KINDS.items():
        shutil.copytree(good, data / f"bad-{key}")
        w[f"bad_file_{key}"] = _bad_file(kind, data / f"bad-{key}" / "val" / "cat")
        w[f"data_bad_{key}"] = data / f"bad-{key}"
    shutil.copytree(good, data / "bad-in-train")
    w["bad_file_in-train"] = _bad_file("corrupt", data / "bad-in-train" / "train" / "dog")
    w["data_bad_in-train"] = data / "bad-in-train"
    for key, kind in ODD_KINDS.items():
        shutil.copytree(good, data / f"odd-{key}")
        _odd_image(kind, data / f"odd-{key}" / "val" / "fish")
        w[f"data_odd_{key}"] = data / f"odd-{key}"

    cfg = root / "configs"
    cfg.mkdir()
    texts = {
        "unknown_site": "name: typo\nfloat_sites: [blocks.0.mlp.fc3]\n",
        "glob_nothing": "name: glob\nfloat_sites: ['*.nothing_here_*']\n",
        "bad_yaml": "name: broken\nfloat_sites: [blocks.0.mlp.fc1\nactivation: {bits: 8\n",
        "unknown_observer": "name: obs\nactivation: {observer: median}\n",
        "bits_1": "name: one\nweight: {bits: 1}\n",
        "bits_17": "name: seventeen\nactivation: {bits: 17}\n",
        "unknown_format": "name: fmt\nformats: {'*.mlp.fc1': int3}\n",
    }
    for key, text in texts.items():
        (cfg / f"{key}.yaml").write_text(text)
        w[f"config_{key}"] = cfg / f"{key}.yaml"
    w["config_missing"] = cfg / "missing.yaml"
    return w


# -- user errors --------------------------------------------------------------------

def _eval(w, *, model="model", data="data", extra=()) -> list:
    return ["eval", "--model", w[model], "--data", w[data], "--calib", "8", "--batch-size", "4",
            "--no-progress", *extra]


@dataclass(frozen=True)
class Case:
    id: str
    argv: Callable[[dict], list]
    phrases: tuple[str, ...]
    max_s: float | None = None  # the run must fail within this many seconds
    in_subprocess: bool = False  # run as `python -m vitq` (else in this process)
    env: tuple[tuple[str, str], ...] = ()  # environment variables set during an in-process run


BAD_NAMES = {"corrupt-jpeg": "corrupt.JPEG", "truncated-jpeg": "truncated.JPEG", "zero-bytes": "empty.JPEG",
             "text-file": "notes.txt"}  # the file _bad_file writes for each kind


def _bad_image_case(key: str) -> Case:
    return Case(f"image-{key}", lambda w: _eval(w, data=f"data_bad_{key}"),
                ("unreadable", "more than --max-bad", BAD_NAMES[key]))


def _config_case(id: str, key: str, *phrases: str) -> Case:
    return Case(id, lambda w: _eval(w, extra=("--preset", "fp32", "--config", w[f"config_{key}"])), phrases)


USER_ERROR_CASES = [
    # data
    Case("data-missing-folder", lambda w: _eval(w) + ["--data", w["root"] / "nope"], ("no such folder",)),
    Case("data-empty-folder", lambda w: _eval(w, data="data_empty"), ("no train/ folder",)),
    Case("data-no-train", lambda w: _eval(w, data="data_no_train"), ("no train/ folder",)),
    Case("data-no-val", lambda w: _eval(w, data="data_no_val"), ("no val/ or valid/ or validation/ folder",)),
    Case("data-unknown-classes", lambda w: _eval(w, data="data_unknown"),
         ("2 class folder(s) match no label", "unicorn", "zebra")),
    Case("data-val-zero-images", lambda w: _eval(w, data="data_val_empty"), ("hold no images",)),
    Case("data-val-no-class-folders", lambda w: _eval(w, data="data_val_flat"), ("no class folders",)),
    # images, default --max-bad
    *[_bad_image_case(k) for k in BAD_KINDS],
    # model
    Case("model-not-hf-folder", lambda w: _eval(w, model="model_not_hf"), ("no config.json",)),
    Case("model-no-weights", lambda w: _eval(w, model="model_no_weights"), ("has no weights",)),
    Case("model-unsupported-beit", lambda w: _eval(w, model="model_beit"),
         ("BeitForImageClassification", "is not supported", "ViTForImageClassification")),
    Case("model-is-a-file", lambda w: _eval(w, model="model_file"), ("not a folder",)),
    Case("model-offline-hub-id", lambda w: _eval(w) + ["--model", "someone/not-cached-model"],
         ("someone/not-cached-model", "cannot be reached", "--local-dir"), max_s=30, in_subprocess=True),  # imports alone take 10-17 s on a loaded 2-core machine; retries would take minutes
    # config
    _config_case("config-unknown-site", "unknown_site", "blocks.0.mlp.fc3", "close matches",
                 "blocks.0.mlp.fc1"),
    _config_case("config-glob-matches-nothing", "glob_nothing", "'*.nothing_here_*' matches no site",
                 "vitq sites"),
    _config_case("config-bad-yaml", "bad_yaml", "bad_yaml.yaml", "not valid YAML"),
    _config_case("config-unknown-observer", "unknown_observer", "unknown observer 'median'", "minmax"),
    _config_case("config-bits-1", "bits_1", "bits must be an integer in 2..16", "got 1"),
    _config_case("config-bits-17", "bits_17", "bits must be an integer in 2..16", "got 17"),
    _config_case("config-unknown-format", "unknown_format", "formats '*.mlp.fc1': unknown format 'int3'",
                 "a16w8", "w4a8", "fp8"),
    _config_case("config-file-missing", "missing", "config file not found"),
    # numerical
    Case("numeric-nan-weights", lambda w: _eval(w, model="model_nan"),
         ("site blocks.0.mlp.", "non-finite", "during calibration")),
    # presets
    Case("preset-unknown", lambda w: _eval(w, extra=("--preset", "all,int4")),
         ("unknown preset 'int4'", "mixed_2")),
    # scale-out: torchrun's environment, read by --shard auto
    Case("shard-bad-rank", lambda w: ["sensitivity", "--model", w["model"], "--data", w["data"], "--calib", "8",
                                      "--no-progress", "--shard", "auto"],
         ("--shard auto: RANK='one', WORLD_SIZE='2'", "0 <= RANK < WORLD_SIZE"),
         env=(("RANK", "one"), ("WORLD_SIZE", "2"), ("LOCAL_RANK", "0"))),
    # plan options
    Case("plan-negative-decide-images", lambda w: ["plan", *_eval(w)[1:], "--max-drop", "1", "--decide-images", "-3"],
         ("--decide-images -3", ">= 0")),
]

def _params(cases):
    return [pytest.param(c, id=c.id) for c in cases]


@pytest.mark.parametrize("case", _params(USER_ERROR_CASES))
def test_user_error_is_one_actionable_line(case: Case, world, tmp_path):
    out = tmp_path / "out"
    assert not (case.env and case.in_subprocess), "env is set in this process only"
    with mock.patch.dict(os.environ, dict(case.env)):
        proc = (vitq_subprocess if case.in_subprocess else vitq)(*case.argv(world), "--out", out)
    assert proc.returncode == 2, proc.stderr
    lines = stderr_lines(proc)
    assert "Traceback" not in proc.stderr
    assert len(lines) == 1, f"stderr is not one line:\n{proc.stderr}"
    assert lines[0].startswith("vitq: error: "), lines[0]
    for phrase in case.phrases:
        assert phrase in lines[0], f"{phrase!r} not in {lines[0]!r}"
    assert leftovers(out) == []
    assert not proc.stdout.strip() or "wrote" not in proc.stdout
    if case.max_s is not None:
        assert proc.elapsed < case.max_s, f"took {proc.elapsed:.1f} s"


def test_debug_shows_the_traceback(world, tmp_path):
    """With --debug main() lets the error through: the interpreter prints its traceback
    and exits with 1 (neither 0 nor the user-error code 2)."""
    out = tmp_path / "out"
    with pytest.raises(DataError) as raised:
        vitq(*_eval(world), "--data", world["root"] / "nope", "--out", out, "--debug")
    printed = "".join(traceback.format_exception(raised.value))
    assert "Traceback (most recent call last)" in printed
    assert "DataError" in printed and "no such folder" in printed
    assert not out.exists()


def test_in_process_runs_leave_no_state_behind(world, tmp_path):
    """What main() and a run change in this process is put back by _cli_state."""
    from transformers.utils import logging as hf_logging

    def state():
        return (list(warnings.filters), warnings.showwarning, torch.random.get_rng_state().tolist(),
                torch.get_num_threads(), hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled(),
                hf_logging._default_handler.stream, os.getcwd(), os.environ.get("HF_HUB_OFFLINE"))

    before = state()
    assert vitq(*_eval(world, extra=("--preset", "all")), "--out", tmp_path / "out").returncode == 0
    assert vitq(*_eval(world, extra=("--preset", "int4")), "--out", tmp_path / "bad").returncode == 2
    assert state() == before


# -- runs that must succeed ------------------------------------------------------------

def _assert_clean_success(proc, out: Path, images: int) -> dict:
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    assert not [p for p in out.rglob("*") if ".tmp" in p.name]
    df = pd.read_csv(out / "eval.csv")
    assert (df["images"] == images).all(), df["images"].tolist()
    return json.loads((out / "eval.json").read_text())["meta"]


def test_good_data_evaluates(world, tmp_path):
    out = tmp_path / "out"
    proc = vitq(*_eval(world, extra=("--preset", "all")), "--out", out)
    meta = _assert_clean_success(proc, out, GOOD_VAL)
    assert meta["skipped_images"] == [] and "skipped" not in proc.stdout


SKIP_CASES = [pytest.param(k, id=f"skip-{k}") for k in BAD_KINDS] + [pytest.param("in-train", id="skip-in-train")]


@pytest.mark.parametrize("key", SKIP_CASES)
def test_unreadable_images_are_skipped_with_max_bad(key, world, tmp_path):
    out = tmp_path / "out"
    bad = world[f"bad_file_{key}"]
    proc = vitq(*_eval(world, data=f"data_bad_{key}", extra=("--preset", "all", "--max-bad", "0.5")),
                "--out", out)
    meta = _assert_clean_success(proc, out, GOOD_VAL)
    assert "skipped 1 unreadable image(s)" in proc.stdout
    assert [Path(p).name for p in meta["skipped_images"]] == [bad.name]


@pytest.mark.parametrize("key", [pytest.param(k, id=f"mode-{k}") for k in ODD_KINDS])
def test_unusual_image_modes_are_converted(key, world, tmp_path):
    out = tmp_path / "out"
    proc = vitq(*_eval(world, data=f"data_odd_{key}", extra=("--preset", "all")), "--out", out)
    meta = _assert_clean_success(proc, out, GOOD_VAL + 1)
    assert meta["skipped_images"] == [] and "skipped" not in proc.stdout
    assert "unreadable" not in proc.stderr


def test_eval_is_byte_identical_across_runs(world, tmp_path):
    args = _eval(world, extra=("--preset", "all,mixed_1"))
    for name in ("a", "b"):
        proc = vitq(*args, "--out", tmp_path / name)
        assert proc.returncode == 0, proc.stderr
    for result in ("eval.csv", "eval.json"):
        a, b = (tmp_path / n / result for n in "ab")
        assert a.read_bytes() == b.read_bytes(), result


# -- long runs: killed, interrupted, resumed --------------------------------------------

SLOW_VAL = 128  # val images measured by the sensitivity runs below (64 got too fast for SIGINT once)


@pytest.fixture(scope="module")
def slow_world(tmp_path_factory) -> dict[str, Path]:
    """A 6-block ViT at 64x64 px (62 candidates) and 64 val images: a sensitivity run
    takes a few seconds of candidates, long enough to be killed in the middle."""
    root = tmp_path_factory.mktemp("slow")
    model = _save_tiny_vit(root / "vit6", num_hidden_layers=6, image_size=64, patch_size=8)
    data = _good_data(root / "data", train=2, val=SLOW_VAL // 4)
    return {"root": root, "model": model, "data": data}


def _sens_args(sw, out: Path) -> list:
    return ["sensitivity", "--model", sw["model"], "--data", sw["data"], "--calib", "8", "--batch-size", "8",
            "--eval-images", SLOW_VAL, "--no-progress", "--out", out]


def _start(sw, out: Path, name: str) -> subprocess.Popen:
    """Start a sensitivity run in the background; stdout/stderr go to <root>/<name>.out/.err."""
    with open(sw["root"] / f"{name}.out", "w") as so, open(sw["root"] / f"{name}.err", "w") as se:
        # SIGINT at its default: a suite started in the background (`cmd &`, nohup) passes SIG_IGN on,
        # and Python installs no KeyboardInterrupt handler for an ignored SIGINT
        return subprocess.Popen([sys.executable, "-m", "vitq", *map(str, _sens_args(sw, out))],
                                stdout=so, stderr=se, env=ENV, cwd=ROOT, start_new_session=True,
                                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def _wait_for_results(proc: subprocess.Popen, out: Path, n: int, timeout: float = TIMEOUT) -> int:
    """Wait until the sensitivity JSONL holds >= ``n`` candidate rows; returns the count."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for log in out.glob("sensitivity_only_op.*.jsonl"):
            rows = log.read_bytes().count(b"\n") - 1  # the first line is the settings header
            if rows >= n:
                return rows
        if proc.poll() is not None:
            pytest.fail(f"the run ended (rc {proc.returncode}) before {n} results were logged; "
                        "make the slow model slower")
        time.sleep(0.005)
    proc.kill()
    pytest.fail(f"no {n} results within {timeout} s")


def _check_parseable(out: Path) -> list[str]:
    """Every file under ``out`` parses; a JSONL may only have a torn last line."""
    seen = []
    for path in sorted(p for p in out.rglob("*") if p.is_file()):
        seen.append(str(path.relative_to(out)))
        assert ".tmp" not in path.name, f"temporary file left: {path}"
        if path.suffix == ".csv":
            pd.read_csv(path)
        elif path.suffix == ".json":
            json.loads(path.read_text())
        elif path.suffix == ".jsonl":
            lines = path.read_text().split("\n")
            for line in lines[:-1]:  # every newline-terminated line is complete JSON;
                json.loads(line)  # a torn last line (no newline yet) is tolerated
        elif path.suffix in (".yaml", ".yml"):
            yaml.safe_load(path.read_text())
        elif path.suffix == ".pt":
            torch.load(path, weights_only=False)
        elif path.suffix == ".npy":
            np.load(path, mmap_mode="r")
        else:
            pytest.fail(f"unexpected file {path}")
    return seen


@pytest.fixture(scope="module")
def reference_sensitivity(slow_world) -> Path:
    """An uninterrupted run, for comparison."""
    out = slow_world["root"] / "reference"
    proc = vitq(*_sens_args(slow_world, out))
    assert proc.returncode == 0, proc.stderr
    assert "resuming" not in proc.stdout
    return out


@pytest.fixture(scope="module")
def killed_and_resumed(slow_world):
    """SIGKILL a sensitivity run after >= 3 logged candidates, then rerun it to the end."""
    out = slow_world["root"] / "killed"
    proc = _start(slow_world, out, "killed")
    rows = _wait_for_results(proc, out, 3)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    after_kill = _check_parseable(out)
    rerun = vitq(*_sens_args(slow_world, out))
    return {"out": out, "rows_at_kill": rows, "killed_rc": proc.returncode, "files_after_kill": after_kill,
            "rerun": rerun}


def test_slow_run_is_slow_enough_to_be_killed(killed_and_resumed):
    assert killed_and_resumed["killed_rc"] == -signal.SIGKILL
    assert killed_and_resumed["rows_at_kill"] < 62, "the run had finished before the kill"


def test_sigkill_leaves_parseable_files_and_resume_is_identical(killed_and_resumed, reference_sensitivity):
    out, rerun = killed_and_resumed["out"], killed_and_resumed["rerun"]
    assert any(f.endswith(".jsonl") for f in killed_and_resumed["files_after_kill"])  # checked: they parse
    assert rerun.returncode == 0, rerun.stderr
    assert "resuming:" in rerun.stdout
    _check_parseable(out)
    for name in ("sensitivity_only_op.csv", "sensitivity_only_op.json"):
        assert (out / name).read_bytes() == (reference_sensitivity / name).read_bytes(), name


def test_sigkill_scratch_folder_is_cleaned_by_the_rerun(killed_and_resumed):
    out = killed_and_resumed["out"]
    assert killed_and_resumed["rerun"].returncode == 0
    stale = sorted(p.name for p in out.iterdir() if p.is_dir())
    assert stale == [], f"left behind: {stale}"


def test_sigint_exits_130_with_a_resume_hint(slow_world):
    out = slow_world["root"] / "interrupted"
    proc = _start(slow_world, out, "interrupted")
    _wait_for_results(proc, out, 1)
    os.kill(proc.pid, signal.SIGINT)
    rc = proc.wait(timeout=60)
    err = (slow_world["root"] / "interrupted.err").read_text()
    assert rc == 130, err + (slow_world["root"] / "interrupted.out").read_text()[-2000:]
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("vitq: interrupted"), err
    assert "rerun the same command" in lines[0]
    assert not [p for p in out.rglob("*") if ".tmp" in p.name or p.name.startswith("vitq-sens-")]
    _check_parseable(out)
    rerun = vitq(*_sens_args(slow_world, out))
    assert rerun.returncode == 0 and "resuming:" in rerun.stdout, rerun.stdout + rerun.stderr
