"""vitq analyze --bench: the speed table artefact and its report section (tiny model)."""

from __future__ import annotations

import importlib.util
import json

import pytest

pytest.importorskip("onnxscript", reason="onnxscript (torch's dynamo ONNX exporter) is not installed")
if importlib.util.find_spec("onnxruntime") is None:
    pytest.skip("onnxruntime is not installed (pip install 'vitq[onnx]')", allow_module_level=True)

from tests.test_export_onnx import model_and_data  # noqa: E402,F401  (the tiny model + images fixture)


def test_bench_writes_the_speed_table_and_the_report_shows_it(model_and_data, tmp_path):  # noqa: F811
    from analysis import artifacts
    from quant.presets import preset
    from reports.html import render_report
    from vitq.bench import run_bench
    from vitq.session import Options, Session

    model_dir, data_dir = model_and_data
    session = Session(Options(model=str(model_dir), data=str(data_dir), out=str(tmp_path), calib=8, progress=False))
    session.calibrate()
    configs = {"all": preset("all", session.sites), "mixed_1": preset("mixed_1", session.sites)}
    df, lines = run_bench(session, configs, threads=1, warmup=0, runs=1, rounds=2)
    assert df["config"].tolist() == ["fp32", "fp32", "all", "mixed_1"]
    assert df["backend"].tolist() == ["torch eager", "onnxruntime", "onnxruntime", "onnxruntime"]
    assert (df["throughput_b8"] > 0).all() and df.loc[0, "speedup_b8_vs_fp32_eager"] == 1
    table = artifacts.read(tmp_path, artifacts.SPEED)
    assert table.meta["rounds"] == 2 and "interleaved" in table.meta["method"]
    assert len(lines) == 5
    html = render_report(tmp_path).read_text()
    assert 'id="speed-table"' in html or "speed-table" in html
    assert "Speed on this CPU" in html
    json.loads((tmp_path / "speed.json").read_text())
