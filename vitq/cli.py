"""The ``vitq`` command line."""

from __future__ import annotations

import argparse
import os
import sys
import time
import warnings

from collections.abc import Mapping
from pathlib import Path

from analysis.names import GROUPS, MEASURE_TOP, MODES, RANK_METRICS, TAYLOR_IMAGES
from quant.names import PRESETS


def _import_command_modules() -> None:
    """Bind what the commands use (torch, transformers, pandas, matplotlib behind them) as
    module globals. main() calls it after parsing, so `vitq --help` and usage errors don't
    wait seconds for these imports."""
    global pd, yaml, ConfigError, QuantConfig, render_report, SiteError, preset, Budget, most_sensitive_fc
    global DataError, run_errors, run_eval, run_plan, run_sensitivity, save_eval, ModelLoadError, Options, Session
    global USER_ERRORS, artifacts, PlanOptions, run_taylor, REFERENCES, parse_formats
    global analyze_session, eval_configs, evaluate_session, sites_table

    import pandas as pd
    import yaml

    from quant.config import ConfigError, QuantConfig
    from reports.html import render_report
    from quant.modes import SiteError
    from quant.presets import preset
    from analysis.planner import REFERENCES, Budget
    from analysis.sensitivity import most_sensitive_fc
    from analysis import artifacts
    from analysis.format_moves import parse_formats

    from .data import DataError
    from .pipeline import PlanOptions, run_errors, run_eval, run_plan, run_sensitivity, run_taylor, save_eval
    from .models import ModelLoadError
    from .session import DeviceError, Options, Session
    from .api import analyze_session, eval_configs, evaluate_session, sites_table

    USER_ERRORS = (DataError, ModelLoadError, ConfigError, SiteError, DeviceError, ShardError)


def _common(p: argparse.ArgumentParser, data: bool = True) -> None:
    p.add_argument("--model", help="HF model folder or hub id, or torchvision:vit_b_16 (vit_b_32, vit_l_16, ...) "
                                   "or timm:ARCH (vit_base_patch16_224, deit_small_patch16_224, "
                                   "swin_tiny_patch4_window7_224, ...) with --weights (default: the embedded tiny ViT)")
    p.add_argument("--weights", help="weights file for --model torchvision:NAME (.pth, as torchvision downloads it) "
                                     "or timm:ARCH (model.safetensors of timm/ARCH on the hub, or a .pth)")
    if data:
        p.add_argument("--data", help="folder with train/ and val/ class folders (default: embedded sample)")
        p.add_argument("--calib", type=int, default=256, help="calibration images from train/ (default 256)")
        p.add_argument("--limit", type=int, help="evaluate at most this many val images (seeded sample)")
        p.add_argument("--batch-size", type=int, default=32)
        p.add_argument("--workers", type=int, help="DataLoader workers of the first decode (default: automatic)")
        p.add_argument("--decode-cache", help="folder of the decoded-crop cache shared by every stage and rerun "
                                              "(default $VITQ_DECODE_CACHE or ~/.cache/vitq/decoded; 'none': decode every time)")
        p.add_argument("--max-bad", type=float, default=0.001,
                       help="fail if more than this fraction of images is unreadable (default 0.001)")
        p.add_argument("--out", help="output folder (default out/<model-name>)")
    p.add_argument("--seed", type=int, default=0)
    _device_args(p)
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    p.add_argument("--debug", action="store_true", help="show tracebacks")


