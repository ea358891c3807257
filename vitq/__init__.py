"""vitq: which operators of a ViT must stay float, and what INT8 accuracy the rest gives."""

__version__ = "0.1.0"

import logging as _logging

# transformers imports torchao when it is installed (the torch-int8 backend needs it), and
# torchao 0.18 registers enums with torch's pytree, which logs two deprecation warnings on
# every start: noise on stderr, where vitq's errors are one line. Silence that logger only.
_logging.getLogger("torch.utils._pytree").setLevel(_logging.ERROR)
