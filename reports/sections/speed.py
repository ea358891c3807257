"""CPU speed of FP32 and every config as its Q/DQ ONNX export (vitq analyze --bench)."""

from __future__ import annotations

from analysis import artifacts

from ..format import Column, esc, fmt_fixed, fmt_ratio, fmt_times, make_table, records, text_column
from ..reader import Artefacts
from ..registry import Section, register_section

COLUMNS = [
    text_column("config", "config"),
    text_column("backend", "backend"),
    Column("file_mb", "file (MB)", fmt_fixed(1), title="ONNX file size"),
    Column("latency_b1_ms", "latency b1 (ms)", fmt_fixed(1), title="median at batch 1"),
    Column("latency_b1_spread", "spread", fmt_ratio, title="(max - min) / median of the per-round medians"),
    Column("throughput_b8", "throughput b8 (img/s)", fmt_fixed(1), title="median at batch 8"),
    Column("throughput_b8_spread", "spread", fmt_ratio),
    Column("speedup_b8_vs_fp32_eager", "b8 vs FP32 eager", fmt_times),
]


@register_section("speed", "Speed on this CPU", order=20, optional=True,
                  needs={artifacts.SPEED: tuple(c.key for c in COLUMNS)})
def speed(a: Artefacts, sec: Section) -> None:
    t = a.table(artifacts.SPEED)
    m = t.meta
    caption = (f"FP32 (torch eager, ONNX Runtime) and every config as its Q/DQ ONNX export in ONNX Runtime (int8"
               f" kernels); {esc(m.get('threads'))} threads, {esc(m.get('rounds'))} interleaved rounds of"
               f" {esc(m.get('runs'))} timed runs after {esc(m.get('warmup'))} warm-up; CPU {esc(m.get('cpu'))},"
               f" load average {esc(m.get('load_avg'))} at the start (timings need an idle machine);"
               f" {esc(m.get('method'))}.")
    sec.add_table(make_table("speed-table", caption, COLUMNS, records(t.rows)))