def _device_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="auto",
                   help="auto (CUDA when available, default), cpu, cuda or cuda:N: model, quantizers and caches "
                        "follow it")
    p.add_argument("--tf32", action="store_true", help="allow TF32 matmuls on CUDA (default: off, FP32 stays FP32)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vitq", description="Post-training INT8 quantization of ViTs.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("sites", help="list the quantization sites of a model")
    _common(p, data=False)
    p.add_argument("--format", choices=("table", "csv", "json"), default="table")

    p = sub.add_parser("eval", help="accuracy of FP32 and quantized configs")
    _common(p)
    p.add_argument("--preset", default="all,mixed_1,mixed_2",
                   help=f"comma-separated presets among {', '.join(PRESETS)} (FP32 is always included)")
    p.add_argument("--config", action="append", default=[], help="a QuantConfig YAML/JSON to evaluate too")
    p.add_argument("--mixed-2-float", help="comma-separated sites mixed_2 keeps float (default: fc2 of blocks 4,5)")
    p.add_argument("--mixed-2-from", help="a sensitivity CSV (per site): mixed_2 keeps its two most sensitive fc float")
    p.add_argument("--backend", choices=("torch", "onnxruntime", "torch-int8"), default="torch",
                   help="torch: fake-quant simulation; onnxruntime: real int8 ONNX Runtime run of each config; "
                        "torch-int8: torch.export + torchao PT2E (X86InductorQuantizer) + torch.compile, "
                        "conv/linear sites only (configs with other int8 kinds are refused)")

    p = sub.add_parser("sensitivity", help="per-site / per-group sensitivity ranking")
    _common(p)
    p.add_argument("--mode", choices=MODES, default="only",
                   help="only: quantize one candidate at a time; all-but: everything except one")
    p.add_argument("--group", choices=GROUPS, default="op", help="one site, one block or one kind per candidate")
    p.add_argument("--eval-images", type=int, default=256, help="val images measured (seeded sample, default 256)")
    p.add_argument("--config", help="QuantConfig giving int8 specs and the all-but background (default: preset all)")
    p.add_argument("--rank-by", choices=RANK_METRICS, default="kl",
                   help="ranking metric (default kl: smooth and per image; the top-1 drop is shown beside it)")
    p.add_argument("--worst", type=int, default=10, help="print this many top-ranked candidates")
    p.add_argument("--method", choices=("measured", "taylor"), default="measured",
                   help="measured: one pass per candidate; taylor: a Fisher/Taylor estimate of every candidate's "
                        "only-KL from a few forward+backward passes (--mode only)")
    p.add_argument("--probes", type=int, default=8, help="taylor: Fisher eigen-probes (backward passes) per image")
    p.add_argument("--formats", help="taylor: estimate every candidate in each of these formats (e.g. "
                                     "int8,a16w8,w4a8; one pass serves them all; a format column)")
    p.add_argument("--shard", metavar="I/N",
                   help="measure only candidates I, I+N, I+2N, ... (0 <= I < N) into a shard log, so N processes "
                        "split the run; 'auto': torchrun's RANK/WORLD_SIZE, on cuda:LOCAL_RANK. The next run "
                        "without --shard merges the shard logs and writes the table")

    p = sub.add_parser("errors", help="SQNR/cosine per activation and weight, outlier statistics")
    _common(p)
    p.add_argument("--images", type=int, default=64, help="val images analysed (seeded sample, default 64)")
    p.add_argument("--config", help="QuantConfig for the accumulated error (default: preset all)")
    p.add_argument("--outlier-k", type=float, default=6.0,
                   help="a channel is an outlier if its max |x| exceeds k x the 90th-percentile channel max")
    p.add_argument("--worst", type=int, default=10, help="print this many worst tensors")

    p = sub.add_parser("plan", help="mixed-precision plan within an accuracy budget")
    _common(p)
    _plan_args(p)

    p = sub.add_parser("report", help="render out/<model>/report.html from the artefacts in an output folder")
    p.add_argument("--out", required=True, help="output folder written by the other commands")
    p.add_argument("--title", help="report title")
    _device_args(p)  # accepted for uniformity: the report only reads files
    p.add_argument("--debug", action="store_true", help="show tracebacks")

    p = sub.add_parser("analyze", help="everything: sensitivity, errors, plan, accuracy table, HTML report")
    _common(p)
    _plan_args(p)
    p.add_argument("--error-images", type=int, default=64, help="val images for the error analyzer")
    p.add_argument("--bench", action="store_true",
                   help="also time FP32 and the presets/plan in ONNX Runtime (int8) on this CPU -> speed.csv and "
                        "the report's speed table (minutes on a real model; off by default)")

    p = sub.add_parser("export", help="int8 ONNX model (QuantizeLinear/DequantizeLinear) of a config")
    _common(p)
    p.add_argument("--config", help="QuantConfig YAML/JSON to export (default: preset all)")
    p.add_argument("--preset", choices=[n for n in PRESETS if n != "fp32"], help="export a preset instead")
    p.add_argument("--opset", type=int, default=18, help="ONNX opset (>= 18, the dynamo exporter's; default 18)")
    p.add_argument("--format", choices=("onnx", "pt2e"), default="onnx",
                   help="onnx: Q/DQ ONNX (dynamo exporter); pt2e: torchao PT2E-converted torch.export program "
                        "(model_int8.pt2; conv/linear sites only)")
    p.add_argument("--to", metavar="TOOL",
                   help="write the config in a deployment tool's own terms instead, names resolved against the "
                        "tool's graph of this model: ort-quantizer, nncf, torchao (-> OUT/targets/TOOL.json and .py)")
    return parser


def _plan_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="QuantConfig to start from (default: preset all)")
    p.add_argument("--max-drop", type=float, help="top-1 drop vs FP32 allowed, pp")
    p.add_argument("--min-agreement", type=float, help="top-1 agreement with FP32 required, %%")
    p.add_argument("--max-kl", type=float, help="mean KL(FP32 || plan) allowed, nats")
    p.add_argument("--no-beat-presets", action="store_true",
                   help="do not also require the plan to beat every reference preset at no higher cost (the default "
                        "budget when no other is given)")
    p.add_argument("--eval-images", type=int, default=256,
                   help="val images sensitivity and the plan search are measured on (default 256)")
    p.add_argument("--confirm-images", type=int,
                   help="other val images the plan is confirmed on (default: as many as --eval-images; 0: none)")
    p.add_argument("--objective", choices=("kl", "logit_mse"), default="kl", help="search objective (default kl)")
    p.add_argument("--cost", choices=("auto", "latency", "macs", "bitops", "size"), default="auto",
                   help="what a float site costs: its latency measured once with ONNX Runtime on this machine (sites "
                        "whose slowdown is not measurable cost nothing; with --formats, each site group also timed in "
                        "each listed format), or its share of matmul MACs (+0.5 per residual "
                        "add); bitops: BitOps in %% of all's (MACs x weight bits x activation bits, float at 32 bits); "
                        "size: Linear/Conv weight MB; auto (default): bitops when --formats go beyond int8 and float, "
                        "else latency where onnx/onnxruntime/onnxscript are installed, else macs")
    p.add_argument("--latency-threads", type=int, default=None,
                   help="with --cost latency: ONNX Runtime intra-op threads the latency table is timed with "
                        "(default: ONNX Runtime's own, every core; 1 is steadier on a machine shared with other jobs)")
    p.add_argument("--formats", help="the formats the planner chooses between per site, e.g. int8,a16w8,float "
                                     "(default: int8 or float); any of quant/formats/: int8, a16w8, w4a8, w8, w4, fp8, float")
    p.add_argument("--max-bitops", type=float,
                   help="cost cap: BitOps at most this fraction of the all preset's (e.g. 1.05)")
    p.add_argument("--max-weight-mb", type=float, help="cost cap: Linear/Conv weights at most this many MB")
    p.add_argument("--max-steps", type=int, default=12, help="float fallbacks measured per search path (default 12)")
    p.add_argument("--no-early-stop", action="store_true",
                   help="measure every move on all plan images (default: a move stops after 64, 128, ... images once "
                        "the chance that it passes its paired test is below 2 %%)")
    p.add_argument("--worst-sites", type=int, default=3, help="worst sites offered per-site observer remedies")
    p.add_argument("--measure-top", type=int, default=None,
                   help="measure the only-sensitivity of this many candidates, in the order of the taylor estimate "
                        f"(the rest keep their estimate; default {MEASURE_TOP}; 0: measure all)")
    p.add_argument("--measure-top-format", type=int, default=None,
                   help="with --formats: per format beyond int8 and float, measure the only-sensitivity of this many "
                        "candidates in that format, in the order of its taylor estimate (the rest keep their estimate; "
                        "default: a quarter of --measure-top rounded up, 8 by default; 0: measure all)")
    p.add_argument("--taylor-images", type=int, default=TAYLOR_IMAGES,
                   help=f"plan images the taylor estimate orders candidates on (the first ones; default {TAYLOR_IMAGES})")
    p.add_argument("--all-but", action="store_true",
                   help="also measure all-but sensitivity for the gain estimates (one full pass per site: slow)")
    p.add_argument("--decide-images", type=int,
                   help="with an explicit budget: further val images (neither plan nor confirm images) the plan and its "
                        "cheaper frontier neighbours are measured on, in batches, until every budget is decided "
                        "(sequential test; default: every such image; 0: no decide stage)")
    p.add_argument("--decide-backend", choices=("torch", "onnxruntime", "torch-int8"), default="torch",
                   help="what runs the decide stage: torch (the fake-quant simulation, default), onnxruntime (the int8 "
                        "Q/DQ ONNX export) or torch-int8 (PT2E, conv/linear sites only)")


