"""Error analyzer: where quantization noise enters a model and how it grows.

For every activation tensor (each non-weight :class:`TensorQuantizer`) it measures

- the *isolated* error: this tensor alone fake-quantized with its own calibrated
  parameters, against its float value (what quantizing it costs locally, also for
  the sites the config keeps float);
- the *accumulated* error: the value the model quantized under the config passes
  on at this tensor, against the float model's value for the same images (what
  the network has lost by then, upstream noise included);
- outlier statistics of the float tensor: max|x|, high percentiles of |x|,
  kurtosis, and a per-(token, channel) running max that names outlier channels
  and the tokens carrying them, and how many bits of an int8 range they waste.

For every weight it compares per-tensor and per-channel quantization.

Everything streams over batches with constant memory: errors keep sufficient
statistics (so the final numbers equal those of the concatenated tensors), and
the float and quantized passes run segment by segment (embedding, each block,
head), so only one block's float tensors are alive at a time.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np
import pandas as pd
import torch
from tqdm import tqdm

from quant.config import QuantConfig
from quant.model import QuantModel, TensorQuantizer
from quant.modes import SiteError
from quant.observers import activation_qparams, weight_qparams
from quant.quantizer import QParams, fake_quantize
from quant.sites import Site
from quant.store import atomic_torch_save, atomic_write

from . import artifacts
from .metrics import sqnr_db, sqnr_of_sums

ERROR_METRICS = ("sqnr_db", "cosine", "mse", "rel_l2")
ACTIVATION_COLUMNS = (
    "tensor", "site", "slot", "kind", "block", "role", "int8",
    *(f"isolated_{m}" for m in ERROR_METRICS), *(f"acc_{m}" for m in ERROR_METRICS),
    "max_abs", "p99", "p99_9", "p99_99", "max_over_p99_9", "kurtosis",
    "n_outlier_channels", "outlier_channels", "outlier_tokens", "bits_lost", "same_tensor_as",
)
WEIGHT_COLUMNS = ("site", "kind", "block", "role", "w_min", "w_max",
                  "per_tensor_sqnr_db", "per_channel_sqnr_db", "per_channel_gain_db")
# Integer columns that may hold "none": object dtype keeps ints as ints and None as
# null in both CSV and JSON (pandas' Int64 would put pd.NA into the JSON).
_NULLABLE_INT_COLUMNS = ("block", "n_outlier_channels")

_FLOAT_PASS, _QUANT_PASS = "float", "quant"
Segment = Callable[[torch.Tensor], torch.Tensor]


# -- streaming statistics --------------------------------------------------------
@dataclass
class ErrorSums:
    """Sufficient statistics of (reference, approximation) pairs.

    Summed in float64 batch by batch, they give SQNR, cosine, MSE and relative L2
    of the concatenated tensors (averaging per-batch dB values would not). The
    formulas are those of :mod:`analysis.metrics`, rewritten on sums.
    """

    signal: float = 0.0  # sum ref^2
    noise: float = 0.0  # sum (ref - approx)^2
    dot: float = 0.0  # sum ref * approx
    approx: float = 0.0  # sum approx^2
    count: int = 0

    def update(self, reference: torch.Tensor, approx: torch.Tensor) -> None:
        ref, app = reference.detach().double(), approx.detach().double()
        self.signal += float(ref.pow(2).sum())
        self.noise += float((ref - app).pow(2).sum())
        self.dot += float((ref * app).sum())
        self.approx += float(app.pow(2).sum())
        self.count += ref.numel()

    def metrics(self) -> dict[str, float]:
        if self.count == 0:
            return dict.fromkeys(ERROR_METRICS, math.nan)
        if self.noise == 0:
            cos = 1.0
        else:
            denom = math.sqrt(self.signal) * math.sqrt(self.approx)
            cos = self.dot / denom if denom > 0 else 0.0
        rel = math.sqrt(self.noise / self.signal) if self.signal > 0 else math.sqrt(self.noise)
        return {"sqnr_db": sqnr_of_sums(self.signal, self.noise), "cosine": cos, "mse": self.noise / self.count,
                "rel_l2": rel}


@dataclass
class Moments:
    """Count, mean and central moment sums M2..M4, merged batch by batch with the
    pairwise update of Pébay (2008): raw power sums would cancel catastrophically
    on tensors whose mean is large against their spread."""

    n: int = 0
    mean: float = 0.0
    m2: float = 0.0
    m3: float = 0.0
    m4: float = 0.0

    def update(self, x: torch.Tensor) -> None:
        x = x.detach().double().reshape(-1)
        nb = x.numel()
        if nb == 0:
            return
        mb = float(x.mean())
        d = x - mb
        d2 = d * d
        m2b, m3b, m4b = float(d2.sum()), float((d2 * d).sum()), float((d2 * d2).sum())
        na, n = self.n, self.n + nb
        delta = mb - self.mean
        self.m4 += (m4b + delta**4 * na * nb * (na * na - na * nb + nb * nb) / n**3
                    + 6 * delta**2 * (na * na * m2b + nb * nb * self.m2) / n**2
                    + 4 * delta * (na * m3b - nb * self.m3) / n)
        self.m3 += m3b + delta**3 * na * nb * (na - nb) / n**2 + 3 * delta * (na * m2b - nb * self.m2) / n
        self.m2 += m2b + delta**2 * na * nb / n
        self.mean += delta * nb / n
        self.n = n

    @property
    def kurtosis(self) -> float:
        """Pearson kurtosis (a normal distribution gives 3)."""
        return self.n * self.m4 / self.m2**2 if self.m2 > 0 else math.nan


class AbsHistogram:
    """Histogram of |x| on fixed log2-spaced bins (128 per octave over 2^-40..2^40).

    Fixed edges need no re-binning as the max grows, and log spacing gives every
    quantile the same ~0.5% relative resolution whether it sits near the bulk or far
    out in the tail (a linear histogram spanning an outlier max would put p99 of
    the bulk in a handful of bins). Values below 2^-40 count as zero.
    """

    LOW, HIGH, PER_OCTAVE = -40, 40, 128

    def __init__(self) -> None:
        self.bins = (self.HIGH - self.LOW) * self.PER_OCTAVE
        self.counts = torch.zeros(self.bins + 1, dtype=torch.float64)  # bin 0: zeros

    def update(self, absx: torch.Tensor) -> None:
        pos = (torch.log2(absx.detach().float().reshape(-1)) - self.LOW) * self.PER_OCTAVE
        idx = pos.floor().clamp(-1, self.bins - 1).long() + 1
        self.counts += torch.bincount(idx, minlength=self.bins + 1).double().cpu()

    def quantile(self, q: float, max_abs: float) -> float:
        """The q-quantile of |x|, interpolated geometrically inside its bin, capped at max|x|."""
        total = float(self.counts.sum())
        if total == 0:
            return math.nan
        cdf = torch.cumsum(self.counts, 0) / total
        i = min(int(torch.searchsorted(cdf, torch.tensor([q], dtype=torch.float64))[0]), self.bins)
        if i == 0:
            return 0.0
        prev = float(cdf[i - 1])
        frac = (q - prev) / (float(cdf[i]) - prev) if float(cdf[i]) > prev else 1.0
        return min(2.0 ** (self.LOW + (i - 1 + frac) / self.PER_OCTAVE), max_abs)


def channel_view(tq: TensorQuantizer, x: torch.Tensor) -> torch.Tensor | None:
    """``x`` as (batch, tokens, channels), or None for tensors without channels.

    Attention q/k/v (B, H, T, D) become (B, T, H*D); a head input (B, C) is one
    token. Attention probabilities and the conv input (pixels) have no channels in
    the sense of the residual stream, so they get no channel statistics.
    """
    if tq.site.kind in ("conv", "softmax") or tq.slot == "probs":
        return None
    if x.dim() == 4:
        b, h, t, d = x.shape
        return x.transpose(1, 2).reshape(b, t, h * d)
    if x.dim() == 2:
        return x.unsqueeze(1)
    return x if x.dim() == 3 else None


class OutlierStats:
    """Streaming outlier statistics of one float tensor."""

    def __init__(self) -> None:
        self.moments = Moments()
        self.hist = AbsHistogram()
        self.max_abs = 0.0
        self.token_channel_max: torch.Tensor | None = None  # (T, C) running max of |x|

    def update(self, tq: TensorQuantizer, x: torch.Tensor) -> None:
        absx = x.detach().abs()
        self.max_abs = max(self.max_abs, float(absx.max())) if absx.numel() else self.max_abs
        self.moments.update(x)
        self.hist.update(absx)
        view = channel_view(tq, absx)
        if view is not None:
            tc = view.amax(0).float().cpu()
            prev = self.token_channel_max
            self.token_channel_max = tc if prev is None else torch.maximum(prev, tc)

    def summary(self, outlier_k: float) -> tuple[dict[str, Any], np.ndarray | None]:
        """Row values, and the per-channel max (None without channel statistics)."""
        p99, p99_9, p99_99 = (self.hist.quantile(q, self.max_abs) for q in (0.99, 0.999, 0.9999))
        row = {"max_abs": self.max_abs, "p99": p99, "p99_9": p99_9, "p99_99": p99_99,
               "max_over_p99_9": _ratio(self.max_abs, p99_9), "kurtosis": self.moments.kurtosis}
        if self.token_channel_max is None:
            row.update(n_outlier_channels=None, outlier_channels="", outlier_tokens="", bits_lost=math.nan)
            return row, None
        channel_max = self.token_channel_max.amax(0).numpy()
        row.update(channel_outliers(self.token_channel_max.numpy(), outlier_k))
        return row, channel_max


def _ratio(a: float, b: float) -> float:
    if b > 0:
        return a / b
    return math.inf if a > 0 else math.nan


# The reference a channel's max is compared with: the 90th percentile of the channel
# maxima. Not the median: in a sparse activation (a GELU output, most channels
# rarely firing) the median channel max is small and k x median flags dozens of
# ordinary channels; the 90th percentile is still the bulk when a few channels carry
# the outliers (DINOv2's residual channels 278 and 324).
OUTLIER_REFERENCE_QUANTILE = 0.9


def outlier_threshold(channel_max: np.ndarray, outlier_k: float) -> float:
    """``outlier_k`` x the 90th-percentile channel max (see OUTLIER_REFERENCE_QUANTILE)."""
    if channel_max.size == 0:
        return 0.0
    return outlier_k * float(np.quantile(np.asarray(channel_max, dtype=np.float64), OUTLIER_REFERENCE_QUANTILE))


def channel_outliers(token_channel_max: np.ndarray, outlier_k: float) -> dict[str, Any]:
    """Outlier channels of a (T, C) max|x| matrix and what they cost.

    A channel is an outlier when its max exceeds :func:`outlier_threshold` (none when
    the reference is 0: it would flag every non-zero channel). Its tokens are the
    positions where an outlier channel exceeds that threshold ("all" when every token
    does). ``bits_lost`` = log2(max|x| / max of the other channels): the part of a
    per-tensor int8 range that only the outliers use.
    """
    channel_max = token_channel_max.max(0).astype(np.float64)
    threshold = outlier_threshold(channel_max, outlier_k)
    channels = np.flatnonzero(channel_max > threshold) if threshold > 0 else np.array([], dtype=int)
    tokens = np.flatnonzero((token_channel_max[:, channels] > threshold).any(1)) if channels.size else channels
    rest = np.delete(channel_max, channels)
    bits_lost = math.log2(channel_max.max() / rest.max()) if channels.size else 0.0
    every_token = channels.size and tokens.size == token_channel_max.shape[0] and token_channel_max.shape[0] > 1
    return {"n_outlier_channels": int(channels.size), "outlier_channels": _join(channels),
            "outlier_tokens": "all" if every_token else _join(tokens), "bits_lost": bits_lost}


def _join(indices: np.ndarray) -> str:
    return ";".join(str(int(i)) for i in indices)


# -- the analyzer ------------------------------------------------------------------
class _TensorRecord:
    """Everything the analyzer accumulates for one activation tensor."""

    def __init__(self, tq: TensorQuantizer, isolated_qparams: QParams) -> None:
        self.tq = tq
        self.isolated_qparams = isolated_qparams
        self.isolated = ErrorSums()
        self.accumulated = ErrorSums()
        self.outliers = OutlierStats()

    def observe_float(self, x: torch.Tensor) -> None:
        self.isolated.update(x, fake_quantize(x, self.isolated_qparams))
        self.outliers.update(self.tq, x)


class _Analyzer:
    """One tap on every activation tensor; what it does depends on the pass.

    Float pass: keep the tensor (for the quantized pass of the same segment), add
    it to the isolated error and the outlier statistics. Quantized pass: compare
    the value passed on with the kept float tensor, then drop it.
    """

    def __init__(self, qmodel: QuantModel, config: QuantConfig) -> None:
        self.qmodel = qmodel
        self.records = {tq.name: _TensorRecord(tq, _isolated_qparams(tq, config))
                        for tq in qmodel.tensor_quantizers() if not tq.is_weight}
        self.snapshots = {_FLOAT_PASS: qmodel.prepare(None), _QUANT_PASS: qmodel.prepare(config)}
        self.phase = _FLOAT_PASS
        self.float_values: dict[str, torch.Tensor] = {}
        # tensor -> the tensor it is: a quantizer whose input is another one's output
        # object (fc2's input is the GELU output) sees the same tensor; listed once
        self.same_tensor_as: dict[str, str] = {}
        self._owner: dict[int, str] = {}

    def tap(self, tq: TensorQuantizer, x: torch.Tensor, out: torch.Tensor) -> None:
        record = self.records[tq.name]
        if self.phase == _FLOAT_PASS:
            first = self._owner.get(id(x))
            if first is not None and first != tq.name and torch.equal(self.float_values[first], out):
                self.same_tensor_as.setdefault(tq.name, first)
            self._owner.setdefault(id(out), tq.name)
            self.float_values[tq.name] = out
            record.observe_float(out)
        else:
            record.accumulated.update(self.float_values.pop(tq.name), out)

    def state(self) -> dict[str, tuple]:
        """The accumulated statistics (what a checkpoint must keep)."""
        return {name: (r.isolated, r.accumulated, r.outliers) for name, r in self.records.items()}

    def load_state(self, state: dict[str, tuple]) -> None:
        for name, (isolated, accumulated, outliers) in state.items():
            record = self.records[name]
            record.isolated, record.accumulated, record.outliers = isolated, accumulated, outliers

    def run_batch(self, pixels: torch.Tensor) -> None:
        """Both passes, segment after segment; each pass starts from its own hidden
        state, so the quantized pass is exactly the quantized model's forward."""
        reference = approx = pixels
        with torch.inference_mode():
            for segment in _segments(self.qmodel):
                reference = self._pass(_FLOAT_PASS, segment, reference)
                approx = self._pass(_QUANT_PASS, segment, approx)
                if self.float_values:
                    raise RuntimeError(f"tensors seen only in the float pass: {sorted(self.float_values)}")

    def _pass(self, phase: str, segment: Segment, hidden: torch.Tensor) -> torch.Tensor:
        self._owner.clear()  # ids are only unique while float_values holds the tensors
        self.qmodel.restore(self.snapshots[phase])
        self.phase = phase
        return segment(hidden)


