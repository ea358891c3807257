"""Sensitivity modes, groups and ranking metrics, importable without torch or pandas
(the command line builds its parser from them before any heavy import)."""

MODES = ("only", "all-but")
GROUPS = ("op", "block", "kind")
# KL first: per-image and smooth; top-1 on a few hundred images moves in one-image steps.
RANK_METRICS = ("kl", "top1_drop", "agreement", "logit_sqnr_db")
# `only` candidates `vitq plan/analyze` measure, in the order of the taylor estimate (the
# rest keep their estimate); 0 = measure every candidate. 0 until `make bench` on an idle
# machine shows the estimate is cheaper than measuring (on the loaded 2-core machine it cost
# about as much as measuring all 122 candidates of the probes: docs/results.md, issue 11).
MEASURE_TOP = 0
