"""The reference table's configurations, expressed as QuantConfigs.

- ``all``: every site int8, residual adds included (LayerNorm/GELU/Softmax float:
  backend limits);
- ``mixed_1``: ``all`` with both residual adds of every block float;
- ``mixed_2``: ``mixed_1`` with two MLP fc layers float too: by default fc2 of
  blocks 4 and 5 (the most sensitive in the reference ViT-B/16), or any sites a
  sensitivity ranking picks;
- ``nncf``: NNCF's transformer placement (``model_type=TRANSFORMER``): ``mixed_1`` with
  both attention matmuls' second product (``matmul_av``, softmax probabilities x V) float
  too, the float set NNCF's default PTQ leaves in the OpenVINO graph of a ViT.
"""

from __future__ import annotations

from .config import QuantConfig
from .sites import Site

from .names import PRESETS  # re-exported: a light module, the CLI parser reads it
REFERENCE_FC_BLOCKS = (4, 5)


def default_mixed_2_sites(sites: list[Site]) -> list[str]:
    """fc2 of blocks 4 and 5, or of the last two blocks of a shallower model."""
    fc2 = {s.block: s.name for s in sites if s.role == "fc2"}
    blocks = [b for b in REFERENCE_FC_BLOCKS if b in fc2] or sorted(fc2)[-2:]
    return [fc2[b] for b in blocks]


def preset(name: str, sites: list[Site], mixed_2_float: list[str] | None = None) -> QuantConfig | None:
    """The QuantConfig of preset ``name`` for a model with ``sites`` (None for fp32)."""
    if name == "fp32":
        return None
    if name == "all":
        return QuantConfig(name="all")
    if name == "mixed_1":
        return QuantConfig(name="mixed_1", float_sites=["*.residual_*"])
    if name == "mixed_2":
        extra = mixed_2_float if mixed_2_float is not None else default_mixed_2_sites(sites)
        return preset("mixed_1", sites).with_float(extra, name="mixed_2")
    if name == "nncf":
        return QuantConfig(name="nncf", float_sites=["*.residual_*", "*.matmul_av"])
    raise ValueError(f"unknown preset {name!r}; presets are {', '.join(PRESETS)}")