def _isolated_qparams(tq: TensorQuantizer, config: QuantConfig) -> QParams:
    if tq.stats.count == 0:
        raise SiteError(f"site {tq.name}: no calibration data; run calibration first")
    # the slot's spec under its format; a slot its format keeps float (a weight-only
    # format's input) is measured at the config's own spec, as float sites are
    spec = config.slot_specs(tq.site)[tq.slot] or config.spec_for(tq.site, "activation", tq.slot)
    return activation_qparams(tq.stats, spec)


def _segments(qmodel: QuantModel) -> list[Segment]:
    """Embedding, each block, head: chained, they are ``QuantModel.__call__``."""
    blocks = [lambda h, b=b: qmodel.run_blocks(h, b, b + 1) for b in range(qmodel.num_blocks)]
    return [qmodel.embed, *blocks, qmodel.head]


def _site_columns(site: Site) -> dict[str, Any]:
    return {"site": site.name, "path": site.path, "kind": site.kind, "block": site.block, "role": site.role}


def _activation_table(analyzer: _Analyzer, config: QuantConfig,
                      outlier_k: float) -> tuple[pd.DataFrame, dict[str, np.ndarray]]:
    rows, channel_max = [], {}
    for name, record in analyzer.records.items():  # sites in execution order, then slots
        site = record.tq.site
        outliers, cmax = record.outliers.summary(outlier_k)
        rows.append({"tensor": name, **_site_columns(site), "slot": record.tq.slot,
                     "int8": not config.is_float(site),
                     **{f"isolated_{k}": v for k, v in record.isolated.metrics().items()},
                     **{f"acc_{k}": v for k, v in record.accumulated.metrics().items()},
                     **outliers, "same_tensor_as": analyzer.same_tensor_as.get(name, "")})
        if cmax is not None:
            channel_max[name] = cmax
    return _frame(rows, ACTIVATION_COLUMNS), channel_max


