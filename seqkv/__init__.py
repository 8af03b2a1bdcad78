"""seqkv: KV caches stored as sequences (arXiv 2604.15356)."""

__version__ = "0.1.0"

from .compress import (  # noqa: E402
    compress_cache,
    compress_text,
    compress_tokens,
    decompress_text,
    decompress_tokens,
    inspect_blob,
    restore_cache,
)
from .errors import BlobError, ModelMismatchError, SeqkvError  # noqa: E402
from .models import from_objects, load_model  # noqa: E402

__all__ = [
    "BlobError",
    "ModelMismatchError",
    "SeqkvError",
    "compress_cache",
    "compress_text",
    "compress_tokens",
    "decompress_text",
    "decompress_tokens",
    "from_objects",
    "inspect_blob",
    "load_model",
    "restore_cache",
]
