"""Error and agreement metrics between a float reference and its quantized version."""

from __future__ import annotations

import math

import numpy as np
import torch


def sqnr_of_sums(signal: float, noise: float) -> float:
    """SQNR in dB from summed powers, 10*log10(signal / noise): +inf when nothing was
    lost, -inf when there was no signal. Every SQNR vitq reports comes from here (a
    ratio of sums over all values, never a mean of per-batch dB values)."""
    if noise == 0:
        return math.inf
    if signal == 0:
        return -math.inf
    return 10.0 * math.log10(signal / noise)


def sqnr_db(reference: torch.Tensor, approx: torch.Tensor) -> float:
    """10*log10(sum(ref^2) / sum((ref - approx)^2)); +inf when nothing was lost."""
    ref = reference.detach().double()
    return sqnr_of_sums(float(ref.pow(2).sum()), float((ref - approx.detach().double()).pow(2).sum()))


def cosine(reference: torch.Tensor, approx: torch.Tensor) -> float:
    a, b = reference.detach().double().reshape(-1), approx.detach().double().reshape(-1)
    denom = a.norm() * b.norm()
    return float((a @ b) / denom) if denom > 0 else float(torch.equal(a, b))


def mse(reference: torch.Tensor, approx: torch.Tensor) -> float:
    return float((reference.detach().double() - approx.detach().double()).pow(2).mean())


def relative_l2(reference: torch.Tensor, approx: torch.Tensor) -> float:
    ref = reference.detach().double()
    norm = ref.norm()
    diff = (ref - approx.detach().double()).norm()
    return float(diff / norm) if norm > 0 else float(diff)


def topk_correct(logits: torch.Tensor, labels: torch.Tensor, k: int) -> torch.Tensor:
    """Boolean per image: is the label among the k highest logits?"""
    k = min(k, logits.shape[-1])
    return (logits.topk(k, dim=-1).indices == labels[:, None]).any(dim=-1)