def weight_errors(qmodel: QuantModel, config: QuantConfig) -> pd.DataFrame:
    """Per-tensor vs per-channel SQNR of every weight under the config's weight spec, in
    the site's format (observer, bits, signedness kept; only the granularity changes,
    group size dropped)."""
    rows = []
    for site in qmodel.sites:
        if not site.has_weight():
            continue
        w = qmodel.model.get_submodule(site.path).weight.detach().float()
        spec = config.slot_specs(site)["weight"] or config.spec_for(site, "weight")
        per_tensor, per_channel = (
            sqnr_db(w, fake_quantize(w, weight_qparams(w, replace(spec, per_channel=pc, group_size=None))))
            for pc in (False, True))
        rows.append({**_site_columns(site), "w_min": float(w.min()), "w_max": float(w.max()),
                     "per_tensor_sqnr_db": per_tensor, "per_channel_sqnr_db": per_channel,
                     "per_channel_gain_db": per_channel - per_tensor})
    return _frame(rows, WEIGHT_COLUMNS)


def _frame(rows: list[dict[str, Any]], columns: tuple[str, ...]) -> pd.DataFrame:
    df = pd.DataFrame(rows, columns=list(columns))
    for col in _NULLABLE_INT_COLUMNS:
        if col in df:
            df[col] = pd.Series([r[col] for r in rows], dtype=object, index=df.index)
    return df


