"""Typed reads of config.json fields whose errors name the field and what was expected.

``int(config["num_hidden_layers"])`` on ``"three"`` says ``invalid literal for int()``
and nothing else; ``ConfigFields(config).int("num_hidden_layers")`` says which field,
what it holds and what it should hold. The loader adds the file's path.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from chitu_core.errors import ConfigFieldError

_MISSING: Any = object()


class ConfigFields:
    """Typed accessors over a config.json dict. Each raises ``ConfigFieldError`` naming
    the field when it is absent (and has no default) or holds the wrong type."""

    def __init__(self, config: Mapping[str, Any]) -> None:
        self.config = config

    def _raw(self, name: str, default: Any) -> tuple[Any, bool]:
        """(value, present): a JSON null counts as absent, as HF's config classes read it."""
        value = self.config.get(name)
        if value is None:
            if default is _MISSING:
                raise ConfigFieldError(f"field {name!r} is missing (it is required)")
            return default, False
        return value, True

    def int(self, name: str, default: Any = _MISSING, minimum: int | None = None) -> Any:
        """An integer field (JSON integers only; ``true`` or ``2.5`` are refused)."""
        value, present = self._raw(name, default)
        if not present:
            return value
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigFieldError(f"field {name!r} must be an integer, got {value!r}")
        if minimum is not None and value < minimum:
            raise ConfigFieldError(f"field {name!r} must be >= {minimum}, got {value}")
        return value

    def float(self, name: str, default: Any = _MISSING) -> Any:
        """A finite number field (an integer is accepted)."""
        value, present = self._raw(name, default)
        if not present:
            return value
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigFieldError(f"field {name!r} must be a number, got {value!r}")
        if not math.isfinite(value):
            raise ConfigFieldError(f"field {name!r} must be finite, got {value!r}")
        return float(value)

    def bool(self, name: str, default: Any = _MISSING) -> Any:
        """A JSON ``true``/``false`` field."""
        value, present = self._raw(name, default)
        if not present:
            return value
        if not isinstance(value, bool):
            raise ConfigFieldError(f"field {name!r} must be true or false, got {value!r}")
        return value

    def str(self, name: str, default: Any = _MISSING, choices: tuple[str, ...] = ()) -> Any:
        """A string field, one of ``choices`` when given."""
        value, present = self._raw(name, default)
        if not present:
            return value
        if not isinstance(value, str):
            raise ConfigFieldError(f"field {name!r} must be a string, got {value!r}")
        if choices and value not in choices:
            raise ConfigFieldError(f"field {name!r} must be one of {list(choices)}, got {value!r}")
        return value
