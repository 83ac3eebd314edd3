"""Tokenizers: a dependency-free byte tokenizer and a local Hugging Face tokenizer.json."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

import tokenizers

from jaxscale.errors import UserError

EOS_CANDIDATES = ("</s>", "<|endoftext|>", "<|end_of_text|>", "<eos>")


class Tokenizer(Protocol):
    """What the data pipeline needs from a tokenizer."""

    vocab_size: int
    eos_id: int

    def encode(self, text: str, special: bool = False) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...


class ByteTokenizer:
    """UTF-8 bytes are ids 0..255 and id 256 is end-of-sequence."""

    eos_id = 256
    vocab_size = 257

    def encode(self, text: str, special: bool = False) -> list[int]:
        """Return the UTF-8 bytes of `text` (no eos appended; there are no special tokens)."""
        return list(text.encode("utf-8"))

    def decode(self, ids: Sequence[int]) -> str:
        """Return the text of the byte ids, skipping special ids and replacing invalid UTF-8."""
        return bytes(int(i) for i in ids if 0 <= i < 256).decode("utf-8", errors="replace")


class HFTokenizer:
    """A Hugging Face `tokenizer.json` loaded from a local file."""

    def __init__(self, path: str | Path):
        path = Path(path)
        if not path.is_file():
            raise UserError(f"tokenizer file {path} not found; set data.tokenizer to 'byte' or to "
                            f"the path of a Hugging Face tokenizer.json")
        try:
            self._tok = tokenizers.Tokenizer.from_file(str(path))
        except Exception as e:
            reason = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise UserError(f"cannot parse tokenizer file {path} ({reason}); point data.tokenizer "
                            f"at a valid Hugging Face tokenizer.json or use 'byte'") from e
        self.vocab_size: int = self._tok.get_vocab_size()
        ids = [self._tok.token_to_id(t) for t in EOS_CANDIDATES]
        found = [i for i in ids if i is not None]
        if not found:
            raise UserError(f"tokenizer {path} has no end-of-sequence token (looked for "
                            f"{', '.join(EOS_CANDIDATES)}); add one of them to its vocabulary")
        self.eos_id: int = found[0]

    def encode(self, text: str, special: bool = False) -> list[int]:
        """Return the token ids of `text`; with `special`, the special tokens the tokenizer's
        post-processor adds (e.g. Llama's beginning-of-text)."""
        return self._tok.encode(text, add_special_tokens=special).ids

    def decode(self, ids: Sequence[int]) -> str:
        """Return the text of `ids`, skipping special tokens."""
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=True)


def document_ids(tokenizer: Tokenizer, text: str) -> list[int]:
    """A whole document as a model sees it in training: its special tokens, then eos."""
    ids = tokenizer.encode(text, special=True)
    return ids if ids and ids[-1] == tokenizer.eos_id else [*ids, tokenizer.eos_id]


def prompt_ids(tokenizer: Tokenizer, text: str) -> list[int]:
    """A prompt as the start of a document: its special tokens, without a closing eos."""
    ids = tokenizer.encode(text, special=True)
    return ids[:-1] if ids and ids[-1] == tokenizer.eos_id else ids


def load_tokenizer(name: str) -> Tokenizer:
    """Return the byte tokenizer for "byte", else the Hugging Face tokenizer.json at path `name`."""
    return ByteTokenizer() if name == "byte" else HFTokenizer(name)
