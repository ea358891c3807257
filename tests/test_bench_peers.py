"""scripts/bench_peers.py: NNCF in OpenVINO against vitq's presets in ONNX Runtime, on the
embedded default (tiny ViT, Fashion-MNIST sample); the skip line where the extra is absent."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _script():
    spec = importlib.util.spec_from_file_location("bench_peers", ROOT / "scripts" / "bench_peers.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_peers"] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_without_the_extra_it_skips_in_one_line(monkeypatch, capsys):
    bench = _script()
    monkeypatch.setitem(sys.modules, "nncf", None)  # import nncf raises ImportError
    assert bench.main(["--probe", "tiny"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and out[0].startswith("bench_peers: skipped: nncf is not importable")
    assert "pip install -e '.[peers]'" in out[0]


def test_peers_on_the_embedded_default(tmp_path):
    pytest.importorskip("nncf", reason="nncf is not installed (the `peers` extra: pip install -e '.[peers]')")
    pytest.importorskip("openvino", reason="openvino is not installed (the `peers` extra)")
    pytest.importorskip("onnxscript", reason="onnxscript (torch's dynamo ONNX exporter) is not installed")
    pytest.importorskip("onnxruntime", reason="onnxruntime is not installed (pip install 'vitq[onnx]')")
    import numpy as np
    import openvino as ov
    import torch

    from analysis.metrics import kl_divergence
    from vitq.data import ImageSet, batches
    from vitq.models import load_model

    bench = _script()
    rows, meta = bench.run_peers("tiny", out=tmp_path, calib=16, limit=24, threads=1, rounds=1, warmup=0, runs=1,
                                 progress=False)
    assert [(r["config"], r["runtime"]) for r in rows] == [
        ("fp32", "torch"), ("fp32", "onnxruntime"), ("all", "onnxruntime"), ("mixed_1", "onnxruntime"),
        ("mixed_2", "onnxruntime"), ("nncf", "onnxruntime"), ("fp32", "openvino"), ("nncf_ptq", "openvino"),
        ("nncf_ptq_no_sq", "openvino")]
    by = {(r["config"], r["runtime"]): r for r in rows}
    # the embedded default: 4 blocks of 14 sites + patch_embed, norm, head = 59 sites; LayerNorm (9),
    # GELU (4) and softmax (4) float in every preset; + 8 residual adds (mixed_1), + fc2 of blocks 2, 3
    # (mixed_2), + 8 residual adds and 4 matmul_av (nncf)
    assert [by[(c, "onnxruntime")]["float_sites"] for c in ("all", "mixed_1", "mixed_2", "nncf")] == [17, 25, 27, 29]
    assert by[("fp32", "torch")]["kl"] == 0 and by[("fp32", "torch")]["agreement"] == 100
    assert meta["val_images"] == 24 and meta["calibration_images"] == 16
    for r in rows[1:]:
        assert r["b1_ms"] > 0 and r["b8_ms"] > 0 and r["b8_img_s"] == pytest.approx(8000 / r["b8_ms"])
    for name in ("nncf_ptq", "nncf_ptq_no_sq"):
        assert by[(name, "openvino")]["fake_quantize_ops"] > 0  # NNCF quantized the graph
        assert by[(name, "openvino")]["quantize_s"] > 0
    # the nncf_ptq row is the saved model's: its KL recomputed here, in a separate OpenVINO
    # session fed by vitq's plain (uncached) data path, against the torch model's own logits
    loaded = load_model(None)
    images = ImageSet.from_folder(bench.PROBES["tiny"][1] or ROOT / "vitq" / "default" / "data", "val",
                                  loaded.model.config).sample(24, 0)
    pixels = torch.cat([p for p, _, _ in batches(images, loaded.processor, 8)])
    with torch.inference_mode():
        reference = loaded.model(pixel_values=pixels).logits
    compiled = ov.Core().compile_model(str(tmp_path / "nncf_ptq.xml"), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    logits = torch.from_numpy(np.array(compiled(pixels.numpy())[compiled.output(0)]))
    assert by[("nncf_ptq", "openvino")]["kl"] == pytest.approx(float(kl_divergence(reference, logits).mean()),
                                                               rel=1e-3, abs=1e-7)
    saved = json.loads((tmp_path / "peers.json").read_text())
    assert [r["config"] for r in saved["rows"]] == [r["config"] for r in rows]
    assert (tmp_path / "peers.csv").read_text().count("\n") == len(rows) + 1
    assert (tmp_path / "peers.md").read_text().count("| nncf_ptq |") == 1
