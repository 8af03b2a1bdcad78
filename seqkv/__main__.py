"""`python -m seqkv`: the `seqkv` command."""

from .cli import main

main()
