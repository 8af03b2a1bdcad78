"""The one exception type seqkv raises for bad input; the CLI turns it into a one-line error."""


class SeqkvError(Exception):
    """Bad input or a refused operation: a corrupt or foreign blob, a wrong model, an empty text."""


class BlobError(SeqkvError):
    """A blob is corrupt, truncated, empty, of another format or version."""


class ModelMismatchError(SeqkvError):
    """A blob was written under another model or numerics profile than the one decoding it."""
