"""Cross-check: a vitq plan applied by each deployment tool's own quantizer, run in its own
runtime, against FP32 and against vitq's simulation of the same plan.

For every tool (``--tools``, the export targets of ``vitq/targets/``):

1. ``vitq export --to TOOL`` of the plan (the tool's arguments, names resolved in its graph);
2. the tool's own quantizer applies them (``Target.apply``): ONNX Runtime's
   ``quantize_static``, NNCF's ``quantize`` on the OpenVINO model, torchao's PT2E
   ``prepare_pt2e``/``convert_pt2e``, ModelOpt's ``mtq.quantize``, ai-edge-quantizer on the
   LiteRT model; calibrated on vitq's own calibration images (the seeded ``--calib`` sample
   of ``train/``);
3. its model runs on the same val images (``--limit``) in its runtime: ONNX Runtime,
   OpenVINO (CPU plugin, f32), torch (``torch.compile``, inductor's int8 kernels), torch
   eager (ModelOpt's fake-quant model: its int8 runtime is TensorRT, on a GPU), the LiteRT
   interpreter (one image per call: the converted graph has a static batch of 1).

Reported per tool: the sites it quantizes (from its result, beside what the export told
it), top-1 agreement and KL against FP32 (torch), top-1 agreement with vitq's simulation of
the plan, and of the plan *as the tool carries it* (the plan with the int8 sites the tool
has no counterpart for kept float, the export's ``unmatched`` rows), criterion (b) against
the latter: the 95 % paired-bootstrap interval (2000 resamples) of (tool-vs-simulation
agreement) - (simulation-vs-rounding-perturbed-simulation agreement) per image, which holds
when it reaches 0 (``scripts/ort_reproducibility.py``, docs/results.md), and speed
(ms and img/s at batch 8, every model in this one process, interleaved rounds, as in
``scripts/bench_peers.py``). A tool that cannot be installed or run is a row with the
exact error. Writes ``crosscheck.csv``, ``crosscheck.json`` and ``crosscheck.md`` to
``--out`` (default ``out/crosscheck/<probe>``) and prints the table.

    /work/venv-peers/bin/python scripts/crosscheck.py --probe fmnist --limit 256 --calib 256
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from bench_peers import PROBES, OpenVinoRunner, Variant, key, measure_speed  # noqa: E402
from ort_reproducibility import rounding_noise  # noqa: E402

TOOLS = ("ort-quantizer", "nncf", "torchao", "modelopt", "litert")


def error_line(e: BaseException) -> str:
    """The exact error: its type and first line."""
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"


def effective_config(plan, export):
    """The plan as the tool carries it: the int8 sites it has no counterpart for kept float."""
    from quant.config import QuantConfig

    lost = [r.site for r in export.unmatched() if r.plan == "int8"]
    return QuantConfig.from_dict({**plan.to_dict(), "name": f"{plan.name}@{export.target}",
                                  "float_sites": list(plan.float_sites) + lost})


def runner(applied, threads: int, compile_torch: bool):
    """``pixels -> logits`` of a tool's quantized model in its own runtime."""
    import torch

    if applied.runtime == "onnxruntime":
        from vitq.backends import OrtRunner
        return OrtRunner(applied.model, threads)
    if applied.runtime == "openvino":
        return OpenVinoRunner(applied.model, threads, "f32")
    if applied.runtime == "litert":
        from vitq.targets.litert import LiteRtRunner
        return LiteRtRunner(applied.model, threads)
    module = applied.model
    if compile_torch and applied.runtime == "torch":
        from torch._inductor import config as inductor_config
        inductor_config.freezing = True
        module = torch.compile(module)

    def run(pixels):
        with torch.no_grad():
            return module(pixels.float()).float()
    return run


