"""Fixtures that seqkv's tests and benchmarks share (as numpy.testing is numpy's).

``tiny_model_dir`` saves a tiny random Llama with a small byte-level BPE tokenizer as an HF
model directory, so that a `seqkv serve --model DIR` subprocess (or ``load_model(DIR)``)
loads it like any model in a second: the write path, compaction and recovery are the same
code for any model. torch, transformers and tokenizers are imported inside the functions,
so importing this module costs nothing.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

TINY_VOCAB = 320
# what the tokenizer is trained on: tests/test_server.py's texts, so they tokenize in a few ids
TINY_TOKENIZER_TEXTS: tuple[str, ...] = (
    "The quick brown fox jumps over the lazy dog." * 5,
    "The quick brown cat sleeps." * 5,
    "You are a careful assistant.",
)


def tiny_llama_config(vocab: int = TINY_VOCAB, max_pos: int = 128) -> LlamaConfig:
    """Two layers of width 32, 4 query heads over 2 KV heads: the one config of the tests'
    tiny Llama (tests/conftest.py's tiny_llama wraps tiny_llama below)."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=max_pos,
        bos_token_id=1, eos_token_id=2,
    )


def tiny_llama(seed: int = 0, vocab: int = TINY_VOCAB, max_pos: int = 128) -> LlamaForCausalLM:
    """The tiny Llama with weights drawn from ``seed`` (the caller's torch RNG untouched)."""
    import torch
    from transformers import LlamaForCausalLM

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return LlamaForCausalLM(tiny_llama_config(vocab, max_pos))


def tiny_tokenizer(texts: tuple[str, ...] = TINY_TOKENIZER_TEXTS,
                   vocab: int = TINY_VOCAB) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained on ``texts`` (deterministic): any text encodes, with
    ids below ``vocab``; <unk>, <s> and </s> are ids 0, 1 and 2."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(list(texts), trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>")


def tiny_model_dir(path: str | Path, seed: int = 0) -> Path:
    """Save tiny_tokenizer() and tiny_llama(seed) to the directory ``path`` (created if
    missing) and return it: a model directory that `seqkv serve --model` loads."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tiny_tokenizer().save_pretrained(path)
    tiny_llama(seed).save_pretrained(path)
    return path
