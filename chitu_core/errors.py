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
