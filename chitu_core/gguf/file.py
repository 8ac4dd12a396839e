"""One GGUF file: its metadata and its tensors dequantized to fp32, through ``gguf``'s reader.

The file is memory-mapped by ``gguf.GGUFReader``; a tensor is dequantized only when asked
for, so a checkpoint is never held in RAM twice.
"""

from __future__ import annotations

import logging
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch
from gguf import GGMLQuantizationType, GGUFReader, GGUFValueType
from gguf.quants import _type_traits, dequantize

from chitu_core.errors import CorruptGGUFError, UnsupportedGGUFQuantError

logger = logging.getLogger(__name__)

# Every GGML type gguf's own ``dequantize`` turns into fp32 (its quant table plus the plain
# floats); integer and fp64 tensors are not weights any supported architecture has.
SUPPORTED_QUANT_TYPES: tuple[str, ...] = (
    "F32",
    "F16",
    *(t.name for t in _type_traits),
)
_SUPPORTED = frozenset(SUPPORTED_QUANT_TYPES)
_MISSING = object()


class GGUFFile:
    """Metadata and tensors of one ``.gguf`` file.

    Raises ``CorruptGGUFError`` (at construction) for a file that is not GGUF, is truncated,
    or whose header does not add up.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        try:
            self._reader = GGUFReader(self.path)
        except Exception as exc:  # gguf raises ValueError, struct.error, IndexError...
            raise CorruptGGUFError(
                f"{self.path}: not a readable GGUF file (wrong format, truncated or corrupt: "
                f"{type(exc).__name__}: {exc}); download it again or convert it with llama.cpp"
            ) from exc
        self.tensors = {t.name: t for t in self._reader.tensors}
        self.architecture: str = self.metadata("general.architecture")

    # -- metadata ----------------------------------------------------------------------
    def has(self, key: str) -> bool:
        return key in self._reader.fields

    def metadata(self, key: str, default: Any = _MISSING) -> Any:
        """The value of metadata ``key`` (str, number, bool or list); ``default`` when absent.

        Raises:
            CorruptGGUFError: the key is absent and no default was given.
        """
        field = self._reader.fields.get(key)
        if field is None:
            if default is _MISSING:
                raise CorruptGGUFError(f"{self.path}: metadata key {key!r} is missing")
            return default
        if field.types and field.types[0] == GGUFValueType.ARRAY:
            return field.contents()
        value = field.contents()
        return value.item() if isinstance(value, np.generic) else value

    # -- tensors -----------------------------------------------------------------------
    def shape(self, name: str) -> tuple[int, ...]:
        """Shape of tensor ``name`` in torch order (GGML lists dimensions the other way)."""
        return tuple(int(d) for d in reversed(self.tensors[name].shape.tolist()))

    def quant_type(self, name: str) -> str:
        return self.tensors[name].tensor_type.name

    def dequantize(self, name: str) -> torch.Tensor:
        """Tensor ``name`` as fp32 on the CPU, in torch order (``[rows, cols]`` for a weight).

        Raises:
            UnsupportedGGUFQuantError: its GGML type is not in ``SUPPORTED_QUANT_TYPES``.
            CorruptGGUFError: its data does not match its declared shape.
        """
        tensor = self.tensors[name]
        qtype = tensor.tensor_type
        if qtype.name not in _SUPPORTED:
            raise UnsupportedGGUFQuantError(
                f"{self.path}: tensor {name!r} is stored as GGML type {qtype.name}, which Chitu "
                f"cannot dequantize; supported: {', '.join(SUPPORTED_QUANT_TYPES)}. Re-quantize "
                "the model to one of these with llama.cpp's llama-quantize"
            )
        shape = self.shape(name)
        try:
            values = dequantize(tensor.data, GGMLQuantizationType(qtype)).reshape(shape)
        except (ValueError, IndexError) as exc:
            raise CorruptGGUFError(
                f"{self.path}: tensor {name!r} ({qtype.name}, shape {shape}) cannot be decoded: "
                f"{exc}"
            ) from exc
        if not values.flags.writeable:  # F32 data is a view of the read-only memory map
            values = values.copy()
        return torch.from_numpy(values)


def open_gguf(path: str | Path) -> GGUFFile:
    """``GGUFFile(path)``, shared by the callers that open the same unchanged file (the
    loader and the tokenizer): parsing the header of a 50k-token vocabulary takes seconds."""
    path = Path(path).resolve()
    stat = path.stat() if path.is_file() else None
    return _open_cached(path, None if stat is None else (stat.st_size, stat.st_mtime_ns))


@lru_cache(maxsize=2)
def _open_cached(path: Path, _identity: tuple[int, int] | None) -> GGUFFile:
    return GGUFFile(path)
