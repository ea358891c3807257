"""Fast sensitivity: estimate every candidate's ``only`` KL to FP32 from a few
forward+backward passes instead of one measured pass per candidate.

Quantizing candidate s alone perturbs the logits by dz ~= J_s e_s (e_s: its
quantization error, J_s: the Jacobian of the logits w.r.t. that tensor). KL(p || q)
has zero gradient at q = p, so its leading term is the Fisher quadratic form of the
softmax, KL ~= 0.5 dz^T F dz with F = diag(p) - p p^T at the FP32 logits (the
second-order Taylor / Fisher estimate behind HAWQ's Hessian-aware sensitivity and
ModelOpt's AutoQuantize scores). Writing F = sum_k u_k u_k^T (u_k = sqrt(l_k) v_k,
its eigenvectors), dz^T F dz = sum_k (u_k . J_s e_s)^2, and u_k . J_s e_s is the
derivative of u_k . z w.r.t. a scalar a_s that scales e_s. So one forward at FP32
with ``x + a_s e_s`` at every quantizer (a = 0 per image: the forward stays exact
FP32) and one backward per probe u_k give every candidate's per-image estimate at
once. Weight errors enter through the layer's output (a_s F.linear(x, e_W)), so the
estimate stays per image. ``probes`` eigenvectors of the largest eigenvalues are
used (the rank of F is at most classes - 1; the captured share of its trace is reported).

Per format (:func:`taylor_format_estimates`, ``vitq ... --formats``): each format's error at
each candidate gets a scalar of its own (``x + sum_f a_{s,f} e_{s,f}``), so the same forward
and the same backward passes give every (candidate, format) estimate.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from typing import Callable, Iterator

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from quant.config import QuantConfig
from quant.formats import get_format
from quant.model import QuantModel
from quant.quantizer import fake_quantize
from quant.sites import Site

from .runner import Runner
from .sensitivity import Candidate, make_candidates

TOP_CLASSES = 64  # F is restricted to the most probable classes (the rest carry ~no probability)


def fisher_probes(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(k, B, C) vectors u with sum_k u u^T the best rank-k part of F = diag(p) - p p^T (per
    image, restricted to the TOP_CLASSES most probable classes), and the share of trace(F)
    they capture per image."""
    p = torch.softmax(logits.double(), -1)
    b, c = p.shape
    m = min(c, TOP_CLASSES)
    top_p, top_i = p.topk(m, dim=-1)
    fisher = torch.diag_embed(top_p) - top_p[:, :, None] * top_p[:, None, :]
    vals, vecs = torch.linalg.eigh(fisher)  # ascending
    k = min(k, m)
    vals, vecs = vals[:, -k:].clamp_min(0), vecs[:, :, -k:]
    u_top = (vecs * vals.sqrt()[:, None, :]).permute(2, 0, 1)  # (k, B, m)
    u = torch.zeros(k, b, c, dtype=torch.float64)
    u.scatter_(2, top_i[None].expand(k, b, m), u_top)
    trace = (p * (1 - p)).sum(-1)
    captured = vals.sum(-1) / trace.clamp_min(1e-300)
    return u.to(logits.dtype), captured


Key = tuple[str, str]  # (candidate name, variant: a format name, or "" for the config's own formats)


def _errors(qmodel: QuantModel, cands: list[Candidate],
            variants: dict[str, Callable[[Site], dict]]) -> tuple[dict[str, list], dict[str, list]]:
    """What each variant's quantization of each candidate perturbs: per activation quantizer
    (``site:slot``) its (key, QParams), per weighted site its (key, weight error), from the
    quantizers' own calibrated ranges (the model is left float)."""
    acts: dict[str, list] = {}
    weights: dict[str, list] = {}
    for label, specs_of in variants.items():
        for cand in cands:
            for site in cand.sites:
                qmodel.quantize_site(site.name, specs_of(site))
                for tq in qmodel.quantizers[site.name].values():
                    if tq.mode != "quant":
                        continue
                    if tq.is_weight:
                        error = (tq._weight_cache - qmodel._weights[site.name]).detach()
                        weights.setdefault(site.name, []).append(((cand.name, label), error))
                    else:
                        acts.setdefault(tq.name, []).append(((cand.name, label), tq.qparams))
                qmodel.float_site(site.name)
    return acts, weights


