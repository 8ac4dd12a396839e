"""GGUF checkpoints (llama.cpp's single-file format), read through the ``gguf`` package.

``find_gguf`` says whether a model path is one; ``chitu_core.gguf.checkpoint`` builds the
config and the tensor reader the loader uses, ``chitu_core.gguf.tokenizer`` the tokenizer.
"""

from __future__ import annotations

from pathlib import Path

from chitu_core.errors import CheckpointError

GGUF_SUFFIX = ".gguf"


def find_gguf(path: str | Path) -> Path | None:
    """The GGUF file a model path names, or None for an HF-format directory.

    A file is taken as GGUF whatever its name (the reader says so if it is not one); a
    directory without ``config.json`` that holds exactly one ``*.gguf`` names that file.

    Raises:
        CheckpointError: the directory holds several ``*.gguf`` files (name the one to load).
    """
    path = Path(path)
    if path.is_file():
        return path
    if not path.is_dir() or (path / "config.json").is_file():
        return None
    found = sorted(path.glob(f"*{GGUF_SUFFIX}"))
    if len(found) > 1:
        names = ", ".join(p.name for p in found)
        raise CheckpointError(
            f"{path} holds {len(found)} GGUF files ({names}): pass the path of the one to load"
        )
    return found[0] if found else None