def _options(args: argparse.Namespace) -> Options:
    keys = ("model", "weights", "data", "out", "calib", "limit", "batch_size", "seed", "workers", "max_bad", "device",
            "tf32", "decode_cache")
    return Options(**{k: getattr(args, k) for k in keys if hasattr(args, k)}, progress=not args.no_progress)


def cmd_sites(args: argparse.Namespace) -> None:
    session = Session(_options(args))
    df = sites_table(session)
    if args.format == "csv":
        print(df.to_csv(index=False), end="")
    elif args.format == "json":
        print(df.to_json(orient="records", indent=2))
    else:
        print(df.to_string(index=False))
        print(f"\n{len(df)} sites in {session.qmodel.num_blocks} blocks "
              f"({df['kind'].value_counts().to_dict()}); family {session.qmodel.family.name}. Configs take the "
              f"canonical name or the path, or globs of either")


def format_table(df: pd.DataFrame) -> str:
    cols = {"config": "config", "images": "images", "top1": "top-1 %", "top5": "top-5 %",
            "top1_drop": "drop pp", "agreement": "agree %", "kl": "KL", "logit_sqnr_db": "SQNR dB",
            "int8_sites": "int8 sites"}
    view = df[list(cols)].rename(columns=cols)
    return view.to_string(index=False, float_format=lambda v: f"{v:.2f}" if abs(v) >= 0.01 or v == 0 else f"{v:.2e}")


