"""Preset names, importable without torch (the command line builds its parser from them)."""

PRESETS = ("fp32", "all", "mixed_1", "mixed_2", "nncf")