# -- public API ----------------------------------------------------------------------
@dataclass
class ErrorReport:
    """The analyzer's tables; ``channel_max`` maps a tensor name to its per-channel max|x|."""

    activations: pd.DataFrame
    weights: pd.DataFrame
    channel_max: dict[str, np.ndarray]
    meta: dict[str, Any] = field(default_factory=dict)

    def save(self, out_dir: str | Path, run: dict[str, Any]) -> list[Path]:
        """errors_activations/weights .csv + .json (+ .run.json: ``run``) and
        errors_channels.npz, each atomically, as the artefact schema declares them."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        paths = [*artifacts.write(out, artifacts.ERRORS_ACTIVATIONS, self.activations, self.meta, run),
                 *artifacts.write(out, artifacts.ERRORS_WEIGHTS, self.weights, self.meta, run)]
        npz = out / artifacts.ERRORS_CHANNELS
        atomic_write(npz, lambda f: np.savez(f, **self.channel_max))
        return [*paths, npz]


def analyze_errors(qmodel: QuantModel, config: QuantConfig, batches: Iterable[torch.Tensor], *,
                   outlier_k: float = 6.0, progress: bool = True, total: int | None = None,
                   checkpoint: Path | None = None) -> ErrorReport:
    """Isolated and accumulated error, outlier statistics and weight granularity gain
    of a calibrated ``qmodel`` under ``config`` (see the module docstring).

    ``batches`` yields pixel tensors; ``total`` (batches) only sizes the progress bar.
    The model is left all-float (``qmodel.apply(None)``) with its taps removed.
    """
    analyzer, seen, n_batches = None, 0, 0
    try:
        analyzer = _Analyzer(qmodel, config)
        if checkpoint is not None and checkpoint.is_file():
            saved = torch.load(checkpoint, weights_only=False)
            analyzer.load_state(saved["state"])
            analyzer.same_tensor_as.update(saved.get("same_tensor_as", {}))
            seen, n_batches = saved["seen"], saved["batches"]
            print(f"resuming: {n_batches} batches ({seen} images) already analysed ({checkpoint})")
        for record in analyzer.records.values():
            record.tq.taps.append(analyzer.tap)
        if total is None and hasattr(batches, "__len__"):
            total = len(batches)  # type: ignore[arg-type]
        for i, pixels in enumerate(tqdm(batches, total=total, desc="errors", unit="batch", disable=not progress)):
            if i < n_batches:  # done by the interrupted run (batches come in a fixed order)
                continue
            analyzer.run_batch(pixels)
            seen, n_batches = seen + len(pixels), n_batches + 1
            if checkpoint is not None:
                atomic_torch_save(checkpoint, {"state": analyzer.state(), "seen": seen, "batches": n_batches,
                                               "same_tensor_as": analyzer.same_tensor_as})
    finally:
        if analyzer is not None:
            for record in analyzer.records.values():
                if analyzer.tap in record.tq.taps:
                    record.tq.taps.remove(analyzer.tap)
        qmodel.apply(None)
    if seen == 0:
        raise ValueError("error analysis saw no images")
    activations, channel_max = _activation_table(analyzer, config, outlier_k)
    meta = {"config": config.to_dict(), "images": seen, "batches": n_batches, "outlier_k": outlier_k}
    return ErrorReport(activations, weight_errors(qmodel, config), channel_max, meta)