def cmd_eval(args: argparse.Namespace) -> None:
    names = [n.strip() for n in args.preset.split(",") if n.strip()]
    for n in names:
        if n not in PRESETS:
            raise ConfigError(f"unknown preset {n!r}; presets are {', '.join(PRESETS)}")
    session = Session(_options(args))
    mixed_2 = args.mixed_2_float.split(",") if args.mixed_2_float else None
    if args.mixed_2_from:
        mixed_2 = most_sensitive_fc(_read_table(args.mixed_2_from))
    configs = eval_configs(session, names, args.config, mixed_2)
    result = evaluate_session(session, configs, limit=args.limit, backend=args.backend)
    df, (csv_path, json_path) = result.table, result.paths
    print(format_table(df))
    if result.backend_line:
        print(result.backend_line)
    if session.bad:
        print(f"skipped {len(session.bad)} unreadable image(s); see {json_path}")
    print(f"wrote {csv_path} and {json_path}")


def _read_table(path: str) -> pd.DataFrame:
    try:
        return pd.read_csv(path)
    except (OSError, pd.errors.ParserError) as e:
        raise ConfigError(f"cannot read table {path}: {e}") from None


def _start_config(args: argparse.Namespace, session: Session) -> QuantConfig:
    config = QuantConfig.load(args.config) if args.config else preset("all", session.sites)
    config.validate(session.sites)
    return config


def _fmt(v: float) -> str:
    return f"{v:.3g}"


class ShardError(ValueError):
    """A --shard value that names no shard."""


def parse_shard(text: str | None, env: Mapping[str, str] | None = None) -> tuple[int, int] | None:
    """``--shard``: ``I/N`` -> (I, N); ``auto`` -> (RANK, WORLD_SIZE) as torchrun sets them
    (``env``, default os.environ), so one torchrun command line serves every process;
    None -> None (unsharded)."""
    if text is None:
        return None
    env = os.environ if env is None else env
    if text.strip().lower() == "auto":
        if "RANK" not in env or "WORLD_SIZE" not in env:
            raise ShardError("--shard auto: RANK and WORLD_SIZE are not set (launch with torchrun, or give I/N)")
        index, count = _env_integer(env["RANK"]), _env_integer(env["WORLD_SIZE"])
        if index is None or count is None or not 0 <= index < count:
            raise ShardError(f"--shard auto: RANK={env['RANK']!r}, WORLD_SIZE={env['WORLD_SIZE']!r} (torchrun's): "
                             "expected integers with 0 <= RANK < WORLD_SIZE")
        return index, count
    problem = ShardError(f"--shard {text}: expected I/N with 0 <= I < N, e.g. 0/4")
    try:
        index, count = (int(x) for x in text.split("/"))
    except ValueError:  # not two integers
        raise problem from None
    if not 0 <= index < count:
        raise problem
    return index, count


