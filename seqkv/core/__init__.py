"""The shared core under every tier: model loading (models.py, packaged.py), KV caches and
their files (cache.py), the fixed-point next-token distribution and its entropy coders
(distribution.py, decoders.py), the canonical HF forward procedure (stepper.py), text to
token ids and back (textcodec.py), the blob container (blob.py), KV sizes (kvsize.py),
errors and the version. The integer engine (seqkv.engine) belongs to this layer too.

Nothing here imports a tier, the CLI or the server (tests/test_layers.py checks it).
"""