@contextmanager
def _perturbed(qmodel: QuantModel, acts: dict[str, list], weights: dict[str, list],
               alphas: dict[Key, torch.Tensor]) -> Iterator[None]:
    """Every perturbed quantizer passes ``x + sum_k a_k e_k`` (e_k = the fake-quant error of
    key k's variant, a_k = ``alphas[k]``, one scalar per image); weight errors are added at
    the layer's output. The model must be float (its FP32 state)."""
    handles, touched = [], []

    def scale(a: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        # Swin's window attention and torch's multi-head attention fold windows / heads into
        # the first dimension batch-major ((B * windows, ...)): each image's scalar repeats.
        if not like.dim() or like.shape[0] % a.shape[0]:
            raise RuntimeError(f"a quantized tensor of shape {tuple(like.shape)} is not batch-first")
        if like.shape[0] != a.shape[0]:
            a = a.repeat_interleave(like.shape[0] // a.shape[0])
        return a.view(-1, *([1] * (like.dim() - 1)))

    def activation(tq, x, out):
        with torch.no_grad():
            errors = [(key, fake_quantize(x.detach(), qp) - x.detach()) for key, qp in acts[tq.name]]
        for key, error in errors:
            out = out + scale(alphas[key], x) * error
        return out

    for tq in qmodel.tensor_quantizers():
        if tq.name in acts:
            touched.append(tq)
            tq.perturb = activation
    modules = {id(m.weight): m for m in qmodel.model.modules() if isinstance(getattr(m, "weight", None), torch.Tensor)}
    for name, errors in weights.items():
        module = modules[id(qmodel._weights[name])]

        def hook(mod, args, output, errors=errors):
            x = args[0]
            for key, error in errors:
                if isinstance(mod, nn.Linear):
                    delta = F.linear(x, error)
                elif isinstance(mod, nn.Conv2d):
                    delta = F.conv2d(x, error, None, mod.stride, mod.padding, mod.dilation, mod.groups)
                else:
                    raise TypeError(f"weighted site on a {type(mod).__name__}: only Linear and Conv2d are supported")
                output = output + scale(alphas[key], output) * delta
            return output
        handles.append(module.register_forward_hook(hook))
    try:
        yield
    finally:
        for h in handles:
            h.remove()
        for tq in touched:
            tq.perturb = None


@contextmanager
def _no_parameter_grads(model: nn.Module) -> Iterator[None]:
    flags = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


def taylor_estimates(runner: Runner, config: QuantConfig, *, group: str = "op", probes: int = 8,
                     micro_batch: int | None = None, batched: bool = True, progress: bool = False) -> tuple[dict[str, float], dict]:
    """Candidate name -> estimated mean KL(FP32 || only that candidate int8), nats, over
    ``runner``'s images, and run facts (probes, captured Fisher trace share, wall time).

    ``config`` gives the int8 specs (as ``analyze_sensitivity(mode="only")``: each
    candidate is quantized with ``config.slot_specs`` on an FP32 background; smoothing
    and bias correction are not part of an ``only`` candidate)."""
    estimates, info = _estimate(runner, config, {"": config.slot_specs}, group=group, probes=probes,
                                micro_batch=micro_batch, batched=batched, progress=progress)
    return {cand: v for (cand, _), v in estimates.items()}, info


def taylor_format_estimates(runner: Runner, config: QuantConfig, formats: list[str], *, group: str = "op",
                            probes: int = 8, micro_batch: int | None = None, batched: bool = True,
                            progress: bool = False) -> tuple[dict[Key, float], dict]:
    """(candidate, format) -> estimated mean KL(FP32 || only that candidate in that format),
    nats, for every format of ``formats`` (names of :mod:`quant.formats`), from the same
    forward and backward passes: each format's quantization noise at each site enters the
    forward as its own zero-weighted perturbation, so one backward per probe gives them all.
    A format that keeps a candidate float estimates 0."""
    variants = {name: (lambda site, f=get_format(name): config.slot_specs(site, f)) for name in formats}
    return _estimate(runner, config, variants, group=group, probes=probes, micro_batch=micro_batch,
                     batched=batched, progress=progress)


def _estimate(runner: Runner, config: QuantConfig, variants: dict[str, Callable[[Site], dict]], *, group: str,
              probes: int, micro_batch: int | None, batched: bool, progress: bool) -> tuple[dict[Key, float], dict]:
    """(candidate, variant) -> estimated ``only`` KL (see the module docstring); ``variants``
    maps a label to the slot specs a site takes in it."""
    t0 = time.time()
    qmodel = runner.qmodel
    config.validate(qmodel.sites)
    cands = make_candidates(qmodel.sites, config, group)
    if not cands:
        raise ValueError("no candidate to estimate: the config keeps every site float")
    qmodel.restore(runner.fp32_state)
    keys = [(c.name, label) for label in variants for c in cands]
    if micro_batch is None:  # the vmapped backward holds probes x images gradients: bound their product
        micro_batch = max(2, 16 // max(probes, 1))
    sums = np.zeros(len(keys))
    captured, n = [], 0
    chunks = [p for pixels in runner.batches for p in pixels.split(micro_batch)]
    try:
        acts, weights = _errors(qmodel, cands, variants)
        qmodel.restore(runner.fp32_state)
        with _no_parameter_grads(qmodel.model), torch.enable_grad():
            for pixels in tqdm(chunks, desc="taylor", unit="batch", disable=not progress):
                b = len(pixels)
                alphas = {k: torch.zeros(b, device=qmodel.device, requires_grad=True) for k in keys}
                with _perturbed(qmodel, acts, weights, alphas):
                    logits = qmodel.head(qmodel.run_blocks(qmodel.embed(pixels)))
                u, share = fisher_probes(logits.detach().cpu(), probes)
                u = u.to(logits.device)
                leaves = [alphas[k] for k in keys]
                per_image = torch.zeros(len(keys), b, dtype=torch.float64)
                if batched:  # all probes in one vmapped backward
                    grads = torch.autograd.grad(logits, leaves, grad_outputs=u, is_grads_batched=True,
                                                allow_unused=True)
                    for j, x in enumerate(grads):
                        if x is not None:
                            per_image[j] = x.detach().cpu().double().pow(2).sum(0)
                else:
                    for k in range(len(u)):
                        grads = torch.autograd.grad((logits * u[k]).sum(), leaves, retain_graph=k < len(u) - 1,
                                                    allow_unused=True)
                        for j, x in enumerate(grads):
                            if x is not None:
                                per_image[j] += x.detach().cpu().double().pow(2)
                sums += 0.5 * per_image.sum(1).numpy()
                captured.append(share)
                n += b
    finally:
        qmodel.restore(runner.fp32_state)
    share = torch.cat(captured)
    info = {"probes": int(min(probes, TOP_CLASSES)), "images": n, "wall_s": round(time.time() - t0, 2),
            "fisher_trace_captured_mean": round(float(share.mean()), 4),
            "fisher_trace_captured_min": round(float(share.min()), 4)}
    return {k: float(s / n) for k, s in zip(keys, sums)}, info


def taylor_scores(runner: Runner, config: QuantConfig, *, probes: int = 8) -> dict[str, float]:
    """Site name -> estimated ``only`` KL (nats): the ordering hint for the planner and for
    choosing which candidates to measure (larger = more harmful)."""
    return taylor_estimates(runner, config, group="op", probes=probes)[0]


def taylor_table(runner: Runner, config: QuantConfig, *, group: str = "op", probes: int = 8,
                 formats: list[str] | None = None, progress: bool = True) -> tuple[pd.DataFrame, dict, dict]:
    """The ranked estimate table (most harmful first), its meta and run info. With
    ``formats``: one row per (candidate, format), a ``format`` column, ranked within each
    format, the formats in the order given (``float`` is left out: it estimates 0)."""
    cands = {c.name: c for c in make_candidates(runner.qmodel.sites, config, group)}
    if formats is None:
        estimates, info = taylor_estimates(runner, config, group=group, probes=probes, progress=progress)
        df = _ranked(pd.DataFrame([{"candidate": name, **cands[name].describe(), "kl_estimate": v}
                                   for name, v in estimates.items()]))
    else:
        formats = [f for f in dict.fromkeys(formats) if not get_format(f).is_float]
        if not formats:
            raise ValueError("no format to estimate: float alone estimates 0")
        by_key, info = taylor_format_estimates(runner, config, formats, group=group, probes=probes, progress=progress)
        rows = [{"candidate": name, "format": fmt, **cands[name].describe(), "kl_estimate": v}
                for (name, fmt), v in by_key.items()]
        df = pd.concat([_ranked(pd.DataFrame([r for r in rows if r["format"] == f])) for f in formats],
                       ignore_index=True)
    meta = {"method": "taylor", "group": group, "images": info["images"], "candidates": len(cands),
            "probes": info["probes"], "fisher_trace_captured_mean": info["fisher_trace_captured_mean"],
            "fisher_trace_captured_min": info["fisher_trace_captured_min"]}
    return df, meta, {"wall_s": info["wall_s"]}


def _ranked(df: pd.DataFrame) -> pd.DataFrame:
    df = df.sort_values("kl_estimate", ascending=False, kind="stable").reset_index(drop=True)
    df.insert(0, "rank", range(1, len(df) + 1))
    df["block"] = df["block"].astype("Int64")
    return df


def format_rows(table: pd.DataFrame, fmt: str = "int8") -> pd.DataFrame:
    """The rows of one format of a taylor table (a table without a ``format`` column, written
    for the config's own formats, is returned whole)."""
    if "format" not in table:
        return table
    return table[table["format"] == fmt].reset_index(drop=True)


def rank_agreement(estimate: dict[str, float] | pd.Series, measured: pd.DataFrame, metric: str = "kl",
                   top: int = 10, within: int = 15) -> dict[str, float]:
    """Spearman rho between an estimate and a measured ``only`` table over their common
    candidates, and how many of the measured top ``top`` are in the estimate's top ``within``."""
    est = pd.Series(estimate, dtype=float)
    meas = measured.set_index("candidate")[metric].astype(float)
    common = est.index.intersection(meas.index)
    if len(common) < 3:
        raise ValueError("fewer than 3 candidates in common")
    est, meas = est[common], meas[common]
    rho = float(est.rank().corr(meas.rank()))
    top_meas = set(meas.sort_values(ascending=False).index[:top])
    top_est = set(est.sort_values(ascending=False).index[:within])
    top_est10 = set(est.sort_values(ascending=False).index[:top])
    return {"candidates": len(common), "spearman": round(rho, 4), f"top{top}_in_top{within}": len(top_meas & top_est),
            f"top{top}_overlap": len(top_meas & top_est10)}