def _env_integer(value: str) -> int | None:
    """An environment variable's integer, None when it holds none."""
    try:
        return int(value)
    except ValueError:
        return None


def _shard_device(args: argparse.Namespace, env: Mapping[str, str] | None = None) -> None:
    """Under torchrun (``--shard auto``), process LOCAL_RANK takes GPU LOCAL_RANK of its node
    when --device is auto or cuda and CUDA is there; a LOCAL_RANK that names no visible GPU
    is a user error."""
    env = os.environ if env is None else env
    if args.shard and args.shard.strip().lower() == "auto" and "LOCAL_RANK" in env \
            and args.device.strip().lower() in ("auto", "cuda"):
        import torch

        if torch.cuda.is_available():
            local, count = _env_integer(env["LOCAL_RANK"]), torch.cuda.device_count()
            if local is None or not 0 <= local < count:
                raise ShardError(f"--shard auto: LOCAL_RANK={env['LOCAL_RANK']!r} (torchrun's): expected a GPU index "
                                 f"0..{count - 1} ({count} CUDA device(s) visible: at most {count} processes per node)")
            args.device = f"cuda:{local}"


def cmd_sensitivity(args: argparse.Namespace) -> None:
    if args.method == "taylor" and args.mode != "only":
        raise ConfigError("--method taylor estimates --mode only; measure all-but with --method measured")
    shard = parse_shard(args.shard)
    if shard is not None and args.method == "taylor":
        raise ConfigError("--shard splits the measured candidates; --method taylor is one estimate of them all")
    formats = _sensitivity_formats(args)
    _shard_device(args)
    session = Session(_options(args))
    config = _start_config(args, session)
    session.calibrate()
    if args.method == "taylor":
        df, meta, run, paths = run_taylor(session, config, group=args.group, images=args.eval_images,
                                          probes=args.probes, formats=formats)
        if formats is None:
            cols = ["rank", "candidate", "kind", "block", "kl_estimate"]
            print(df[cols].head(args.worst).to_string(index=False, float_format=_fmt))
        else:  # site x format
            view = df.pivot(index="candidate", columns="format", values="kl_estimate")
            view = view[list(dict.fromkeys(df["format"]))].reindex(df["candidate"].drop_duplicates())
            print(view.head(args.worst).to_string(float_format=_fmt))
        print(f"{meta['candidates']} candidates estimated on {meta['images']} images in {run['wall_s']:.0f} s "
              f"({meta['probes']} Fisher probes, {100 * meta['fisher_trace_captured_mean']:.0f} % of its trace)")
        print("wrote " + " and ".join(str(p) for p in paths))
        return
    df, meta, run, paths = run_sensitivity(session, config, mode=args.mode, group=args.group,
                                           images=args.eval_images, rank_by=args.rank_by, shard=shard)
    if shard is not None:
        print(f"shard {meta['shard']}: {meta['candidates']} of {meta['candidates_total']} candidates "
              f"({run['measured_now']} measured now) on {meta['images']} images in {run['wall_s']:.0f} s; "
              f"log {paths[0]}")
        print("run the same command without --shard once every shard is done: it merges the shard logs")
        return
    cols = ["rank", "candidate", "kind", "block", "kl", "top1_drop", "agreement", "logit_sqnr_db"]
    print(df[cols].head(args.worst).to_string(index=False, float_format=_fmt))
    speed = f", {run['speedup_vs_naive']}x faster than naive re-evaluation" if run["speedup_vs_naive"] else ""
    print(f"{meta['candidates']} candidates on {meta['images']} images in {run['wall_s']:.0f} s{speed}")
    print("wrote " + " and ".join(str(p) for p in paths))


def print_errors(report, worst: int) -> None:
    acts = report.activations
    low = acts[acts["int8"]].sort_values("acc_sqnr_db").head(worst)
    print("lowest accumulated SQNR among int8 tensors:")
    print(low[["tensor", "acc_sqnr_db", "isolated_sqnr_db", "max_over_p99_9", "bits_lost"]].to_string(
        index=False, float_format=_fmt))
    once = acts[acts["same_tensor_as"].fillna("") == ""]  # fc2:input is the GELU output: list it once
    outliers = once[once["n_outlier_channels"].fillna(0).astype(int) > 0].sort_values("bits_lost", ascending=False)
    if outliers.empty:
        print(f"\nno tensor carries outlier channels (k={report.meta['outlier_k']} x the 90th-percentile channel max)")
        return
    print(f"\n{len(outliers)} tensors carry outlier channels (k={report.meta['outlier_k']}); most bits lost:")
    view = outliers[["tensor", "n_outlier_channels", "outlier_channels", "outlier_tokens", "bits_lost"]].head(worst)
    view = view.assign(outlier_channels=view["outlier_channels"].map(_short), outlier_tokens=view["outlier_tokens"].map(_short))
    print(view.to_string(index=False, float_format=_fmt))


