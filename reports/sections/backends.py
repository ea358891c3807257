"""A real int8 backend (``vitq eval --backend onnxruntime|torch-int8``) against the
fake-quant simulation: top-1 agreement, logit difference, and the ONNX graphs it ran."""

from __future__ import annotations

from typing import Any

from analysis import artifacts

from ..format import DB1, PCT, Column, esc, fmt_fixed, fmt_int, fmt_sig, is_missing, make_table, records, text_column
from ..reader import Artefacts
from ..registry import Section, register_section

COLUMNS = [
    text_column("config", "config"),
    Column("agreement", "agreement with FP32 (%)", PCT, title="the backend's top-1 against FP32's"),
    Column("sim_agreement", "agreement with simulation (%)", PCT,
           title="the backend's top-1 class against the fake-quant simulation's, same images"),
    Column("sim_images", "images compared", fmt_int, title="run in this process (resumed images are not re-run)"),
    Column("max_abs_logit_diff", "max |logit difference|", fmt_sig, title="backend vs simulation"),
    Column("sim_logit_sqnr_db", "logit SQNR vs simulation (dB)", DB1),
    Column("file_mb", "ONNX file (MB)", fmt_fixed(2)),
    Column("quantize_linear", "QuantizeLinear nodes", fmt_int),
    Column("int8_weights", "int8 weights", fmt_int, title="int8 weight initializers in the graph"),
]


def _real_backend(t: artifacts.Table | None) -> bool:
    return t is not None and not is_missing(t.meta["backend"]) and t.meta["backend"] != "torch"


def _tables(a: Artefacts) -> list[artifacts.Table]:
    return [t for s in (artifacts.ACCURACY, artifacts.EVAL) if _real_backend(t := a.table(s))]


def _rows(t: artifacts.Table) -> list[dict[str, Any]]:
    sim = t.meta["simulation_agreement"] or {}
    onnx = t.meta["onnx_models"] or {}
    rows = []
    for r in records(t.rows):
        name = r["config"]
        s, o = sim.get(name) or {}, onnx.get(name) or {}
        rows.append({"config": name, "agreement": r.get("agreement"), "sim_agreement": r.get("sim_agreement"),
                     "sim_images": s.get("images"), "max_abs_logit_diff": s.get("max_abs_logit_diff"),
                     "sim_logit_sqnr_db": s.get("logit_sqnr_db"),
                     "file_mb": o["bytes"] / 2**20 if isinstance(o.get("bytes"), (int, float)) else None,
                     "quantize_linear": o.get("quantize_linear"), "int8_weights": o.get("int8_weights")})
    return rows


@register_section("backend", "Real int8 backend vs simulation", order=15, optional=True,
                  shown_when=lambda a: bool(_tables(a)),
                  needs={artifacts.ACCURACY: ("config", "agreement"), artifacts.EVAL: ("config", "agreement")})
def backend(a: Artefacts, sec: Section) -> None:
    for t in _tables(a):
        name = esc(t.meta["backend"])
        sec.add("p", f"{esc(t.spec.command)} ({t.path.name}) ran every quantized config in <b>{name}</b> (FP32 in"
                     " torch) and, on the same images, through the fake-quant simulation the rest of this report"
                     " measures. Agreement with the simulation near 100 % means the simulated numbers hold for"
                     f" the real int8 kernels; {fmt_int(t.meta['val_images'])} val images.")
        sec.add_table(make_table(f"backend-{t.spec.stem}", f"{name} against FP32 and against the simulation;"
                                 " agreement in %, logit differences in logit units.", COLUMNS, _rows(t),
                                 row_class=lambda r: "ref-row" if r.get("config") == "fp32" else ""))
    if a.table(artifacts.SPEED) is not None:
        sec.add("p", 'How fast each config runs in ONNX Runtime: see <a href="#speed">Speed on this CPU</a>.')
