"""Text to token ids and back, byte for byte.

Tokenizers do not always reproduce their input (normalization, special-token handling,
unusual whitespace). The ids are what the model sees; what the tokenizer cannot give back
is stored beside them as a small patch (difflib opcodes against the decoded text).
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field

from .errors import SeqkvError


@dataclass
class TextRecipe:
    """How to turn the decoded ids back into the original text."""

    head: int = 0  # special tokens the tokenizer adds before the text (e.g. BOS)
    tail: int = 0  # and after it
    patch: list[list] = field(default_factory=list)  # [start, end, replacement] on decoded text

    def to_dict(self) -> dict:
        return {"head": self.head, "tail": self.tail, "patch": self.patch}

    @classmethod
    def from_dict(cls, d: dict) -> TextRecipe:
        return cls(int(d.get("head", 0)), int(d.get("tail", 0)), list(d.get("patch", [])))


def _find_specials(ids: list[int], plain: list[int]) -> tuple[int, int]:
    for head in range(0, len(ids) - len(plain) + 1):
        if ids[head : head + len(plain)] == plain:
            return head, len(ids) - head - len(plain)
    return 0, 0


def _apply(decoded: str, patch: list[list]) -> str:
    out, pos = [], 0
    for start, end, replacement in patch:
        out.append(decoded[pos:start])
        out.append(replacement)
        pos = end
    out.append(decoded[pos:])
    return "".join(out)


def encode_text(tokenizer, text: str) -> tuple[list[int], TextRecipe]:
    if tokenizer is None:
        raise SeqkvError("this model has no tokenizer: pass token ids instead of text")
    if not text:
        raise SeqkvError("empty text: nothing to compress")
    ids = list(tokenizer(text).input_ids)
    plain = list(tokenizer(text, add_special_tokens=False).input_ids)
    if not plain:
        raise SeqkvError("the text tokenizes to nothing")
    head, tail = _find_specials(ids, plain)
    recipe = TextRecipe(head, tail)
    decoded = _decode_span(tokenizer, ids, recipe)
    if decoded != text:
        matcher = difflib.SequenceMatcher(None, decoded, text, autojunk=False)
        recipe.patch = [
            [i1, i2, text[j1:j2]] for op, i1, i2, j1, j2 in matcher.get_opcodes() if op != "equal"
        ]
    return ids, recipe


def _decode_span(tokenizer, ids: list[int], recipe: TextRecipe) -> str:
    span = ids[recipe.head : len(ids) - recipe.tail]
    return tokenizer.decode(span, skip_special_tokens=False, clean_up_tokenization_spaces=False)


def decode_text(tokenizer, ids: list[int], recipe: TextRecipe) -> str:
    if tokenizer is None:
        raise SeqkvError("this model has no tokenizer: cannot turn tokens back into text")
    return _apply(_decode_span(tokenizer, ids, recipe), recipe.patch)
