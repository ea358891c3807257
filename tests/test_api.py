"""The Python API (vitq/api.py): an in-memory model and the embedded default, through the
same pipeline steps and artefacts as the command line."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

import vitq
from analysis import artifacts
from quant.config import QuantConfig
from quant.quantizer import QuantSpec
from vitq.cli import main
from vitq.models import DEFAULT_MODEL

from conftest import tiny_model

FAST = dict(calib=16, progress=False, device="cpu")
LABELS = [v for _, v in sorted(json.loads((DEFAULT_MODEL / "config.json").read_text())["id2label"].items(),
                               key=lambda kv: int(kv[0]))]


@pytest.fixture(scope="module")
def processor():
    from transformers import AutoImageProcessor

    return AutoImageProcessor.from_pretrained(DEFAULT_MODEL)


def tiny10(seed: int = 0):
    """The tests' tiny HF ViT with the embedded data's 10 classes (labels given by the API)."""
    return tiny_model("vit", seed, num_labels=10)


def read_csv(path) -> pd.DataFrame:
    return pd.read_csv(path)


def same_numbers(returned: pd.DataFrame, path) -> None:
    """The returned table is the CSV written (numeric columns to the 6 significant digits the CSV
    keeps, the rest exactly)."""
    written = read_csv(path)
    assert list(returned.columns) == list(written.columns)
    assert len(returned) == len(written)
    for col in written.columns:
        a, b = returned[col], written[col]
        if pd.api.types.is_numeric_dtype(b):  # a nullable or object column of numbers compares as numbers
            np.testing.assert_allclose(pd.to_numeric(a.astype(object).where(a.notna(), np.nan)).to_numpy(float),
                                       b.to_numpy(float), rtol=5e-6, atol=0, equal_nan=True, err_msg=col)
        else:
            assert a.fillna("").astype(str).tolist() == b.fillna("").astype(str).tolist(), col


def test_analyze_in_memory_model_returns_what_it_writes(tmp_path, processor):
    model = tiny10()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = model(pixel_values=x).logits
    result = vitq.analyze(model, processor=processor, labels=LABELS, out=tmp_path, images=24, confirm_images=16,
                          limit=40, error_images=8, cost="macs", measure_top=4, **FAST)

    assert isinstance(result.plan.config, QuantConfig)
    assert result.plan.config.to_dict() == QuantConfig.load(tmp_path / artifacts.PLAN_YAML).to_dict()
    same_numbers(result.accuracy, tmp_path / "accuracy.csv")
    assert result.accuracy["config"].tolist()[0] == "fp32" and "plan" in result.accuracy["config"].tolist()
    assert int(result.accuracy.loc[0, "images"]) == 40
    same_numbers(result.plan.steps, tmp_path / "plan_steps.csv")
    same_numbers(result.plan.tried, tmp_path / "plan_tried.csv")
    same_numbers(result.plan.confirm, tmp_path / "plan_confirm.csv")
    same_numbers(result.errors.activations, tmp_path / "errors_activations.csv")
    same_numbers(result.errors.weights, tmp_path / "errors_weights.csv")
    assert result.report == tmp_path / artifacts.REPORT and result.report.is_file()
    meta = json.loads((tmp_path / "accuracy.json").read_text())["meta"]
    assert meta["model"].startswith("memory:ViTForImageClassification@sha1:")
    assert meta["family"] == "vit"
    # the caller's model is neither instrumented nor changed
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not any(hasattr(m, "_vitq") for m in model.modules())
    with torch.no_grad():
        assert torch.equal(model(pixel_values=x).logits, logits)


def test_another_config_and_another_model_give_other_numbers(tmp_path, processor):
    w4 = QuantConfig(name="w4", weight=QuantSpec(bits=4, symmetric=True, per_channel=True),
                     activation=QuantSpec(bits=4))
    a = vitq.evaluate(tiny10(0), processor=processor, labels=LABELS, out=tmp_path, presets=("all",), configs=[w4],
                      limit=32, **FAST)
    same_numbers(a.table, tmp_path / "eval.csv")
    assert a.table["config"].tolist() == ["fp32", "all", "w4"]
    kl = dict(zip(a.table["config"], a.table["kl"]))
    assert kl["w4"] > 2 * kl["all"] > 0  # 4 bits err far more than 8
    assert a.configs["w4"] is w4 and QuantConfig.load(tmp_path / artifacts.config_file("w4")).weight.bits == 4
    # another model in the same output folder: its own calibration and logs (keyed by its weights)
    b = vitq.evaluate(tiny10(1), processor=processor, labels=LABELS, out=tmp_path, presets=("all",), limit=32, **FAST)
    assert a.meta["model"] != b.meta["model"]
    assert a.table["kl"].iloc[1] != b.table["kl"].iloc[1]


def test_default_model_matches_the_command_line(tmp_path):
    """Without model and data: the embedded default, the same numbers as `vitq eval`."""
    api = vitq.eval(out=tmp_path / "api", presets=("all", "mixed_1"), limit=48, **FAST)
    assert main(["eval", "--out", str(tmp_path / "cli"), "--calib", "16", "--limit", "48", "--preset",
                 "all,mixed_1", "--no-progress", "--device", "cpu"]) == 0
    same_numbers(api.table, tmp_path / "cli" / "eval.csv")
    assert api.meta["model"] == str(DEFAULT_MODEL.resolve())


def test_steps_return_their_tables(tmp_path, processor):
    model = tiny10()
    sites = vitq.sites(model)
    assert sites["name"].tolist()[:3] == ["patch_embed", "blocks.0.norm1", "blocks.0.attn.q"]
    assert len(sites) == 1 + 2 * 14 + 2  # patch_embed, 2 blocks of 14, norm, head
    # a preprocessing callable instead of a HF processor: PIL -> (C, H, W), normalised like the default
    def prep(img):
        arr = np.asarray(img.convert("RGB").resize((32, 32)), dtype=np.float32) / 255.0
        return torch.from_numpy((arr - 0.286) / 0.353).permute(2, 0, 1)

    sens = vitq.sensitivity(model, processor=prep, labels=LABELS, out=tmp_path, images=16, group="block", **FAST)
    same_numbers(sens.table, tmp_path / "sensitivity_only_block.csv")
    assert {"block 0", "block 1"} <= set(sens.table["candidate"])
    errs = vitq.errors(model, processor=prep, labels=LABELS, out=tmp_path, images=8, **FAST)
    same_numbers(errs.activations, tmp_path / "errors_activations.csv")
    planned = vitq.plan(model, processor=prep, labels=LABELS, out=tmp_path, images=16, confirm_images=0,
                        cost="macs", measure_top=0, max_kl=1.0, beat_presets=False, **FAST)
    assert planned.confirm is None and planned.met  # KL 1 nat is met by preset all already
    assert planned.config.to_dict() == QuantConfig.load(tmp_path / artifacts.PLAN_YAML).to_dict()


def test_user_errors_are_one_line(processor):
    model = tiny10()
    with pytest.raises(ValueError, match="needs processor="):
        vitq.analyze(model)
    with pytest.raises(ValueError, match="in memory"):
        vitq.evaluate(processor=processor)
    with pytest.raises(ValueError, match="unsupported model class Sequential; vitq supports: "):
        vitq.analyze(torch.nn.Sequential(torch.nn.Linear(2, 2)), processor=processor)
    with pytest.raises(ValueError, match="weights= is for"):
        vitq.sites(model, weights="x.pth")
