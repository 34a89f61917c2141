"""Turning configs into MLflow params: flatten nested sections, stringify, truncate, and redact secrets.

Everything here is pure Python (no MLflow import), so the rules can be tested and reused by any tracker.
The redaction itself is :mod:`distrib_face.redact` (its names are re-exported here).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from typing import Any

from distrib_face.redact import REDACTED, is_secret_key, redact, redact_text, redact_value

__all__ = [
    "MAX_KEY_LENGTH", "MAX_PARAM_VALUE_LENGTH", "MAX_TAG_VALUE_LENGTH", "REDACTED", "flatten_params", "is_secret_key",
    "redact", "redact_text", "redact_value", "stringify", "truncate",
]

#: MLflow's limits (``mlflow.utils.validation``): longer values are rejected by the server.
MAX_PARAM_VALUE_LENGTH = 6000
MAX_TAG_VALUE_LENGTH = 8000
MAX_KEY_LENGTH = 250


def truncate(value: str, limit: int) -> str:
    """Cut ``value`` to at most ``limit`` characters, marking the cut with a trailing "..."."""
    if len(value) <= limit:
        return value
    return value[: limit - 3] + "..."


def stringify(value: Any) -> str:
    """How a config value reads as an MLflow param: lists/tuples as JSON (``[112, 112]``), others via str."""
    if isinstance(value, (list, tuple)):
        return json.dumps(list(value), default=str)
    return str(value)


def flatten_params(config: Mapping[str, Any] | Any, prefix: str = "", separator: str = ".") -> dict[str, str]:
    """Flatten a nested config into ``{"section.field": "value"}`` string params, secrets redacted.

    Args:
        config: a (nested) mapping, or a dataclass (converted with ``dataclasses.asdict``).
        prefix: prepended to every key (``prefix + separator + key``); empty for none.
        separator: joins the levels of a key.

    Returns:
        One entry per leaf. Lists and tuples are JSON strings (not flattened), empty mappings read "{}",
        values are cut at MLflow's 6000-character limit, and values of secret-looking keys
        (:func:`is_secret_key`) are replaced by ``"[REDACTED]"``.

    Raises:
        TypeError: when ``config`` is neither a mapping nor a dataclass instance.
        ValueError: when a flattened key exceeds MLflow's 250-character key limit.
    """
    if dataclasses.is_dataclass(config) and not isinstance(config, type):
        config = dataclasses.asdict(config)
    if not isinstance(config, Mapping):
        raise TypeError(f"flatten_params expects a mapping or a dataclass, got {type(config).__name__}: {config!r}")
    flat: dict[str, str] = {}
    _flatten_into(flat, redact(config), prefix, separator)
    for key in flat:
        if len(key) > MAX_KEY_LENGTH:
            raise ValueError(f"param key {key!r} is {len(key)} characters, over MLflow's limit of {MAX_KEY_LENGTH}")
    return flat


def _flatten_into(flat: dict[str, str], node: Mapping[str, Any], prefix: str, separator: str) -> None:
    for key, value in node.items():
        name = f"{prefix}{separator}{key}" if prefix else str(key)
        if isinstance(value, Mapping) and value:
            _flatten_into(flat, value, name, separator)
        elif isinstance(value, Mapping):
            flat[name] = "{}"
        else:
            flat[name] = truncate(stringify(value), MAX_PARAM_VALUE_LENGTH)