def top1_agreement(reference_logits: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """Boolean per image: same top-1 class as the reference."""
    return reference_logits.argmax(-1) == logits.argmax(-1)


def kl_divergence(reference_logits: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """KL(softmax(ref) || softmax(q)) per image, in nats."""
    p_log = torch.log_softmax(reference_logits.double(), -1)
    q_log = torch.log_softmax(logits.double(), -1)
    return (p_log.exp() * (p_log - q_log)).sum(-1)


# -- the one accumulator -------------------------------------------------------------
PER_IMAGE = ("top1", "top5", "agree", "kl", "mse", "signal", "noise")


class OutputStats:
    """Per-image fidelity of one configuration's logits against the FP32 reference
    logits of the same images, plus top-1/top-5 against labels.

    Every analysis measures through this class, so top-1, agreement, KL and logit
    SQNR are computed one way. Per-image values are kept (not only means) because
    the planner needs them for paired noise estimates (:func:`paired_bootstrap`).
    Logit SQNR is computed from summed signal and noise powers (a ratio of sums, not
    a mean of per-image dB values).
    """

    def __init__(self, values: dict[str, list[float]] | None = None) -> None:
        self.values = {k: list((values or {}).get(k, [])) for k in PER_IMAGE}

    @classmethod
    def of(cls, logits: torch.Tensor, reference: torch.Tensor, labels: torch.Tensor | None = None) -> "OutputStats":
        stats = cls()
        stats.update(logits, reference, labels)
        return stats

    def update(self, logits: torch.Tensor, reference: torch.Tensor, labels: torch.Tensor | None = None) -> None:
        logits, reference = logits.detach().double().cpu(), reference.detach().double().cpu()
        n = len(logits)
        diff2 = (reference - logits).pow(2)
        if labels is None:
            nan = [float("nan")] * n
            top1, top5 = nan, nan
        else:
            labels = labels.cpu()
            top1 = topk_correct(logits, labels, 1).double().tolist()
            top5 = topk_correct(logits, labels, 5).double().tolist()
        new = {"top1": top1, "top5": top5, "agree": top1_agreement(reference, logits).double().tolist(),
               "kl": kl_divergence(reference, logits).tolist(), "mse": diff2.mean(-1).tolist(),
               "signal": reference.pow(2).sum(-1).tolist(), "noise": diff2.sum(-1).tolist()}
        for k, v in new.items():
            self.values[k].extend(float(x) for x in v)

    def extend(self, other: "OutputStats") -> "OutputStats":
        for k in PER_IMAGE:
            self.values[k].extend(other.values[k])
        return self

    def __len__(self) -> int:
        return len(self.values["kl"])

    def head(self, n: int) -> "OutputStats":
        """The first ``n`` images' values (a measurement stopped early covers a prefix)."""
        return OutputStats({k: v[:n] for k, v in self.values.items()})

    def array(self, key: str) -> np.ndarray:
        """Per-image values of ``key`` (one of PER_IMAGE), float64."""
        return np.asarray(self.values[key], dtype=np.float64)

    def summary(self, fp32: "OutputStats | None" = None) -> dict[str, float]:
        """images; top-1/top-5 (%) against labels; with ``fp32`` (the FP32 run on the same
        images) their drops (:func:`drops`); top-1 agreement with FP32 (%); mean
        KL(FP32 || config) (nats); mean logit MSE; logit SQNR (dB, inf = identical)."""
        n = len(self)
        if n == 0:
            raise ValueError("no image was measured")
        out = {"images": n, "top1": 100 * float(self.array("top1").mean()),
               "top5": 100 * float(self.array("top5").mean())}
        if fp32 is not None:
            out.update(drops(out, fp32.summary()))
        return {**out, "agreement": 100 * float(self.array("agree").mean()), "kl": float(self.array("kl").mean()),
                "logit_mse": float(self.array("mse").mean()),
                "logit_sqnr_db": sqnr_of_sums(float(self.array("signal").sum()), float(self.array("noise").sum()))}

    def standard_errors(self, fp32: "OutputStats") -> dict[str, float]:
        """Standard errors of the mean of the per-image values: top-1 drop against ``fp32``
        on the same images (paired; pp), agreement (pp) and KL."""
        if len(fp32) != len(self):
            raise ValueError(f"standard errors need the FP32 run on the same images ({len(fp32)} vs {len(self)})")
        return {"top1_drop_se": 100 * _standard_error(fp32.array("top1") - self.array("top1")),
                "agreement_se": 100 * _standard_error(self.array("agree")), "kl_se": _standard_error(self.array("kl"))}

    def to_dict(self) -> dict[str, list[float]]:
        return {k: list(v) for k, v in self.values.items()}

    @classmethod
    def from_dict(cls, data: dict[str, list[float]]) -> "OutputStats":
        return cls(data)


def drops(summary: dict, fp32: dict) -> dict[str, float]:
    """Top-1 and top-5 drop (pp) of a summary against the FP32 summary of the same images:
    the one place a drop is computed (eval, sensitivity and planner rows)."""
    return {"top1_drop": fp32["top1"] - summary["top1"], "top5_drop": fp32["top5"] - summary["top5"]}


def _standard_error(values: np.ndarray) -> float:
    """Standard error of the mean of per-image values (0 for fewer than 2 images)."""
    return float(values.std(ddof=1) / len(values) ** 0.5) if len(values) > 1 else 0.0


def paired_bootstrap(a: np.ndarray, b: np.ndarray, *, n_boot: int = 2000, seed: int = 0,
                     level: float = 0.95) -> dict[str, float]:
    """Mean of the paired per-image difference ``a - b``, its bootstrap standard error
    and a percentile confidence interval (images resampled with replacement, seeded).

    Two configurations measured on the same images differ by less than their noise
    when the interval contains 0: the planner keeps a change only when it does not.
    """
    d = np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)
    if d.ndim != 1 or len(d) == 0:
        raise ValueError("paired_bootstrap needs two equally long, non-empty 1-D arrays")
    rng = np.random.default_rng(seed)
    means = np.empty(n_boot)
    for start in range(0, n_boot, 256):  # chunks keep memory at 256 x n
        stop = min(n_boot, start + 256)
        means[start:stop] = d[rng.integers(0, len(d), size=(stop - start, len(d)))].mean(1)
    tail = (1 - level) / 2
    return {"mean": float(d.mean()), "se": float(means.std(ddof=1)), "lo": float(np.quantile(means, tail)),
            "hi": float(np.quantile(means, 1 - tail))}

