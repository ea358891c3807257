"""The real path: the shared DINOv2 probe on real ImageNet images (skipped without ../shared)."""

import json

import pandas as pd
import pytest

from tests.conftest import SHARED_DATA, SHARED_MODEL, needs_shared
from vitq.cli import main
from analysis.evaluate import evaluate_configs
from vitq.session import Options, Session

pytestmark = [needs_shared, pytest.mark.shared]


def _plain_hf_topk(n: int, seed: int) -> tuple[float, float]:
    """Top-1 and top-5 (%) of the uninstrumented transformers model, through its own
    processor, on the val files `--limit n --seed seed` samples; labels from the synset
    folder names and the model's `id2label` ("n01440764: tench, ...")."""
    import torch
    from PIL import Image
    from transformers import AutoImageProcessor, AutoModelForImageClassification

    from vitq.data import ImageSet

    model = AutoModelForImageClassification.from_pretrained(SHARED_MODEL).eval()
    files = [f for f, _ in ImageSet.from_folder(SHARED_DATA, "val", model.config).sample(n, seed).items]
    synset = {label.split(":")[0]: int(i) for i, label in model.config.id2label.items()}
    labels = torch.tensor([synset[f.parent.name] for f in files])
    processor = AutoImageProcessor.from_pretrained(SHARED_MODEL)
    pixels = processor(images=[Image.open(f).convert("RGB") for f in files], return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        ranked = model(pixel_values=pixels).logits.topk(5, dim=1).indices
    return (100 * (ranked[:, 0] == labels).float().mean().item(),
            100 * (ranked == labels[:, None]).any(1).float().mean().item())


def test_presets_on_real_model_write_rows(tmp_path):
    """Default run: the whole CLI on real weights and JPEGs, few images."""
    out = tmp_path / "o"
    rc = main(["eval", "--model", str(SHARED_MODEL), "--data", str(SHARED_DATA), "--calib", "16",
               "--limit", "16", "--batch-size", "16", "--preset", "all,mixed_1,mixed_2", "--out", str(out),
               "--no-progress"])
    assert rc == 0
    df = pd.read_csv(out / "eval.csv")
    assert df["config"].tolist() == ["fp32", "all", "mixed_1", "mixed_2"]
    assert df["images"].eq(16).all()
    # the FP32 row against the plain transformers model on the same 16 files
    top1, top5 = _plain_hf_topk(16, seed=0)
    assert df.loc[0, "top1"] == pytest.approx(top1) and df.loc[0, "top5"] == pytest.approx(top5)
    # the reference's ordering: keeping more sites float can only help agreement with FP32 here
    assert df.loc[2, "logit_sqnr_db"] > df.loc[1, "logit_sqnr_db"]
    rows = json.loads((out / "eval.json").read_text())["rows"]
    assert {r["config"] for r in rows} == {"fp32", "all", "mixed_1", "mixed_2"}
    mixed_2 = (out / "config_mixed_2.yaml").read_text()
    assert "blocks.4.mlp.fc2" in mixed_2 and "blocks.5.mlp.fc2" in mixed_2  # canonical names


@pytest.mark.slow
def test_fp32_accuracy_matches_the_model_readme():
    """README of the probe: top-1 8.46 %, top-5 18.62 % on the 650 val images."""
    session = Session(Options(model=str(SHARED_MODEL), data=str(SHARED_DATA), progress=False))
    val = session.images("val", None)
    assert len(val) == 650
    df = evaluate_configs(session.qmodel, {}, session.batches(val), progress=False)
    assert df.loc[0, "top1"] == pytest.approx(8.46, abs=0.1)
    assert df.loc[0, "top5"] == pytest.approx(18.62, abs=0.1)