def simulate(qmodel, config, batches, rounding_seed: int | None = None):
    """Logits of the fake-quant simulation of ``config`` (None: FP32) on ``batches``;
    ``rounding_seed``: every quantized activation scaled by (1 + 1e-6 noise) before rounding."""
    import torch

    qmodel.apply(config)
    ctx = rounding_noise(qmodel, rounding_seed) if rounding_seed is not None else contextlib.nullcontext()
    with torch.no_grad(), ctx:
        return torch.cat([qmodel(p).float() for p in batches])


def crosscheck(*, model: str | None, data: str | None, plan_path: Path, out: Path, tools: list[str], calib: int = 256,
               limit: int = 256, seed: int = 0, threads: int = 1, rounds: int = 3, compile_torch: bool = True,
               progress: bool = True) -> tuple[list[dict], dict]:
    import pandas as pd
    import torch

    from analysis.metrics import OutputStats, paired_bootstrap, top1_agreement
    from quant.config import QuantConfig
    from quant.store import atomic_write_text
    from vitq.backends import OrtRunner, calibration_pixels, example_pixels
    from vitq.session import Options, Session
    from vitq.targets import ExportContext, get_target

    torch.set_num_threads(threads)
    out.mkdir(parents=True, exist_ok=True)
    t_start, load_start = time.time(), os.getloadavg()[0]
    session = Session(Options(model=model, data=data, out=str(out), calib=calib, seed=seed, batch_size=8,
                              progress=progress))
    session.calibrate()
    plan = QuantConfig.load(plan_path)
    plan.validate(session.sites)
    qmodel = session.qmodel
    ctx = ExportContext(qmodel, plan, out, example_pixels(session), calibration_pixels(session))
    images = session.images("val", limit)
    batches, labels = [], []
    for pixels, y, _ in session.batches(images):
        batches.append(pixels)
        labels.append(y)
    labels = torch.cat(labels)
    fp32 = simulate(qmodel, None, batches)
    sim_plan = simulate(qmodel, plan, batches)
    sim_plan_rounding = simulate(qmodel, plan, batches, rounding_seed=seed + 1)

    def stats(logits):
        s = OutputStats()
        s.update(logits, fp32, labels)
        return s.summary()

    def per_image(a, b):
        return top1_agreement(a, b).double().numpy()

    def band(tool_logits, sim, sim_rounding) -> dict:
        gap = paired_bootstrap(per_image(tool_logits, sim), per_image(sim_rounding, sim))
        return {"gap_pp": round(100 * gap["mean"], 2), "gap_lo_pp": round(100 * gap["lo"], 2),
                "gap_hi_pp": round(100 * gap["hi"], 2), "holds": bool(gap["hi"] >= 0)}

    n_int8 = len(plan.int8_sites(session.sites))
    s = stats(sim_plan)
    rows = [{"variant": "fp32", "tool": "reference", "runtime": "torch", **_acc(stats(fp32))},
            {"variant": "vitq simulation of the plan", "tool": "vitq", "runtime": "torch (fake-quant)",
             "int8_sites_plan": n_int8, **_acc(s), "sim_agreement": 100.0,
             "sim_self_rounding": round(100 * per_image(sim_plan_rounding, sim_plan).mean(), 2)}]
    timed = [Variant("fp32", "reference", "onnxruntime", OrtRunner(ctx.fp32_onnx(), threads), accuracy=False)]
    details = {}
    for tool in tools:
        row = {"variant": tool, "tool": tool}
        try:
            target = get_target(tool)
            target.require()
            export = target.export(ctx)
            export.write(out / "targets")
            applied = target.apply(export, ctx, out / tool.replace("-", "_"))
            run = runner(applied, threads, compile_torch)
            effective = effective_config(plan, export)
            logits = torch.cat([run(p) for p in batches])
            sim_eff = simulate(qmodel, effective, batches)
            sim_eff_rounding = simulate(qmodel, effective, batches, rounding_seed=seed + 1)
            told = {r.site for r in export.rows if r.action == "quantize"}
            measured = set(applied.int8_sites)
            row.update({"runtime": applied.runtime, "int8_sites_plan": n_int8, "int8_sites_told": len(told),
                        "int8_sites_measured": len(measured), "no_counterpart": len(export.unmatched()),
                        **_acc(stats(logits)),
                        "sim_agreement": round(100 * per_image(logits, sim_plan).mean(), 2),
                        "sim_as_carried_agreement": round(100 * per_image(logits, sim_eff).mean(), 2),
                        "sim_as_carried_self_rounding": round(100 * per_image(sim_eff_rounding, sim_eff).mean(), 2),
                        "sim_as_carried_kl": _acc(stats(sim_eff))["kl"],
                        "quantize_s": round(applied.quantize_s, 1)})
            b_plan = band(logits, sim_plan, sim_plan_rounding)
            b_eff = band(logits, sim_eff, sim_eff_rounding)
            row.update({f"b_plan_{k}": v for k, v in b_plan.items()})
            row.update({f"b_carried_{k}": v for k, v in b_eff.items()})
            details[tool] = {"export": export.to_dict(), "told_not_measured": sorted(told - measured),
                             "measured_not_told": sorted(measured - told), "applied": applied.detail,
                             "as_carried_float_sites": effective.float_sites}
            timed.append(Variant(tool, tool, applied.runtime, run))
        except Exception as e:  # a tool that cannot be installed or run: its exact error
            row.update({"error": error_line(e)})
            details[tool] = {"error": error_line(e), "traceback": traceback.format_exc()}
        print(json.dumps(row), flush=True)
        rows.append(row)
    speed = measure_speed(timed, batches[0], rounds, 2, 3)
    for v in timed:
        for r in rows:
            if r["variant"] == v.name and r.get("runtime") == v.runtime:
                r.update({"b8_ms": round(speed[key(v)]["b8_ms"], 1), "b8_img_s": round(speed[key(v)]["b8_img_s"], 1)})
    rows.append({"variant": "fp32", "tool": "reference", "runtime": "onnxruntime",
                 "b8_ms": round(speed[key(timed[0])]["b8_ms"], 1), "b8_img_s": round(speed[key(timed[0])]["b8_img_s"], 1)})
    meta = {**session.describe(), "plan": str(plan_path), "val_images": len(fp32), "calibration_images":
            sum(len(b) for b in ctx.calibration), "threads": threads, "rounds": rounds, "tools": tools,
            "versions": _versions(), "load_avg_start": round(load_start, 2), "load_avg_end": round(os.getloadavg()[0], 2),
            "wall_s": round(time.time() - t_start, 1), "details": details}
    pd.DataFrame(rows).to_csv(out / "crosscheck.csv", index=False)
    atomic_write_text(out / "crosscheck.json", json.dumps({"meta": meta, "rows": rows}, indent=2, default=str) + "\n")
    atomic_write_text(out / "crosscheck.md", markdown(rows, meta) + "\n")
    return rows, meta


