"""Error and agreement metrics between a float reference and its quantized version."""

from __future__ import annotations

import torch


def sqnr_db(reference: torch.Tensor, approx: torch.Tensor) -> float:
    """10*log10(sum(ref^2) / sum((ref - approx)^2)); +inf when nothing was lost."""
    ref = reference.detach().double()
    noise = (ref - approx.detach().double()).pow(2).sum()
    if noise == 0:
        return float("inf")
    return float(10.0 * torch.log10(ref.pow(2).sum() / noise))


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


def output_metrics(logits: torch.Tensor, reference: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """Top-1/top-5 (%) against labels, top-1 agreement (%), mean KL (nats) and logit SQNR
    (dB) against the FP32 reference logits of the same images."""
    return {
        "top1": float(100 * topk_correct(logits, labels, 1).double().mean()),
        "top5": float(100 * topk_correct(logits, labels, 5).double().mean()),
        "agreement": float(100 * top1_agreement(reference, logits).double().mean()),
        "kl": float(kl_divergence(reference, logits).mean()),
        "logit_sqnr_db": sqnr_db(reference, logits),
    }
