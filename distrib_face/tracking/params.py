"""Turning configs into MLflow params: flatten nested sections, stringify, truncate, and redact secrets.

Everything here is pure Python (no MLflow import), so the rules can be tested and reused by any tracker.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Mapping
from typing import Any

#: MLflow's limits (``mlflow.utils.validation``): longer values are rejected by the server.
MAX_PARAM_VALUE_LENGTH = 6000
MAX_TAG_VALUE_LENGTH = 8000
MAX_KEY_LENGTH = 250

#: What replaces the value of a key that looks like a secret.
REDACTED = "[REDACTED]"

# Words that mark a key as a secret when they appear as a whole word of the key ("db_password",
# "apiKey", "aws.secret_access_key"); "num_tokens" or "keep_last" are not secrets.
_SECRET_WORDS = frozenset(
    {
        "password", "passwd", "pass", "pwd", "passphrase", "secret", "secrets", "token", "credential", "credentials",
        "key", "apikey", "accesskey", "secretkey", "privatekey", "authtoken", "authorization",
    }
)
_WORD_SPLIT = re.compile(r"[^0-9a-zA-Z]+|(?<=[a-z0-9])(?=[A-Z])")
# "scheme://user:password@host" - the password part of a URL.
_URL_PASSWORD = re.compile(r"(?P<head>[a-zA-Z][a-zA-Z0-9+.-]*://[^/\s:@]+:)(?P<password>[^@/\s]+)(?P<tail>@)")


def is_secret_key(key: str) -> bool:
    """Whether ``key`` (one config field name, or a dotted path) names something that must not be logged.

    A key is secret when one of its words (split at non-alphanumerics and camelCase boundaries) is one of
    password, passwd, pass, pwd, passphrase, secret(s), token, credential(s), key, apikey, accesskey, secretkey,
    privatekey, authtoken, authorization.
    """
    words = [word.lower() for word in _WORD_SPLIT.split(str(key)) if word]
    return any(word in _SECRET_WORDS for word in words)


def redact_value(value: str) -> str:
    """Mask the password of any ``scheme://user:password@host`` URL inside ``value``."""
    return _URL_PASSWORD.sub(lambda m: f"{m.group('head')}{REDACTED}{m.group('tail')}", value)


def redact(obj: Any) -> Any:
    """Return a copy of ``obj`` with secrets obfuscated, at any depth.

    Mappings: the value of every key that :func:`is_secret_key` flags becomes ``"[REDACTED]"`` (a whole
    sub-mapping too, e.g. ``credentials: {...}``); strings anywhere have URL passwords masked; lists and
    tuples are walked. Other values are returned as they are. The input is not modified.
    """
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        obj = dataclasses.asdict(obj)
    if isinstance(obj, Mapping):
        return {key: (REDACTED if is_secret_key(str(key)) else redact(value)) for key, value in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(redact(value) for value in obj)
    if isinstance(obj, str):
        return redact_value(obj)
    return obj


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