def _short(text, limit: int = 30) -> str:
    text = "" if pd.isna(text) else str(text)
    return text if len(text) <= limit else text[:limit].rsplit(";", 1)[0] + ";..."


def cmd_errors(args: argparse.Namespace) -> None:
    session = Session(_options(args))
    config = _start_config(args, session)
    session.calibrate()
    report, paths = run_errors(session, config, images=args.images, outlier_k=args.outlier_k)
    print_errors(report, args.worst)
    print("wrote " + ", ".join(str(p) for p in paths))


def _budget(args: argparse.Namespace) -> Budget:
    budget = Budget(args.max_drop, args.min_agreement, args.max_kl, beat_references=not args.no_beat_presets,
                    max_bitops=args.max_bitops, max_weight_mb=args.max_weight_mb)
    for flag, value in (("--max-bitops", args.max_bitops), ("--max-weight-mb", args.max_weight_mb)):
        if value is not None and not value > 0:
            raise ConfigError(f"{flag} {value:g}: give a positive number")
    if not budget.explicit and not budget.beat_references:
        raise SystemExit("vitq: error: --no-beat-presets needs a budget: --max-drop, --min-agreement or --max-kl")
    return budget


def _plan_options(args: argparse.Namespace) -> PlanOptions:
    if args.measure_top_format is not None and args.measure_top_format < 0:
        raise ConfigError(f"--measure-top-format {args.measure_top_format}: give a number of candidates >= 0 (0: all)")
    if args.latency_threads is not None and args.latency_threads < 1:
        raise ConfigError(f"--latency-threads {args.latency_threads}: give a number of threads >= 1")
    if args.decide_images is not None and args.decide_images < 0:
        raise ConfigError(f"--decide-images {args.decide_images}: give a number of images >= 0 (0: no decide stage)")
    if args.decide_images and (args.max_drop, args.min_agreement, args.max_kl) == (None, None, None):
        print("vitq: note: --decide-images decides an explicit budget (--max-drop, --min-agreement, --max-kl); "
              "without one there is no decide stage", file=sys.stderr)
    return PlanOptions(images=args.eval_images, confirm_images=args.confirm_images, objective=args.objective,
                       max_steps=args.max_steps, worst_sites=args.worst_sites, all_but=args.all_but, cost=args.cost,
                       taylor_images=args.taylor_images, decide_images=args.decide_images,
                       decide_backend=args.decide_backend, early_stop=not args.no_early_stop,
                       formats=_formats(args.formats), measure_top_format=args.measure_top_format,
                       latency_threads=args.latency_threads,
                       **({} if args.measure_top is None else {"measure_top": args.measure_top}))


def _sensitivity_formats(args: argparse.Namespace) -> list[str] | None:
    """``vitq sensitivity --formats``: taylor only; at least one format that quantizes."""
    if args.formats is None:
        return None
    if args.method != "taylor":
        raise ConfigError("--formats estimates every format with --method taylor; measured sensitivity is of the "
                          "config's formats (give them in --config)")
    try:
        names = parse_formats(args.formats, minimum=1)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if names == ["float"]:
        raise ConfigError("--formats float: float estimates 0 at every site; give a format that quantizes")
    return names


def _formats(text: str | None) -> list[str] | None:
    """``--formats``: the names, checked (a one-line ConfigError); None without the option."""
    if text is None:
        return None
    try:
        return parse_formats(text)
    except ValueError as e:
        raise ConfigError(str(e)) from None


