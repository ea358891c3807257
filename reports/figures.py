"""The report's figures: one function per figure, each returning PNG bytes.

Figures are drawn on a bare :class:`matplotlib.figure.Figure` with the Agg canvas
(no pyplot, no global backend switch, nothing left open) under a fixed style, so
the same tables give byte-identical PNGs: sizes depend only on the data, fonts are
matplotlib's bundled DejaVu Sans, and the PNG carries no timestamp or software tag.
Every axis says its unit; activations are unitless (the model's own scale), which
the labels say as "activation units".
"""

from __future__ import annotations

import base64
import io
import math
import re
from contextlib import contextmanager
from typing import Iterable, Sequence

import matplotlib
import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import LogNorm
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, NullFormatter

DPI = 110
WIDTH = 10.5  # inches; the page shows figures at most ~1100 px wide
STYLE = {
    "font.family": "DejaVu Sans",
    "font.size": 9.5,
    "axes.titlesize": 10.5,
    "axes.titleweight": "bold",
    "axes.labelsize": 9.5,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.grid": True,
    "grid.color": "#e3e6ea",
    "grid.linewidth": 0.8,
    "axes.axisbelow": True,
    "axes.edgecolor": "#8a9099",
    "xtick.color": "#333",
    "ytick.color": "#333",
    "legend.frameon": False,
    "legend.fontsize": 8.5,
    "path.simplify": True,
}
# Colour per site kind (colour-blind friendly, Okabe-Ito plus greys).
KIND_COLORS = {
    "conv": "#000000", "linear": "#0072B2", "matmul_qk": "#E69F00", "softmax": "#CC79A7",
    "matmul_av": "#D55E00", "residual": "#009E73", "layernorm": "#56B4E9", "gelu": "#999999",
    "group": "#6a3d9a",
}
BAD, GOOD, NEUTRAL, ACCENT = "#c0392b", "#2e7d32", "#7f8c8d", "#0072B2"


@contextmanager
def _styled():
    """The fixed style, whatever the user's matplotlibrc says; restored afterwards."""
    with matplotlib.rc_context():
        matplotlib.rcdefaults()
        matplotlib.rcParams.update(STYLE)
        yield


