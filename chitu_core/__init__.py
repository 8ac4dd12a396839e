"""Chitu core: models, engine, hook contract."""

__version__ = "0.1.0"
