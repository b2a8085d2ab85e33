"""GGUF files (llama.cpp's format, also used by stable-diffusion.cpp and ComfyUI-GGUF): tensors by name, read on
demand, behind the same interface as a safetensors file so that the loaders take either.

Parsing is llama.cpp's own Python library (`gguf.GGUFReader`, which maps the file into memory: nothing is read
until a tensor is). A quantised tensor is read as its raw bytes [..., row bytes] (uint8) when asked for without a
dtype, so that a GGUF layer keeps it quantised; asked for with a dtype, it is dequantised (gguf_quants.py).
Shapes are given in torch's order (GGUF lists dimensions innermost first).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..errors import LensFileError, all_finite
from .gguf_quants import FLOAT_TYPES, TYPES, dequantize, row_bytes, type_name


@dataclass(frozen=True)
class GGUFTensor:
    shape: tuple[int, ...]  # the values' shape, torch order
    qtype: int  # ggml type id
    data: object  # numpy view into the mapped file: the raw bytes [..., row bytes], or the values for float types

    @property
    def dtype(self) -> torch.dtype:
        return FLOAT_TYPES.get(self.qtype, torch.uint8)


def _not_gguf(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(4) != b"GGUF"


class GGUFFile:
    """One `.gguf` file: its header is parsed and every tensor's type checked on open; tensors are read on demand."""

    def __init__(self, path: str | os.PathLike):
        import gguf  # llama.cpp's library; imported here so that safetensors users never load it

        self.path = Path(path)
        if not self.path.is_file():
            raise LensFileError(f"{self.path}: no such file.")
        if _not_gguf(self.path):
            raise LensFileError(f"{self.path}: this is not a GGUF file (it does not start with 'GGUF'). Is it a "
                                ".safetensors file renamed, or a partial download? Download it again.")
        try:
            reader = gguf.GGUFReader(self.path, "r")
        except (ValueError, IndexError, OSError) as e:
            raise LensFileError(f"{self.path}: the GGUF file is truncated or damaged ({str(e)[:120]}). Download it "
                                "again.") from None
        self.size = self.path.stat().st_size
        self._fields = reader.fields
        self.metadata = {name: str(field.contents()) for name, field in reader.fields.items()
                         if field.types and field.types[0] == gguf.GGUFValueType.STRING}
        self.tensors: dict[str, GGUFTensor] = {}
        for tensor in reader.tensors:
            qtype = int(tensor.tensor_type)
            if qtype not in TYPES:
                raise LensFileError(
                    f"{self.path}: tensor {tensor.name} is stored as {gguf.GGMLQuantizationType(qtype).name}, a type this "
                    f"pack does not decode (it reads {', '.join(name for name, _, _ in TYPES.values())}). Pick a file "
                    "quantised to one of those.")
            self.tensors[tensor.name] = GGUFTensor(tuple(int(d) for d in reversed(tensor.shape)), qtype, tensor.data)
        self._header_bytes = min((int(t.data_offset) for t in reader.tensors), default=self.size)

    def value(self, key: str, default=None):
        """A metadata value (a number or text; `default` where absent or an array)."""
        field = self._fields.get(key)
        if field is None or not field.types or field.types[0].name == "ARRAY":
            return default
        return field.contents()

    def array_item(self, key: str, index: int):
        """Item `index` of a metadata array (e.g. a token of `tokenizer.ggml.tokens`); None where there is none."""
        field = self._fields.get(key)
        if field is None or not field.types or field.types[0].name != "ARRAY" or not 0 <= index < len(field.data):
            return None
        return field.contents(index)

    @property
    def quant_types(self) -> dict[str, int]:
        """Tensor name -> ggml type, for the tensors stored quantised."""
        return {name: t.qtype for name, t in self.tensors.items() if t.qtype not in FLOAT_TYPES}

    def keys(self):
        return self.tensors.keys()

    def stored_shape(self, name: str) -> tuple[int, ...]:
        """The shape `read(name)` gives: the values' shape, or for a quantised tensor its rows of raw bytes."""
        info = self.tensors[name]
        return info.shape if info.qtype in FLOAT_TYPES else (*info.shape[:-1], row_bytes(info.qtype, info.shape[-1]))

    def fingerprint(self) -> str:
        from .safetensors_reader import content_fingerprint  # that module imports this one

        return content_fingerprint(self.path, self.size, self._header_bytes)

    def read(self, name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The tensor `name` on the CPU: as stored when `dtype` is None (raw bytes for a quantised one), else its
        values in `dtype`. Values are checked for NaN / infinity here, where the file can still be named."""
        info = self.tensors[name]
        raw = torch.from_numpy(np.array(info.data)).reshape(-1).view(torch.uint8)  # a copy: the file stays unmodified
        if info.qtype in FLOAT_TYPES:
            stored = values = raw.view(FLOAT_TYPES[info.qtype]).reshape(info.shape)
        else:
            stored = raw.reshape(self.stored_shape(name))
            values = dequantize(stored, info.qtype, info.shape)
        if not all_finite(values):
            raise LensFileError(f"{self.path}: tensor {name} ({type_name(info.qtype)}) holds NaN or infinite values, "
                                "which would make every image black. The file is damaged: download it again.")
        if dtype is None:
            return stored
        return values.to(dtype)
