"""vitq: which operators of a ViT must stay float, and what INT8 accuracy the rest gives."""

__version__ = "0.1.0"

import logging as _logging

# transformers imports torchao when it is installed (the torch-int8 backend needs it), and
# torchao logs on every start: pytree deprecation warnings (torch 2.14) or "Failed to load
# _C*.so" for its optional CUDA/CPU kernels built for another torch (a CPU torch 2.13). Noise
# on stderr, where vitq's errors are one line; vitq uses none of those kernels.
_logging.getLogger("torch.utils._pytree").setLevel(_logging.ERROR)
_logging.getLogger("torchao").setLevel(_logging.ERROR)


# The Python API (vitq/api.py), imported on first use so that `vitq --help` stays fast.
_API = {"analyze": "analyze", "evaluate": "evaluate", "eval": "evaluate", "sensitivity": "sensitivity",
        "errors": "errors", "plan": "plan", "sites": "sites", "open_session": "open_session", "load": "load"}


def __getattr__(name: str):
    if name in _API:
        from . import api
        return getattr(api, _API[name])
    raise AttributeError(f"module 'vitq' has no attribute {name!r}")