def _figure(height: float, width: float = WIDTH) -> Figure:
    fig = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _png(fig: Figure) -> bytes:
    """PNG bytes without the 'Software' tag (matplotlib writes no timestamp into PNGs)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, metadata={"Software": None}, facecolor="white")
    return buf.getvalue()


def to_base64(png: bytes) -> str:
    return base64.b64encode(png).decode("ascii")


def data_uri(png: bytes) -> str:
    return "data:image/png;base64," + to_base64(png)


_BLOCK_RE = re.compile(r"^(?:.*?\.)?(?:layers?|blocks?)\.(\d+)\.")


def short_name(name: str) -> str:
    """Figure labels (tables keep full names): 'vit.layers.3.attention.k_proj' ->
    'b3 attention.k_proj'; outside blocks the last two parts of the name
    ('vit.embeddings.patch_embeddings.projection' -> 'patch_embeddings.projection')."""
    m = _BLOCK_RE.match(name)
    if m:
        return f"b{m.group(1)} {name[m.end():]}"
    return ".".join(name.split(".")[-2:])


def _floats(values: Iterable) -> np.ndarray:
    """Values as a float array; missing or unparseable ones become NaN."""
    arr = pd.to_numeric(pd.Series(list(values)), errors="coerce").to_numpy(dtype=float)
    return arr


# -- sensitivity -------------------------------------------------------------------
def sensitivity_bars(table: pd.DataFrame, mode: str, *, top: int = 30,
                     baseline_kl: float | None = None) -> bytes:
    """Horizontal bars of the ``top`` highest-ranked candidates, rank 1 at the top.

    Left panel: the accuracy effect in pp (``only``: top-1 drop vs FP32, red = hurts;
    ``all-but``: top-1 gain over the all-int8 baseline, green = helps). Right panel:
    KL(FP32 || candidate) in nats (``all-but``: the baseline's KL dashed: bars left
    of it mean keeping that candidate float brings the model closer to FP32).
    """
    df = table.sort_values("rank").head(top).reset_index(drop=True)
    n = len(df)
    labels = [short_name(str(c)) for c in df["candidate"]]
    y = np.arange(n)
    with _styled():
        fig = _figure(1.25 + 0.24 * max(n, 3))
        ax_acc, ax_kl = fig.subplots(1, 2, sharey=True, width_ratios=[1, 1])
        if mode == "only":
            acc = _floats(df["top1_drop"])
            colors = [BAD if v > 0 else (GOOD if v < 0 else NEUTRAL) for v in np.nan_to_num(acc)]
            ax_acc.set_xlabel("top-1 drop vs FP32 (pp; > 0 = hurts)")
            ax_acc.set_title("accuracy cost of quantizing the candidate alone")
        else:
            acc = _floats(df["top1_gain"] if "top1_gain" in df else -df["top1_drop"])
            colors = [GOOD if v > 0 else (BAD if v < 0 else NEUTRAL) for v in np.nan_to_num(acc)]
            ax_acc.set_xlabel("top-1 gain over all-int8 baseline (pp; > 0 = helps)")
            ax_acc.set_title("accuracy regained by keeping the candidate float")
        ax_acc.barh(y, np.nan_to_num(acc), color=colors, height=0.7)
        ax_acc.axvline(0, color="#555", linewidth=0.8)
        lim = float(np.nanmax(np.abs(acc))) if np.isfinite(acc).any() else 0.0
        ax_acc.set_xlim(-(lim or 1) * 1.15, (lim or 1) * 1.15)
        kl = _floats(df["kl"])
        ref = max(float(np.nanmax(np.abs(kl))) if np.isfinite(kl).any() else 0.0,
                  abs(baseline_kl) if baseline_kl is not None and math.isfinite(baseline_kl) else 0.0)
        exp = math.floor(math.log10(ref)) if 0 < ref < 0.01 else 0
        scale = 10.0 ** exp
        kind_colors = [KIND_COLORS.get(str(k), NEUTRAL) for k in df.get("kind", ["group"] * n)]
        ax_kl.barh(y, np.nan_to_num(kl) / scale, color=kind_colors, height=0.7)
        unit = f"$10^{{{exp}}}$ nats" if exp else "nats"
        ax_kl.set_xlabel(f"KL(FP32 ‖ model) ({unit})")
        ax_kl.set_title("output distance to FP32" + (" (lower = closer)" if mode != "only" else ""))
        if baseline_kl is not None and math.isfinite(baseline_kl):
            ax_kl.axvline(baseline_kl / scale, color="#333", linestyle="--", linewidth=1)
            ax_kl.annotate("all-int8 baseline", (baseline_kl / scale, -0.6), xytext=(-4, 0),
                           textcoords="offset points", fontsize=8, color="#333", va="center", ha="right",
                           annotation_clip=False)
        if not np.nan_to_num(acc).any():
            ax_acc.text(0.5, 0.5, f"no candidate shown changes top-1\non these images (all {n}: 0 pp)",
                        transform=ax_acc.transAxes, ha="center", va="center", color="#555", fontsize=9,
                        bbox={"facecolor": "white", "edgecolor": "#ccc", "boxstyle": "round,pad=0.4"})
        kinds = list(dict.fromkeys(str(k) for k in df.get("kind", [])))
        if kinds:
            from matplotlib.patches import Patch
            fig.legend(handles=[Patch(color=KIND_COLORS.get(k, NEUTRAL), label=k) for k in kinds],
                       loc="outside lower center", ncols=min(len(kinds), 9), title="KL bar colour = site kind",
                       title_fontsize=8.5)
        ax_acc.set_yticks(y, labels, fontsize=8.5)
        ax_acc.set_ylim(n - 0.5, -0.8)
        ax_acc.set_ylabel("candidate (rank 1 at the top)")
        for ax in (ax_acc, ax_kl):
            ax.grid(axis="y", visible=False)
        return _png(fig)


# -- SQNR along depth --------------------------------------------------------------
def _position(block, role: str, num_blocks: int) -> float:
    if block is None or (isinstance(block, float) and math.isnan(block)):
        return -1.0 if role == "patch_embed" else float(num_blocks)
    return float(block)


def depth_positions(acts: pd.DataFrame) -> tuple[np.ndarray, int]:
    blocks = pd.to_numeric(acts["block"], errors="coerce")
    num_blocks = int(blocks.max()) + 1 if blocks.notna().any() else 0
    pos = np.array([_position(None if pd.isna(b) else b, str(r), num_blocks)
                    for b, r in zip(blocks, acts["role"])])
    return pos, num_blocks


def sqnr_depth(acts: pd.DataFrame) -> bytes:
    """Isolated (left) and accumulated (right) SQNR in dB along depth, one line per
    site kind; each point is the kind's worst (lowest) tensor in that block.
    Dashed lines: kinds the config keeps float (their isolated SQNR is what
    quantizing them would cost; their accumulated SQNR is upstream noise only)."""
    pos, num_blocks = depth_positions(acts)
    df = acts.assign(_pos=pos)
    with _styled():
        fig = _figure(4.3)
        axes = fig.subplots(1, 2, sharey=True)
        for ax, col, title in ((axes[0], "isolated_sqnr_db", "isolated: this tensor alone quantized"),
                               (axes[1], "acc_sqnr_db", "accumulated: quantized model vs FP32 here")):
            for kind in dict.fromkeys(df["kind"]):
                sub = df[df["kind"] == kind].copy()
                sub[col] = pd.to_numeric(sub[col], errors="coerce")
                sub = sub[np.isfinite(sub[col])]
                if sub.empty:
                    continue
                worst = sub.groupby("_pos")[col].min().sort_index()
                is_float = not bool(sub["int8"].astype(bool).any())
                ax.plot(worst.index, worst.values, marker="o", markersize=4, linewidth=1.6,
                        linestyle="--" if is_float else "-", color=KIND_COLORS.get(kind, NEUTRAL),
                        label=f"{kind} (float)" if is_float else kind)
            ax.set_title(title)
            ticks = [-1, *range(num_blocks), num_blocks]
            names = ["embed", *(str(b) for b in range(num_blocks)), "head"]
            step = max(1, math.ceil(len(ticks) / 26))
            ax.set_xticks(ticks[::step], names[::step])
        fig.supxlabel("block (depth; embed = patch embedding, head = final norm + classifier)", fontsize=9.5)
        axes[0].set_ylabel("SQNR (dB; higher = less noise)")
        handles, labels = axes[1].get_legend_handles_labels()
        if handles:
            fig.legend(handles, labels, loc="outside right center", title="site kind")
        return _png(fig)


# -- outliers ----------------------------------------------------------------------
def residual_heatmap(rows: Sequence[tuple[str, np.ndarray]]) -> bytes:
    """Per-channel max|x| of the residual-stream tensors, one row per tensor in depth
    order, log colour scale: bright vertical stripes are outlier channels that
    persist through the residual stream."""
    width = max(len(v) for _, v in rows)
    mat = np.full((len(rows), width), np.nan)
    for i, (_, v) in enumerate(rows):
        mat[i, :len(v)] = v
    pos = mat[np.isfinite(mat) & (mat > 0)]
    vmax = float(pos.max()) if pos.size else 1.0
    vmin = max(float(pos.min()) if pos.size else 1e-3, vmax / 1e4)
    with _styled():
        fig = _figure(1.6 + 0.26 * max(len(rows), 4))
        ax = fig.subplots()
        im = ax.imshow(np.where(mat > 0, mat, np.nan), aspect="auto", interpolation="nearest",
                       cmap="magma", norm=LogNorm(vmin=vmin, vmax=vmax))
        ax.set_yticks(range(len(rows)), [short_name(n) for n, _ in rows], fontsize=8.5)
        ax.set_xlabel("channel index (hidden dimension)")
        ax.set_ylabel("residual tensor (depth order)")
        ax.grid(False)
        cb = fig.colorbar(im, ax=ax, pad=0.01)
        plain = FuncFormatter(lambda v, _: f"{v:.3g}")
        cb.ax.yaxis.set_major_formatter(plain)
        cb.ax.yaxis.set_minor_formatter(plain if vmax / vmin < 30 else NullFormatter())
        cb.set_label("max |x| over images and tokens\n(activation units, log scale)")
        return _png(fig)


def channel_maxima(cmax: np.ndarray, threshold: float, tensor: str, outlier_k: float) -> bytes:
    """The worst tensor's per-channel max|x|: by channel (left, log scale) and as a
    histogram over log-spaced bins (right); the dashed line is the outlier
    threshold (k x the 90th-percentile channel max): channels above it are outliers."""
    cmax = np.asarray(cmax, dtype=float)
    positive = cmax[cmax > 0]
    with _styled():
        fig = _figure(3.6)
        ax_ch, ax_hist = fig.subplots(1, 2, width_ratios=[1.6, 1])
        over = cmax > threshold if threshold > 0 else np.zeros_like(cmax, dtype=bool)
        idx = np.arange(len(cmax))
        floor = float(positive.min()) / 2 if positive.size else 1e-6
        ax_ch.vlines(idx[~over], floor, np.maximum(cmax[~over], floor), color=ACCENT, linewidth=1)
        ax_ch.vlines(idx[over], floor, cmax[over], color=BAD, linewidth=1.4, label="outlier channel")
        ax_ch.set_yscale("log")
        ax_ch.set_xlim(-0.5, len(cmax) - 0.5)
        ax_ch.set_xlabel("channel index")
        ax_ch.set_ylabel("max |x| (activation units, log scale)")
        ax_ch.set_title(short_name(tensor))
        if positive.size:
            lo, hi = math.log10(float(positive.min())), math.log10(float(positive.max()))
            if hi - lo < 1e-9:
                lo, hi = lo - 0.5, hi + 0.5
            bins = np.logspace(lo, hi, 41)
            ax_hist.hist(positive, bins=bins, color=ACCENT, edgecolor="white", linewidth=0.4)
            ax_hist.set_xscale("log")
        ax_hist.set_xlabel("max |x| per channel (activation units, log scale)")
        ax_hist.set_ylabel("channels (count)")
        ax_hist.set_title("distribution of channel maxima")
        if threshold > 0:
            for ax in (ax_ch, ax_hist):
                (ax.axhline if ax is ax_ch else ax.axvline)(threshold, color="#333", linestyle="--", linewidth=1.2,
                                                            label=f"threshold = {outlier_k:g} × p90 = {threshold:.3g}")
        ax_ch.legend(loc="upper right")
        if threshold > 0:
            ax_hist.legend(loc="upper right")
        return _png(fig)


def _layer_label(block, role) -> str:
    b = pd.to_numeric(pd.Series([block]), errors="coerce").iloc[0]
    return str(role) if pd.isna(b) else f"b{int(b)} {role}"


# -- weights -----------------------------------------------------------------------
def weight_ranges(weights: pd.DataFrame) -> bytes:
    """Per layer in execution order: SQNR of int8 weights per tensor vs per output
    channel (top, dB) and the float weight range [min, max] (bottom)."""
    df = weights.reset_index(drop=True)
    x = np.arange(len(df))
    pos, num_blocks = depth_positions(df)
    with _styled():
        fig = _figure(5.6)
        ax_s, ax_r = fig.subplots(2, 1, sharex=True, height_ratios=[1.3, 1])
        pt, pc = _floats(df["per_tensor_sqnr_db"]), _floats(df["per_channel_sqnr_db"])
        ax_s.vlines(x, pt, pc, color="#c9ced6", linewidth=2)
        ax_s.plot(x, pt, "o", color=NEUTRAL, markersize=5, label="per-tensor scale")
        ax_s.plot(x, pc, "o", color=ACCENT, markersize=5, label="per-channel scales")
        ax_s.set_ylabel("weight SQNR (dB)")
        ax_s.set_title("int8 weight SQNR: the grey stem is the per-channel gain", loc="left")
        ax_s.legend(loc="lower right", bbox_to_anchor=(1.0, 1.0), ncols=2, borderaxespad=0.2)
        wmin, wmax = _floats(df["w_min"]), _floats(df["w_max"])
        ax_r.vlines(x, wmin, wmax, color=[KIND_COLORS.get(str(k), NEUTRAL) for k in df["kind"]], linewidth=4)
        ax_r.axhline(0, color="#555", linewidth=0.7)
        ax_r.set_ylabel("weight value range\n[min, max] (weight units)")
        ax_r.set_title("float weight range per layer (colour = site kind)", loc="left")
        # Ticks: the first layer of every block (labels by name when there are few layers).
        if len(df) <= 30:
            ax_r.set_xticks(x, [_layer_label(b, r) for b, r in zip(df["block"], df["role"])], rotation=90,
                            fontsize=8)
        else:  # many layers: one label per block, at its centre, and a faint line between blocks
            spans: dict[float, list[int]] = {}
            for i, p in enumerate(pos):
                spans.setdefault(p, []).append(i)
            names = {-1.0: "embed", float(num_blocks): "head"}
            ax_r.set_xticks([(min(v) + max(v)) / 2 for v in spans.values()],
                            [names.get(p, f"b{int(p)}") for p in spans], fontsize=8)
            ax_r.tick_params(axis="x", length=0)
            for v in list(spans.values())[1:]:
                for ax in (ax_s, ax_r):
                    ax.axvline(min(v) - 0.5, color="#d5dae0", linewidth=0.8, zorder=0)
            for ax in (ax_s, ax_r):
                ax.grid(axis="x", visible=False)
        ax_r.set_xlabel("layer (execution order)")
        ax_s.set_xlim(-0.7, len(df) - 0.3)
        return _png(fig)


# -- planner -----------------------------------------------------------------------
PATH_COLORS = ("#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9")
OBJECTIVE_LABELS = {"kl": "KL(FP32 ‖ config) (nats, log scale)", "logit_mse": "logit MSE vs FP32 (log scale)"}


def _flags(values: Iterable) -> np.ndarray:
    return np.array([v is True or v in ("True", "true", 1) for v in values], dtype=bool)


def int8_float_best(table: pd.DataFrame | None) -> pd.Series | None:
    """The row a planner over formats marked as its best int8/float-only point (column
    ``int8_float_best``, analysis.artifacts.PLAN_FORMAT_COLUMNS: the rule's outcome on that
    row, empty elsewhere); None when the table has no such row."""
    if table is None or "int8_float_best" not in table:
        return None
    flags = table["int8_float_best"].fillna("").astype(str)
    rows = table[flags != ""]
    return rows.iloc[0] if len(rows) else None


def frontier(steps: pd.DataFrame, tried: pd.DataFrame | None = None, *, objective: str = "kl",
             max_objective: float | None = None, cost: str = "macs", cost_unit: str | None = None) -> bytes:
    """The planner's search as cost (x: the planner's ``cost`` column, in ``cost_unit``
    when given, else % of matmul MACs kept float plus the per-site charge, or the
    latency added for ``cost="latency"``) against the objective (y, log scale).

    ``tried`` (every attempt): faint grey points. ``steps`` (kept points): one line per
    search path in attempt order, frontier points circled, reference presets as
    labelled diamonds, the plan as a star, the best int8/float-only point of a search over
    formats (:func:`int8_float_best`) as an open square. Points with objective <= 0 (FP32) cannot
    sit on a log axis and are left out. Every legend entry is an artist drawn here.
    """
    def xy(df: pd.DataFrame) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        x, y = _floats(df["cost"]), _floats(df[objective])
        return x, y, np.isfinite(x) & np.isfinite(y) & (y > 0)

    with _styled():
        fig = _figure(4.8)
        ax = fig.subplots()
        if tried is not None and len(tried) and {"cost", objective} <= set(tried):
            x, y, ok = xy(tried)
            if ok.any():
                ax.scatter(x[ok], y[ok], s=22, color="#aab1ba", alpha=0.55, linewidths=0, zorder=1,
                           label=f"every measured attempt ({int(ok.sum())})")
        paths = [p for p in dict.fromkeys(steps["path"]) if p != "reference"]
        for i, path in enumerate(paths):
            sub = steps[steps["path"] == path].sort_values("attempt")
            x, y, ok = xy(sub)
            if ok.any():
                ax.plot(x[ok], y[ok], "o-", color=PATH_COLORS[i % len(PATH_COLORS)], markersize=5, linewidth=1.6,
                        zorder=2, label=f"kept points, path from {path}")
        x, y, ok = xy(steps)
        front = ok & _flags(steps["on_frontier"])
        if front.any():
            order = np.argsort(x[front], kind="stable")
            ax.scatter(x[front][order], y[front][order], s=130, facecolors="none", edgecolors="#111",
                       linewidths=1.4, zorder=4, label="frontier (nothing cheaper is closer)")
        refs = ok & (steps["path"] == "reference").to_numpy()
        if refs.any():
            ax.scatter(x[refs], y[refs], marker="D", s=52, color="#4d4d4d", zorder=3, label="reference presets")
            for name, xx, yy in zip(steps["config"][refs], x[refs], y[refs]):
                ax.annotate(str(name), (xx, yy), xytext=(7, -12), textcoords="offset points", fontsize=9,
                            color="#333")
        plan = ok & _flags(steps["plan"])
        if plan.any():
            ax.scatter(x[plan], y[plan], marker="*", s=380, color=BAD, edgecolors="white", linewidths=0.8,
                       zorder=5, label="plan")
        marked = int8_float_best(tried if tried is not None and "int8_float_best" in tried else steps)
        if marked is not None:
            mx, my = float(marked["cost"]), float(marked[objective])
            if math.isfinite(mx) and math.isfinite(my) and my > 0:
                ax.scatter([mx], [my], marker="s", s=110, facecolors="none", edgecolors="#1f5fbf", linewidths=2.0,
                           zorder=6, label=f"best int8/float-only point measured by this search ({marked['int8_float_best']})")
        if max_objective is not None and math.isfinite(max_objective) and max_objective > 0:
            ax.axhline(max_objective, color=BAD, linestyle="--", linewidth=1, zorder=1,
                       label=f"budget: {'KL' if objective == 'kl' else objective} ≤ {max_objective:g}")
        if ok.any() or (tried is not None and len(tried)):
            ax.set_yscale("log")
        ax.set_xlabel(f"cost ({cost_unit}; lower = more int8)" if cost_unit else
                      "cost (% of matmul MACs kept float + a charge per float residual add; lower = more int8)"
                      if cost != "latency" else "cost (% latency added by the float sites, measured with ONNX Runtime)")
        ax.set_ylabel(OBJECTIVE_LABELS.get(objective, f"{objective} (log scale)"))
        ax.set_title("the planner's search: cost against distance to FP32", loc="left")
        handles, labels = ax.get_legend_handles_labels()
        if handles:
            fig.legend(handles, labels, loc="outside lower center", ncols=min(len(handles), 3))
        return _png(fig)


def taylor_ranks(both: pd.DataFrame) -> bytes:
    """The taylor estimate against the measurement for the candidates measured both ways
    (columns candidate, kind, kl_estimate, kl, estimate_rank, measured_rank). Left: rank by
    the estimate (x) against rank by measured KL (y), 1 = most sensitive; on the diagonal
    the estimate orders the candidate exactly. Right: the two KL values, log-log."""
    with _styled():
        fig = _figure(4.4)
        ax_r, ax_v = fig.subplots(1, 2)
        colors = [KIND_COLORS.get(str(k), NEUTRAL) for k in both["kind"]]
        x, y = _floats(both["estimate_rank"]), _floats(both["measured_rank"])
        n = max(len(both), 1)
        ax_r.plot([1, n], [1, n], color=NEUTRAL, linestyle="--", linewidth=1, zorder=1)
        ax_r.scatter(x, y, s=30, c=colors, zorder=2)
        ax_r.set_xlabel("rank by the taylor estimate (1 = most sensitive)")
        ax_r.set_ylabel("rank by measured KL")
        ax_r.invert_xaxis()
        ax_r.invert_yaxis()
        ax_r.set_title("rank: estimate against measurement", loc="left")
        est, meas = _floats(both["kl_estimate"]), _floats(both["kl"])
        ok = np.isfinite(est) & np.isfinite(meas) & (est > 0) & (meas > 0)
        ax_v.scatter(est[ok], meas[ok], s=30, c=[c for c, keep in zip(colors, ok) if keep], zorder=2)
        if ok.any():
            lo, hi = min(est[ok].min(), meas[ok].min()), max(est[ok].max(), meas[ok].max())
            ax_v.plot([lo, hi], [lo, hi], color=NEUTRAL, linestyle="--", linewidth=1, zorder=1)
            ax_v.set_xscale("log")
            ax_v.set_yscale("log")
        ax_v.set_xlabel("KL estimate (nats, log scale)")
        ax_v.set_ylabel("measured KL (nats, log scale)")
        ax_v.set_title("value: estimate against measurement", loc="left")
        kinds = list(dict.fromkeys(str(k) for k in both["kind"]))
        handles = [ax_v.scatter([], [], s=30, color=KIND_COLORS.get(k, NEUTRAL), label=k) for k in kinds]
        if handles:
            fig.legend(handles=handles, loc="outside lower center", ncols=min(len(handles), 6))
        return _png(fig)
