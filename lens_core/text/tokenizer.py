"""The o200k_harmony tokenizer of GPT-OSS, from whichever source is at hand (docs/architecture.md, Text features).

Sources, in order: a `tokenizer.json` beside the encoder weights (HF layout, read with `tokenizers`),
the `tokenizer_json` uint8 tensor embedded in Comfy-Org's encoder file, or the o200k_base ranks
bundled in this package, built offline with `tiktoken` plus the Harmony special tokens.
All three give the same ids (tests/test_tokenizer.py).
"""

from __future__ import annotations

import base64
import gzip
import os
from functools import lru_cache
from pathlib import Path

from ..checkpoint.files import MAX_JSON_BYTES
from ..errors import LensFileError

HARMONY_SPECIAL_TOKENS = {
    "<|startoftext|>": 199998,
    "<|endoftext|>": 199999,
    "<|return|>": 200002,
    "<|constrain|>": 200003,
    "<|channel|>": 200005,
    "<|start|>": 200006,
    "<|end|>": 200007,
    "<|message|>": 200008,
    "<|call|>": 200012,
}
PAD_ID = HARMONY_SPECIAL_TOKENS["<|endoftext|>"]

# o200k_base's pre-tokenizer: the regular expression that splits text before BPE merges.
O200K_PATTERN = "|".join([
    r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
    r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
    r"""\p{N}{1,3}""",
    r""" ?[^\s\p{L}\p{N}]+[\r\n/]*""",
    r"""\s*[\r\n]+""",
    r"""\s+(?!\S)""",
    r"""\s+""",
])
BUNDLED_RANKS = Path(__file__).resolve().parent.parent / "data" / "o200k_base.tiktoken.gz"


class LensTokenizer:
    """`encode(text) -> ids`, with Harmony control tokens in `text` recognised as special tokens."""

    def __init__(self, encode_fn, source: str):
        self._encode = encode_fn
        self.source = source

    def encode(self, text: str) -> list[int]:
        return list(self._encode(text))

    def __repr__(self) -> str:
        return f"LensTokenizer({self.source})"


def read_ranks(path: Path = BUNDLED_RANKS) -> dict[bytes, int]:
    opener = gzip.open if path.suffix == ".gz" else open
    ranks = {}
    with opener(path, "rb") as f:
        for line in f:
            if line.strip():
                token, rank = line.split()
                ranks[base64.b64decode(token)] = int(rank)
    return ranks


@lru_cache(maxsize=1)
def _bundled() -> LensTokenizer:
    import tiktoken

    encoding = tiktoken.Encoding(name="o200k_harmony", pat_str=O200K_PATTERN, mergeable_ranks=read_ranks(),
                                 special_tokens=HARMONY_SPECIAL_TOKENS)
    return LensTokenizer(lambda text: encoding.encode(text, allowed_special="all"), f"bundled o200k_base ranks ({BUNDLED_RANKS.name})")


def _from_json_file(path: Path) -> LensTokenizer:
    if path.stat().st_size > MAX_JSON_BYTES:
        raise LensFileError(f"{path}: {path.stat().st_size:,} bytes is too large for a tokenizer.json. Download the "
                            "tokenizer again with the text encoder's other files.")
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError:
        raise LensFileError(f"{path}: this is not UTF-8 text, so it is not a tokenizer.json. Download it again.") from None
    return _from_json_text(text, str(path))


def _from_json_text(json_text: str, source: str) -> LensTokenizer:
    from tokenizers import Tokenizer

    try:
        tokenizer = Tokenizer.from_str(json_text)
    except Exception as e:  # tokenizers raises a bare Exception subclass for any parse problem
        raise LensFileError(f"{source}: not a valid tokenizer.json ({str(e)[:200]}).") from None
    return LensTokenizer(lambda text: tokenizer.encode(text, add_special_tokens=False).ids, source)


def tokenizer_file(path: Path) -> Path | None:
    """The tokenizer.json that serves the encoder at `path` (file or folder): beside it, in a `tokenizer/` folder beside
    it, or in the `tokenizer/` folder of the repository around it (Microsoft's layout); None when there is none."""
    folder = path if path.is_dir() else path.parent
    candidates = [folder / "tokenizer.json", folder / "tokenizer" / "tokenizer.json", folder.parent / "tokenizer" / "tokenizer.json"]
    return next((p for p in candidates if p.is_file()), None)


def load_tokenizer(path: str | os.PathLike | None = None) -> LensTokenizer:
    """The tokenizer for the encoder at `path` (file or folder), or the bundled one for None.

    Checks that it knows the Harmony control tokens with the ids Lens was trained with.
    """
    if path is None:
        return _bundled()
    path = Path(path)
    if path.suffix == ".json" and path.is_file():
        tokenizer = _from_json_file(path)
    else:
        found = tokenizer_file(path)
        if found is not None:
            tokenizer = _from_json_file(found)
        else:
            tokenizer = _embedded(path) or _bundled()
            if path.is_file() and path.suffix.lower() == ".gguf":
                check_gguf_vocabulary(path)
    check_harmony(tokenizer)
    return tokenizer


def check_gguf_vocabulary(path: Path) -> None:
    """A llama.cpp GGUF carries its model's vocabulary (`tokenizer.ggml.tokens`): the bundled tokenizer serves it only
    if the Harmony special tokens sit at GPT-OSS's ids there (a file without a vocabulary is taken as it is)."""
    from ..checkpoint.gguf_reader import open_gguf

    file = open_gguf(path)
    if file.array_item("tokenizer.ggml.tokens", 0) is None:
        return
    for marker, expected in HARMONY_SPECIAL_TOKENS.items():
        found = file.array_item("tokenizer.ggml.tokens", expected)
        if found != marker:
            raise LensFileError(f"{path}: its vocabulary has {str(found)[:40]!r} at id {expected}, where GPT-OSS's "
                                f"o200k_harmony has {marker}: this GGUF is not GPT-OSS-20B (or its tokenizer was changed). "
                                "Use llama.cpp's gpt-oss-20b GGUF.")


def _embedded(path: Path) -> LensTokenizer | None:
    from ..checkpoint.safetensors_reader import SafetensorsFile

    if not (path.is_file() and path.suffix == ".safetensors"):
        return None
    file = SafetensorsFile(path)
    if "tokenizer_json" not in file.keys():
        return None
    try:
        text = bytes(file.read("tokenizer_json").flatten().tolist()).decode("utf-8")
    except UnicodeDecodeError:
        raise LensFileError(f"{path}: the embedded tokenizer_json is not UTF-8 text. The file is damaged: download it "
                            "again.") from None
    return _from_json_text(text, f"{path} (embedded tokenizer_json)")


def check_harmony(tokenizer: LensTokenizer) -> None:
    for marker, expected in HARMONY_SPECIAL_TOKENS.items():
        got = tokenizer.encode(marker)
        if got != [expected]:
            raise LensFileError(
                f"{tokenizer.source}: encodes {marker} as {got}, but GPT-OSS's o200k_harmony uses [{expected}]. "
                "This tokenizer belongs to another model; use the one shipped with GPT-OSS-20B (or none: the bundled one)."
            )
