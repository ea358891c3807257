"""Sensitivity modes, groups and ranking metrics, importable without torch or pandas
(the command line builds its parser from them before any heavy import)."""

MODES = ("only", "all-but")
GROUPS = ("op", "block", "kind")
# KL first: per-image and smooth; top-1 on a few hundred images moves in one-image steps.
RANK_METRICS = ("kl", "top1_drop", "agreement", "logit_sqnr_db")
# `only` candidates `vitq plan/analyze` measure, in the order of the taylor estimate (the
# rest keep their estimate); 0 = measure every candidate. 32 of the probes' 122: the measured
# top 10 lay within the estimate's top 15 on the Fashion-MNIST probe (docs/results.md, issue
# 11), and a plan floats 8-16 sites; the estimate on TAYLOR_IMAGES plan images costs about
# 4 full passes of 256 images (1 forward + 8 backward on 64), measuring all 122 about 66.
MEASURE_TOP = 32
TAYLOR_IMAGES = 64  # the first plan images the estimate uses (it orders; the measurements decide)