def _acc(summary: dict) -> dict:
    return {"images": summary["images"], "top1": round(summary["top1"], 2), "agreement": round(summary["agreement"], 2),
            "kl": summary["kl"]}


# module -> its distribution (the version where the module has no __version__)
PACKAGES = {"torch": "torch", "onnxruntime": "onnxruntime", "openvino": "openvino", "nncf": "nncf", "torchao": "torchao",
            "modelopt": "nvidia-modelopt", "ai_edge_quantizer": "ai-edge-quantizer", "litert_torch": "litert-torch",
            "ai_edge_litert": "ai-edge-litert"}


def _versions() -> dict:
    import importlib
    import importlib.metadata
    out = {}
    for name, dist in PACKAGES.items():
        try:
            module = importlib.import_module(name)
            out[name] = getattr(module, "__version__", None) or importlib.metadata.version(dist)
        except Exception as e:  # noqa: BLE001 - a missing tool is reported, not fatal
            out[name] = f"absent ({error_line(e)})"
    return out


def markdown(rows: list[dict], meta: dict) -> str:
    def f(r, k, fmt="{}"):
        v = r.get(k)
        return "-" if v is None or (isinstance(v, float) and v != v) else fmt.format(v)
    head = (f"{meta['val_images']} val images, {meta['calibration_images']} calibration images, {meta['threads']} "
            f"thread(s); {', '.join(f'{k} {v}' for k, v in meta['versions'].items())}; load average "
            f"{meta['load_avg_start']} at start, {meta['load_avg_end']} at end; {meta['wall_s']} s wall")
    lines = [head, "",
             "| variant (runtime) | int8 sites: plan / told / in its result | top-1 % | agree FP32 % | KL vs FP32 "
             "| agree sim (plan) % | agree sim (as carried) % | sim self (rounding) % | (b) gap pp [95 % CI] | (b) "
             "| ms b8 | img/s b8 | error |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        sites = (f"{f(r, 'int8_sites_plan')} / {f(r, 'int8_sites_told')} / {f(r, 'int8_sites_measured')}"
                 if r.get("int8_sites_told") is not None else f(r, "int8_sites_plan"))
        gap = (f"{r['b_carried_gap_pp']:+.2f} [{r['b_carried_gap_lo_pp']:+.2f}, {r['b_carried_gap_hi_pp']:+.2f}]"
               if "b_carried_gap_pp" in r else "-")
        holds = "-" if "b_carried_holds" not in r else ("holds" if r["b_carried_holds"] else "fails")
        self_agree = r.get("sim_as_carried_self_rounding", r.get("sim_self_rounding"))
        lines.append(f"| {r['variant']} ({f(r, 'runtime')}) | {sites} | {f(r, 'top1', '{:.2f}')} "
                     f"| {f(r, 'agreement', '{:.2f}')} | {f(r, 'kl', '{:.4f}')} | {f(r, 'sim_agreement', '{:.2f}')} "
                     f"| {f(r, 'sim_as_carried_agreement', '{:.2f}')} | {'-' if self_agree is None else self_agree} "
                     f"| {gap} | {holds} | {f(r, 'b8_ms', '{:.1f}')} | {f(r, 'b8_img_s', '{:.1f}')} "
                     f"| {r.get('error', '')} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--probe", choices=sorted(PROBES), default="fmnist",
                    help="fmnist, in1k (the shared DINOv2 probes) or tiny (the embedded default)")
    ap.add_argument("--plan", type=Path, help="plan YAML (default: the probe's docs/configs/*_plan.yaml)")
    ap.add_argument("--tools", default=",".join(TOOLS), help=f"comma-separated export targets (default {','.join(TOOLS)})")
    ap.add_argument("--calib", type=int, default=256)
    ap.add_argument("--limit", type=int, default=256, help="val images")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=3, help="interleaved timing rounds")
    ap.add_argument("--no-compile", dest="compile_torch", action="store_false",
                    help="run torchao's converted model eagerly (no torch.compile: Q/DQ in float, slow)")
    ap.add_argument("--out", type=Path, help="default out/crosscheck/<probe>")
    args = ap.parse_args(argv)
    model, data, default_plan = PROBES[args.probe]
    plan = args.plan or default_plan
    if plan is None:
        ap.error("--plan is needed for --probe tiny")
    if model is not None and not (model.is_dir() and data.is_dir()):
        print(f"crosscheck: skipped: {model} or {data} is absent (the shared probes live in ../shared)")
        return 0
    rows, meta = crosscheck(model=str(model) if model else None, data=str(data) if data else None, plan_path=plan,
                            out=args.out or ROOT / "out" / "crosscheck" / args.probe, tools=args.tools.split(","),
                            calib=args.calib, limit=args.limit, seed=args.seed, threads=args.threads,
                            rounds=args.rounds, compile_torch=args.compile_torch)
    print(markdown(rows, meta))
    return 0


if __name__ == "__main__":
    sys.exit(main())
