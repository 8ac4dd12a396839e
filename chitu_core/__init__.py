"""Chitu core: models, engine, hook contract."""

__version__ = "0.2.0"
