"""HF-format checkpoint directory -> a model on the active backend.

Tensors are read lazily from memory-mapped safetensors files (``safe_open``),
one at a time, moved to the device, and dropped: the checkpoint is never held
in RAM twice. Under tensor parallelism a rank reads only its ``Shard`` of a
tensor (``get_slice``), never the whole of it; FP8 block weights are cut on
128-row/column boundaries together with their scales. FP8 weights stay FP8 with their ``weight_scale_inv``; bf16
weights can be quantized to FP8 block-128 at load (``quantize="fp8"``). Nothing
is ever unpickled: only ``config.json``, ``*.safetensors`` and the index are read.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from tqdm import tqdm

from chitu_core.distributed.model_parallel import ModelParallel, Shard
from chitu_core.errors import CheckpointError, ConfigFieldError
from chitu_core.gguf import find_gguf
from chitu_core.quant import (
    FORMAT_FP8_BLOCK128,
    FORMAT_UNQUANTIZED,
    FP8_BLOCK_SIZE,
    QuantizedWeight,
    quantize_fp8,
)

logger = logging.getLogger(__name__)

INDEX_FILE = "model.safetensors.index.json"
QUANTIZE_CHOICES = ("fp8",)
_FP8_DTYPES = (torch.float8_e4m3fn,)


def read_config(path: str | Path) -> dict[str, Any]:
    """``config.json`` of a checkpoint directory as a dict (CheckpointError if absent or invalid)."""
    config_path = Path(path) / "config.json"
    if not config_path.is_file():
        raise CheckpointError(f"{config_path}: missing (is {path} an HF-format model directory?)")
    try:
        return json.loads(config_path.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{config_path}: invalid JSON: {exc}") from exc


TORCH_DTYPE_NAMES = ("bfloat16", "float16", "float32")


def checkpoint_dtype(path: str | Path) -> str | None:
    """The dtype a checkpoint declares, as transformers' ``dtype="auto"`` reads it: config.json's
    ``dtype`` (transformers 5) or ``torch_dtype``; for a GGUF, its float file type (F32, F16,
    BF16). None when it declares none of ``TORCH_DTYPE_NAMES`` (e.g. a quantized GGUF)."""
    gguf_path = find_gguf(path)
    if gguf_path is None:
        config = read_config(path)
    else:
        from chitu_core.gguf.checkpoint import GGUFCheckpoint

        config = GGUFCheckpoint.open(gguf_path).config
    declared = config.get("dtype") or config.get("torch_dtype")
    return declared if declared in TORCH_DTYPE_NAMES else None


def _shard_map(path: Path) -> dict[str, Path]:
    """Tensor name -> shard file, from the index or from the single file."""
    index = path / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as exc:
            raise CheckpointError(f"{index}: not a valid safetensors index ({exc})") from exc
        files = {name: path / shard for name, shard in weight_map.items()}
        for shard in sorted(set(files.values())):
            if not shard.is_file():
                raise CheckpointError(f"{shard}: shard listed in {INDEX_FILE} is missing")
        return files
    singles = sorted(path.glob("*.safetensors"))
    if not singles:
        raise CheckpointError(f"{path}: no *.safetensors files (and no {INDEX_FILE})")
    files: dict[str, Path] = {}
    for shard in singles:
        for name in _open(shard).keys():
            files[name] = shard
    return files


def _open(shard: Path):
    try:
        return safe_open(str(shard), framework="pt", device="cpu")
    except Exception as exc:  # safetensors raises its own SafetensorError, OSError...
        raise CheckpointError(
            f"{shard}: not a readable safetensors file (truncated or corrupt header?): {exc}"
        ) from exc


class CheckpointReader:
    """Lazy access to a checkpoint's tensors, with the load-time dtype policy.

    Models pull what they need by name: ``tensor`` for plain tensors,
    ``linear`` for weights that go to ``ops.linear``/``ops.fused_moe``.
    """

    def __init__(
        self,
        path: str | Path,
        ops: Any,
        dtype: torch.dtype,
        device: torch.device,
        quantize: str | None = None,
        show_progress: bool = True,
    ) -> None:
        if quantize is not None and quantize not in QUANTIZE_CHOICES:
            raise ValueError(
                f"quantize must be one of {QUANTIZE_CHOICES} or None, got {quantize!r}"
            )
        self.path = Path(path)
        self.ops, self.dtype, self.device, self.quantize = ops, dtype, device, quantize
        self._files = self._tensor_index()
        self._handles: dict[Path, Any] = {}
        self._used: set[str] = set()
        self._progress = tqdm(
            total=len(self._files),
            desc="loading weights",
            unit="tensor",
            disable=not show_progress,
            leave=False,
        )

    def _tensor_index(self) -> dict[str, Any]:
        """Tensor name -> where it is stored (here: its safetensors shard)."""
        return _shard_map(self.path)

    # -- plain tensors -----------------------------------------------------------------
    def has(self, name: str) -> bool:
        return name in self._files

    def names(self) -> list[str]:
        return sorted(self._files)

    def _handle(self, name: str) -> tuple[Path, Any]:
        if name not in self._files:
            raise CheckpointError(f"{self.path}: tensor {name!r} is missing from the checkpoint")
        shard = self._files[name]
        if shard not in self._handles:
            self._handles[shard] = _open(shard)
        return shard, self._handles[shard]

    def _mark_used(self, name: str) -> None:
        if name not in self._used:
            self._used.add(name)
            self._progress.update(1)

    def is_fp8(self, name: str) -> bool:
        """Whether tensor ``name`` is stored as FP8 e4m3 (reads the header only)."""
        _, handle = self._handle(name)
        return handle.get_slice(name).get_dtype() == "F8_E4M3"

    def raw(
        self, name: str, shape: Iterable[int] | None = None, shard: Shard | None = None
    ) -> torch.Tensor:
        """The tensor as stored (CPU, memory-mapped), shape-checked against the whole tensor.

        With ``shard``, only rows ``[start, stop)`` of dimension ``shard.dim`` are
        read; a shard running past the end is zero-padded to ``shard.size``.
        """
        path, handle = self._handle(name)
        try:
            if shard is None:
                tensor = handle.get_tensor(name)
                full = tuple(tensor.shape)
            else:
                view = handle.get_slice(name)
                full = tuple(view.get_shape())
        except Exception as exc:
            raise CheckpointError(f"{path}: cannot read tensor {name!r}: {exc}") from exc
        if shape is not None and full != tuple(shape):
            raise CheckpointError(
                f"{path}: tensor {name!r} has shape {full}, the config implies {tuple(shape)}"
            )
        if shard is not None:
            tensor = read_shard(view.__getitem__, full, shard, f"{path}: tensor {name!r}")
        self._mark_used(name)
        return tensor

    def tensor(
        self,
        name: str,
        shape: Iterable[int] | None = None,
        dtype: torch.dtype | None = None,
        shard: Shard | None = None,
    ) -> torch.Tensor:
        """A plain tensor (norm weight, embedding, bias) on the device, floats cast to ``dtype``
        (default: the compute dtype); with ``shard``, only that slice."""
        tensor = self.raw(name, shape, shard)
        if tensor.is_floating_point():
            tensor = tensor.to(dtype or self.dtype)
        return tensor.to(self.device)

    # -- linear weights ----------------------------------------------------------------
    def _read_linear(
        self, prefix: str, shape: tuple[int, int], shard: Shard | None = None
    ) -> QuantizedWeight:
        """``prefix.weight`` as stored: FP8 with its ``weight_scale_inv``, or dense in the compute dtype.

        A ``shard`` of an FP8 weight must start and end on 128 boundaries (or at
        the end of the dimension): the scale blocks are cut with it.
        """
        name = f"{prefix}.weight"
        if shard is not None and self.is_fp8(name):
            _check_fp8_shard(self.path, name, shape, shard)
        weight = self.raw(name, shape, shard)
        if weight.dtype in _FP8_DTYPES:
            n, k = shape
            scale_shape = (-(-n // FP8_BLOCK_SIZE), -(-k // FP8_BLOCK_SIZE))
            scale_shard = None
            if shard is not None:
                scale_shard = Shard(
                    shard.dim, shard.start // FP8_BLOCK_SIZE, -(-shard.stop // FP8_BLOCK_SIZE)
                )
            scale = self.raw(f"{prefix}.weight_scale_inv", scale_shape, scale_shard).float()
            return QuantizedWeight(
                weight.to(self.device), scale.to(self.device), FORMAT_FP8_BLOCK128
            )
        return QuantizedWeight(weight.to(self.device, self.dtype), None, FORMAT_UNQUANTIZED)

    def _apply_quantize(self, weight: QuantizedWeight) -> QuantizedWeight:
        if self.quantize == "fp8" and weight.fmt == FORMAT_UNQUANTIZED:
            return quantize_fp8(weight.weight, FORMAT_FP8_BLOCK128)
        return weight

    def linear_weight(
        self,
        prefix: str,
        shape: tuple[int, int],
        quantize: bool = True,
        shard: Shard | None = None,
    ) -> QuantizedWeight:
        """``prefix.weight`` (+ ``prefix.weight_scale_inv`` for FP8) as a QuantizedWeight on the device.

        FP8 stays FP8. Other weights become the compute dtype, or FP8 block-128
        when the reader quantizes and ``quantize`` is True (False for the LM head,
        which FP8 checkpoints also keep in bf16). ``shape`` is the whole tensor's;
        ``shard`` selects this rank's rows (dim 0) or columns (dim 1).
        """
        weight = self._read_linear(prefix, shape, shard)
        return self._apply_quantize(weight) if quantize else weight

    def fused_linear_weight(
        self,
        prefixes: list[str],
        shapes: list[tuple[int, int]],
        shards: list[Shard | None] | None = None,
    ) -> QuantizedWeight:
        """Several ``[N_i, K]`` weights concatenated along N (fused q/k/v, gate/up), each
        cut to its ``shards[i]`` first (a column-parallel fusion holds this rank's rows of each).

        Dense parts are concatenated before quantizing, so the FP8 blocks of a
        quantized fusion span part boundaries freely.
        """
        shards = shards or [None] * len(prefixes)
        parts = [
            self._read_linear(p, s, sh) for p, s, sh in zip(prefixes, shapes, shards, strict=True)
        ]
        return self._apply_quantize(self.concat(parts))

    def dequantized_weight(
        self, prefix: str, shape: tuple[int, int], dtype: torch.dtype, shard: Shard | None = None
    ) -> torch.Tensor:
        """``prefix.weight`` widened to ``dtype`` (weights only used dense, like MLA's
        ``kv_b_proj``). A shard of an FP8 weight need not be 128-aligned: the covering
        blocks are read, widened, then cut."""
        name = f"{prefix}.weight"
        if shard is None or not self.is_fp8(name):
            return self._read_linear(prefix, shape, shard).dequantize(dtype)
        size = shape[shard.dim]
        start = shard.start // FP8_BLOCK_SIZE * FP8_BLOCK_SIZE
        stop = min(-(-shard.stop // FP8_BLOCK_SIZE) * FP8_BLOCK_SIZE, size)
        covering = self._read_linear(prefix, shape, Shard(shard.dim, start, stop))
        return covering.dequantize(dtype).narrow(shard.dim, shard.start - start, shard.size)

    def concat(self, parts: list[QuantizedWeight]) -> QuantizedWeight:
        """Concatenate ``[N_i, K]`` weights of one format along N."""
        fmt = parts[0].fmt
        if any(p.fmt != fmt for p in parts):
            raise CheckpointError(
                f"{self.path}: cannot fuse weights of formats {[p.fmt for p in parts]}"
            )
        if fmt == FORMAT_FP8_BLOCK128 and any(p.out_features % FP8_BLOCK_SIZE for p in parts[:-1]):
            raise CheckpointError(
                f"{self.path}: FP8 block weights of {[p.out_features for p in parts]} rows cannot be "
                "fused: each part but the last must have a multiple of 128 rows"
            )
        scale = None if parts[0].scale is None else torch.cat([p.scale for p in parts])
        return QuantizedWeight(torch.cat([p.weight for p in parts]), scale, fmt)

    def stack(self, parts: list[QuantizedWeight]) -> QuantizedWeight:
        """Stack ``E`` same-shaped ``[N, K]`` weights into ``[E, N, K]`` (MoE experts)."""
        weight = torch.empty(
            (len(parts), *parts[0].weight.shape), dtype=parts[0].weight.dtype, device=self.device
        )
        for i, part in enumerate(parts):
            weight[i].copy_(part.weight)
        scale = None if parts[0].scale is None else torch.stack([p.scale for p in parts])
        return QuantizedWeight(weight, scale, parts[0].fmt)

    def prepare(self, weight: QuantizedWeight) -> Any:
        """Hand a weight to the backend's ``prepare_weight`` (once per weight, at load)."""
        return self.ops.prepare_weight(weight.weight, weight.scale, weight.fmt)

    def linear(
        self,
        prefix: str,
        shape: tuple[int, int],
        quantize: bool = True,
        shard: Shard | None = None,
    ) -> Any:
        """``prepare(linear_weight(prefix, shape, quantize, shard))``."""
        return self.prepare(self.linear_weight(prefix, shape, quantize, shard))

    def dense_weight(self, weight: torch.Tensor) -> QuantizedWeight:
        """An already loaded dense tensor (e.g. tied embeddings) as an unquantized weight."""
        return QuantizedWeight(weight, None, FORMAT_UNQUANTIZED)

    # -- bookkeeping -------------------------------------------------------------------
    def close_progress(self) -> None:
        """Remove the progress bar from the terminal (it leaves no line behind)."""
        self._progress.close()

    def finish(self, ignore: Iterable[str] = (), report_unused: bool = True) -> None:
        """Close the progress bar; log tensors the model did not use (``ignore`` are regexes
        of names skipped on purpose, e.g. DeepSeek's MTP layer). A pipeline stage reads
        only its layers, so it passes ``report_unused=False``."""
        self.close_progress()
        if not report_unused:
            self._handles.clear()
            return
        patterns = [re.compile(p) for p in ignore]
        unused = [n for n in self._files if n not in self._used]
        skipped = [n for n in unused if any(p.match(n) for p in patterns)]
        if skipped:
            logger.info("skipped %d tensors on purpose (%s...)", len(skipped), skipped[0])
        others = [n for n in unused if n not in skipped]
        if others:
            logger.warning("%d checkpoint tensors were not used, e.g. %s", len(others), others[:3])
        self._handles.clear()


def read_shard(
    read: Callable[[tuple[slice, ...]], torch.Tensor],
    full: tuple[int, ...],
    shard: Shard,
    what: str,
) -> torch.Tensor:
    """Rows ``[start, stop)`` of dimension ``shard.dim`` of a tensor of shape ``full``, read
    with ``read(index)``; a shard running past the end is zero-padded to ``shard.size``.
    ``what`` names the tensor in errors."""
    if shard.dim >= len(full) or shard.start >= full[shard.dim]:
        raise CheckpointError(
            f"{what} of shape {full} has no rows {shard.start}: along dim {shard.dim}"
        )
    index = [slice(None)] * len(full)
    index[shard.dim] = slice(shard.start, min(shard.stop, full[shard.dim]))
    try:
        tensor = read(tuple(index))
    except Exception as exc:
        raise CheckpointError(f"{what}: cannot read a slice: {exc}") from exc
    missing = shard.stop - full[shard.dim]
    if missing > 0:
        pad = list(tensor.shape)
        pad[shard.dim] = missing
        tensor = torch.cat([tensor, tensor.new_zeros(pad)], dim=shard.dim)
    return tensor


def _check_fp8_shard(path: Path, name: str, shape: tuple[int, int], shard: Shard) -> None:
    """CheckpointError unless ``shard`` of an FP8 block weight falls on its 128 blocks."""
    size = shape[shard.dim]
    aligned = shard.start % FP8_BLOCK_SIZE == 0 and (
        shard.stop % FP8_BLOCK_SIZE == 0 or shard.stop == size
    )
    if aligned and shard.stop <= size:
        return
    what = "rows" if shard.dim == 0 else "columns"
    raise CheckpointError(
        f"{path}: FP8 block weight {name!r} {tuple(shape)} cannot be split for tensor "
        f"parallelism: this rank's {what} [{shard.start}, {shard.stop}) do not start and end on "
        f"the {FP8_BLOCK_SIZE}-wide scale blocks. Choose a --tp that cuts {what} into multiples "
        f"of {FP8_BLOCK_SIZE} ({size} {what} in all), or serve a bf16 checkpoint"
    )


def load_model(
    path: str | Path,
    ops: Any,
    dtype: torch.dtype | None = None,
    quantize: str | None = None,
    show_progress: bool = True,
    device: torch.device | None = None,
    parallel: ModelParallel | None = None,
) -> tuple[torch.nn.Module, dict[str, Any]]:
    """Build the model of an HF checkpoint directory or a GGUF file on ``ops``'s backend.

    Args:
        path: directory with ``config.json`` and ``*.safetensors``; or a ``.gguf`` file (or a
            directory holding just one), its config and tensors mapped by ``chitu_core/gguf``.
        ops: the bound backend ``Ops``.
        dtype: compute dtype (default: the backend's ``compute_dtype``).
        quantize: ``"fp8"`` to quantize bf16 linear weights to FP8 block-128 at load.
        device: where the weights go (default: ``ops.device(0)``).
        parallel: this rank's TP/PP plan (default: one process); the model reads
            only its shards and its stage's layers.

    Returns ``(model, config)``. Raises ``CheckpointError`` naming the file and tensor
    for a bad checkpoint, and for an unsupported ``model_type``.
    """
    from chitu_core.models.registry import model_class

    gguf_path = find_gguf(path)
    if gguf_path is None:
        config = read_config(path)
        config_path = Path(path) / "config.json"
    else:
        from chitu_core.gguf.checkpoint import GGUFCheckpoint, GGUFCheckpointReader

        checkpoint = GGUFCheckpoint.open(gguf_path)
        config, config_path = checkpoint.config, gguf_path
    cls = model_class(config, config_path)
    dtype = dtype or getattr(torch, ops.info.compute_dtype)
    device = device or ops.device(0)
    # The model parses its config before the progress bar starts: a config error is
    # printed on a line of its own, with the file's path.
    try:
        model = cls(config, ops, dtype, device, parallel or ModelParallel())
    except ConfigFieldError as exc:
        raise ConfigFieldError(f"{config_path}: {exc}") from None
    except ValueError as exc:  # the config's own checks (a field out of range, inconsistent)
        raise CheckpointError(f"{config_path}: {exc}") from exc
    if gguf_path is None:
        reader = CheckpointReader(path, ops, dtype, device, quantize, show_progress)
    else:
        reader = GGUFCheckpointReader(checkpoint, ops, dtype, device, quantize, show_progress)
    try:
        with torch.no_grad():
            model.load(reader)
    except BaseException:
        reader.close_progress()  # ends the bar's line before the error is printed
        raise
    reader.finish(
        getattr(model, "skipped_weights", ()),
        report_unused=parallel is None or parallel.pp_size == 1,
    )
    return model, config
