"""The activation table with each tensor once (the error analyzer lists a tensor once
per site that reads it)."""

from __future__ import annotations

import pandas as pd

from .format import is_missing, is_true, num, records

ALIAS_STATS = ("max_abs", "p99_9", "kurtosis")  # equal in two consecutive rows: one tensor read twice


def one_row_per_tensor(df: pd.DataFrame) -> pd.DataFrame:
    """The activation table with each tensor once.

    The error analyzer lists a tensor once per site that reads it: GELU's output is
    fc2's input, a LayerNorm's output is the q/k/v projections' input, softmax's
    output is ``matmul_av``'s probs. With a ``same_tensor_as`` column (non-empty =
    an alias of the named tensor) the aliases are dropped. Without it, consecutive
    rows of one block whose max |x|, p99.9 and kurtosis are all equal are taken for
    one tensor: its first int8 row is kept (the quantizer a backend would use; the
    first row when none is int8) and the other names go to ``also``.
    """
    df = df.reset_index(drop=True)
    if "same_tensor_as" in df:
        # group each tensor with its aliases; keep the group's first int8 row (its own
        # quantization is in the accumulated error), else the first row
        group = [str(t) if is_missing(a) else str(a) for t, a in zip(df["tensor"], df["same_tensor_as"])]
        int8 = df["int8"].map(is_true) if "int8" in df else pd.Series(False, index=df.index)
        keep: dict[str, int] = {}
        for i, g in enumerate(group):
            if g not in keep or (int8.iloc[i] and not int8.iloc[keep[g]]):
                keep[g] = i
        out = df.iloc[sorted(keep.values())].copy()
        names = {g: [str(df["tensor"].iloc[i]) for i, h in enumerate(group) if h == g] for g in keep}
        out["also"] = [";".join(n for n in names[g] if n != str(t))
                       for g, t in zip((group[i] for i in sorted(keep.values())), out["tensor"])]
        return out.reset_index(drop=True)
    if not set(ALIAS_STATS) <= set(df) or df.empty:
        return df.assign(also="")
    keys = [tuple([str(r.get("block"))] + [repr(num(r.get(k))) for k in ALIAS_STATS]) for r in records(df)]
    groups: list[list[int]] = []
    for i, key in enumerate(keys):
        if groups and keys[groups[-1][-1]] == key and "nan" not in key[1:]:
            groups[-1].append(i)
        else:
            groups.append([i])
    int8 = df["int8"].map(is_true) if "int8" in df else pd.Series(False, index=df.index)
    kept, also = [], []
    for g in groups:
        keep = next((i for i in g if int8[i]), g[0])
        kept.append(keep)
        also.append(";".join(str(df.at[i, "tensor"]) for i in g if i != keep))
    out = df.loc[kept].copy()
    out["also"] = also
    return out.reset_index(drop=True)
