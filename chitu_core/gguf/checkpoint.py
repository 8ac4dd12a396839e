"""A GGUF file as a checkpoint: its HF-shaped config and a ``CheckpointReader`` over it.

Tensors come out under their HF names (``chitu_core/gguf/arch.py``), dequantized to fp32 by
``gguf`` and then put through the HF loader's own dtype policy: cast to the compute dtype,
or re-quantized to FP8 block-128 with ``quantize="fp8"`` (the weights stay one byte).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from chitu_core.distributed.model_parallel import Shard
from chitu_core.errors import CheckpointError
from chitu_core.gguf.arch import (
    GGUFArchitecture,
    architecture,
    hf_config,
    hf_tensor_name,
    unpermute_qk,
)
from chitu_core.gguf.file import GGUFFile, open_gguf
from chitu_core.loader import CheckpointReader, read_shard

logger = logging.getLogger(__name__)

_QK_NAME = re.compile(r"model\.layers\.\d+\.self_attn\.([qk])_proj\.(weight|bias)$")


@dataclass(frozen=True)
class GGUFCheckpoint:
    """An opened GGUF file, its architecture's table entry and the config derived from it."""

    file: GGUFFile
    arch: GGUFArchitecture
    config: dict[str, Any]

    @classmethod
    def open(cls, path: str | Path) -> GGUFCheckpoint:
        """Read the header of ``path``.

        Raises:
            CorruptGGUFError: not a readable GGUF file.
            UnsupportedGGUFArchitectureError: its architecture is not in the table.
        """
        file = open_gguf(path)
        arch = architecture(file.architecture, file.path)
        return cls(file, arch, hf_config(file, arch))


class GGUFCheckpointReader(CheckpointReader):
    """``CheckpointReader`` over a GGUF file: HF tensor names, dequantized tensors."""

    def __init__(
        self,
        checkpoint: GGUFCheckpoint,
        ops: Any,
        dtype: torch.dtype,
        device: torch.device,
        quantize: str | None = None,
        show_progress: bool = True,
    ) -> None:
        self.checkpoint = checkpoint
        super().__init__(checkpoint.file.path, ops, dtype, device, quantize, show_progress)

    def _tensor_index(self) -> dict[str, str]:
        """HF name -> GGUF name; tensors the table does not know keep their GGUF name (the
        loader then reports them unused)."""
        index = {}
        for name in self.checkpoint.file.tensors:
            index[hf_tensor_name(self.checkpoint.arch, name) or name] = name
        return index

    def _gguf_name(self, name: str) -> str:
        if name not in self._files:
            raise CheckpointError(f"{self.path}: tensor {name!r} is missing from the checkpoint")
        return self._files[name]

    def is_fp8(self, name: str) -> bool:
        self._gguf_name(name)
        return False  # every GGUF type is dequantized; FP8 comes only from quantize="fp8"

    def _num_permuted_heads(self, name: str) -> int | None:
        """Heads of a q/k tensor whose rows llama.cpp permuted, else None."""
        match = _QK_NAME.match(name)
        if not self.checkpoint.arch.permute_qk or match is None:
            return None
        config = self.checkpoint.config
        return config["num_attention_heads" if match[1] == "q" else "num_key_value_heads"]

    def raw(
        self, name: str, shape: Iterable[int] | None = None, shard: Shard | None = None
    ) -> torch.Tensor:
        """Tensor ``name`` (HF name) dequantized to fp32 on the CPU, q/k rows in HF order,
        shape-checked; with ``shard`` only that slice (see ``CheckpointReader.raw``)."""
        tensor = self.checkpoint.file.dequantize(self._gguf_name(name))
        heads = self._num_permuted_heads(name)
        if heads is not None:
            tensor = unpermute_qk(tensor, heads)
        full = tuple(tensor.shape)
        if shape is not None and full != tuple(shape):
            raise CheckpointError(
                f"{self.path}: tensor {name!r} ({self._files[name]}) has shape {full}, the "
                f"metadata implies {tuple(shape)}"
            )
        if shard is not None:
            tensor = read_shard(tensor.__getitem__, full, shard, f"{self.path}: tensor {name!r}")
        self._mark_used(name)
        return tensor
