"""scripts/crosscheck.py on the embedded default: ONNX Runtime's quantize_static applied to the
exported plan quantizes exactly the plan's 38 int8 sites, the rows carry criterion (b), and a
tool that cannot run is a row with its exact error."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

pytest.importorskip("onnxruntime", reason="onnxruntime is not installed (pip install 'vitq[onnx]')")
pytest.importorskip("onnxscript", reason="onnxscript is not installed (pip install 'vitq[onnx]')")

ROOT = Path(__file__).resolve().parents[1]
# the embedded default has 4 blocks: 4 x 14 + patch_embed, norm, head = 59 sites; float: 9 LayerNorm,
# 4 GELU, 4 softmax outputs and the 4 sites below -> 38 int8
PLAN = "name: plan\nfloat_sites: [blocks.0.attn.q, blocks.3.attn.matmul_av, blocks.1.residual_attn, blocks.2.residual_mlp]\n"


def _script():
    spec = importlib.util.spec_from_file_location("crosscheck", ROOT / "scripts" / "crosscheck.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["crosscheck"] = module
    spec.loader.exec_module(module)
    return module


def test_crosscheck_on_the_embedded_default(tmp_path):
    plan = tmp_path / "plan.yaml"
    plan.write_text(PLAN)
    rows, meta = _script().crosscheck(model=None, data=None, plan_path=plan, out=tmp_path / "out",
                                      tools=["ort-quantizer", "litert-nope"], calib=32, limit=16, rounds=1,
                                      compile_torch=False, progress=False)
    by = {(r["variant"], r.get("runtime")): r for r in rows}
    ort = by[("ort-quantizer", "onnxruntime")]
    assert (ort["int8_sites_plan"], ort["int8_sites_told"], ort["int8_sites_measured"], ort["no_counterpart"]) == (
        38, 38, 38, 0)
    assert ort["images"] == 16 and ort["sim_agreement"] == ort["sim_as_carried_agreement"]
    assert ort["b_carried_gap_lo_pp"] <= ort["b_carried_gap_pp"] <= ort["b_carried_gap_hi_pp"]
    assert ort["b8_img_s"] > 0
    bad = by[("litert-nope", None)]
    assert bad["error"].startswith("TargetError: unknown export target 'litert-nope'")
    data = json.loads((tmp_path / "out" / "crosscheck.json").read_text())
    assert len(data["rows"]) == len(rows) and (tmp_path / "out" / "crosscheck.csv").exists()
    assert "| ort-quantizer (onnxruntime) | 38 / 38 / 38 |" in (tmp_path / "out" / "crosscheck.md").read_text()
    assert not meta["details"]["ort-quantizer"]["told_not_measured"]