def print_plan(planner, out: Path | None = None) -> None:
    steps = planner.steps_table()
    cols = ["attempt", "path", "kind", "change", "kl", "agreement", "top1_drop", "float_sites", "int8_macs_share"]
    if planner.cost_kind is not None:  # an exact cost of every format (bitops, size)
        cols.append("cost")
    if planner.budget.explicit:
        cols.append("budget_outcome")
    print(steps[cols].to_string(index=False, float_format=_fmt))
    tried = planner.tried_table()
    print(f"\n{len(tried)} configurations measured, {int(tried['kept'].sum())} kept (reference rows included)")
    decide = None if out is None else artifacts.read(out, artifacts.PLAN_DECIDE)
    if decide is not None and getattr(planner, "decide_images", None) is not None:
        print_decide(decide)
    plan = planner.plan_config
    print("\nfloat skip-list" + (" and formats" if plan.formats else "") + " (copy into a QuantConfig):")
    print(yaml.safe_dump({"float_kinds": plan.float_kinds, "float_sites": plan.float_sites,
                          **({"formats": dict(plan.formats)} if plan.formats else {})}, sort_keys=False))
    print(planner.verdict())


def print_decide(table) -> None:
    """The decide stage's looks and its final decision."""
    m = table.meta
    print(f"\ndecide stage ({m['backend']}): {m['images']} of {m['max_images']} further images measured, "
          f"{m['looks']} looks planned")
    if len(table.rows):
        cols = ["candidate", "attempt", "kind", "look", "images", "estimate", "bound", "outcome", "images_needed"]
        view = table.rows[cols].astype({"images_needed": "Int64"})
        print(view.to_string(index=False, float_format=_fmt))
    for c in m["candidates"]:
        print(f"  {c['name']} (attempt {c['attempt']}): {c['outcome']}")
    chosen = m["chosen"]
    print(f"final: {'; '.join(d['text'] for d in m['decisions'])}"
          + ("" if chosen in (None, "plan") else f" (the plan is now {chosen}, a cheaper frontier point)"))


def cmd_plan(args: argparse.Namespace) -> None:
    budget, opts = _budget(args), _plan_options(args)  # option errors before any long work
    session = Session(_options(args))
    start = _start_config(args, session)
    session.calibrate()
    planner, paths = run_plan(session, start, budget, opts)
    print_plan(planner, session.out)
    print("wrote " + ", ".join(str(p) for p in paths))


def cmd_export(args: argparse.Namespace) -> None:
    from .backends import run_export

    if args.to:
        from .targets import get_target
        get_target(args.to)  # an unknown name fails before any long work
    session = Session(_options(args))
    config = preset(args.preset, session.sites) if args.preset else _start_config(args, session)
    session.calibrate()
    if args.to:
        from .backends import run_export_target
        lines = run_export_target(session, config, args.to, opset=args.opset)
    elif args.format == "pt2e":
        from .backends import run_export_pt2e
        lines = run_export_pt2e(session, config)
    else:
        lines = run_export(session, config, opset=args.opset)
    for line in lines:
        print(line)


def cmd_analyze(args: argparse.Namespace) -> None:
    """The whole pipeline: plan (with both sensitivity modes), errors, accuracy table, report."""
    t0 = time.time()
    budget, opts = _budget(args), _plan_options(args)  # option errors before any long work
    session = Session(_options(args))
    start = _start_config(args, session)
    result = analyze_session(session, start, budget, opts, error_images=args.error_images, limit=args.limit,
                             bench=args.bench)
    print_plan(result.plan.planner, session.out)
    print_errors(result.errors, 5)
    print("\naccuracy on all val images:")
    print(format_table(result.accuracy))
    if result.bench_lines:
        print("\n" + "\n".join(result.bench_lines))
    print(f"\nreport: {result.report}  ({time.time() - t0:.0f} s)")


def cmd_report(args: argparse.Namespace) -> None:
    out = Path(args.out)
    if not out.is_dir():
        raise DataError(f"--out {out}: no such folder")
    print(f"report: {render_report(out, title=args.title)}")


COMMANDS = {"sites": cmd_sites, "eval": cmd_eval, "sensitivity": cmd_sensitivity, "errors": cmd_errors,
            "plan": cmd_plan, "export": cmd_export, "report": cmd_report, "analyze": cmd_analyze}


def _one_line_warning(message, category, filename, lineno, file=None, line=None) -> None:
    print(f"vitq: warning: {message}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _import_command_modules()
    if not args.debug:
        warnings.filterwarnings("ignore", module="transformers")
        warnings.showwarning = _one_line_warning
    try:
        COMMANDS[args.command](args)
    except USER_ERRORS as e:
        if args.debug:
            raise
        print(f"vitq: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\nvitq: interrupted; results written so far are kept, rerun the same command to resume",
              file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
