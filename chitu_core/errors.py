"""Every exception Chitu raises on purpose, with messages that say what to do next."""

from __future__ import annotations


class ChituError(Exception):
    """Base class of Chitu's own errors."""


class UnknownBackendError(ChituError):
    """``--backend NAME`` names no installed backend."""


class BackendUnavailableError(ChituError):
    """The backend is installed but cannot run here (no device, missing driver...)."""


class PluginLoadError(ChituError):
    """A backend's entry point failed to import or to register."""


class PluginSignatureError(PluginLoadError):
    """A hook implementation's arguments do not match its spec in ``chitu_core/hookspecs.py``."""


class ContractVersionError(PluginLoadError):
    """A plugin's ``BackendInfo.contract`` range excludes this Chitu's hook contract version
    (the message names the hooks changed since the plugin's versions)."""


class CheckpointError(ChituError):
    """A model directory is missing, corrupt or does not match its config (names file and tensor)."""


class UnsupportedModelError(CheckpointError):
    """``config.json`` names a ``model_type``/architecture Chitu does not implement."""


class TokenizerError(ChituError):
    """tokenizer.json / tokenizer_config.json missing or invalid, or no chat template."""


class ConfigFieldError(CheckpointError, ValueError):
    """A config.json field is missing or of the wrong type (names the field; the loader adds
    the file)."""


class GGUFError(CheckpointError):
    """A GGUF checkpoint Chitu cannot use (base of the GGUF errors below)."""


class CorruptGGUFError(GGUFError):
    """The file is not a readable GGUF: bad magic, truncated, or a header that lies about sizes."""


class UnsupportedGGUFArchitectureError(GGUFError, UnsupportedModelError):
    """``general.architecture`` names an architecture the GGUF mapping table lacks."""


class UnsupportedGGUFQuantError(GGUFError):
    """A tensor is stored in a GGML type Chitu cannot dequantize (message lists the supported)."""
