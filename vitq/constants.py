"""Names the command line offers as choices, importable without torch/transformers/pandas.

They mirror the heavy modules that own them (``quant.presets.PRESETS``,
``analysis.sensitivity.MODES/GROUPS/RANK_METRICS``), so that ``vitq --help`` builds its
parser in a fraction of a second; ``tests/test_cli.py`` checks that both stay equal.
"""

PRESETS = ("fp32", "all", "mixed_1", "mixed_2")
MODES = ("only", "all-but")
GROUPS = ("op", "block", "kind")
RANK_METRICS = ("top1_drop", "kl", "agreement", "logit_sqnr_db")
