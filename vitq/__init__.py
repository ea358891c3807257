"""vitq: which operators of a ViT must stay float, and what INT8 accuracy the rest gives."""

__version__ = "0.1.0"
