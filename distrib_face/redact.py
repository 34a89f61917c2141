"""The one redaction of secrets, for every place a config or a line of text leaves the process.

Everything that is written, logged or handed to another system goes through :func:`redact` (a structure:
a config dict, a DeepSpeed config, a summary) or :func:`redact_text` (a string: a log line, an error
message, a URI):

- the value of every key that :func:`is_secret_key` flags (``password``, ``token``, ``secret``, ``api_key``,
  ...) becomes ``"[REDACTED]"``, at any depth, a whole sub-mapping too;
- the password of every ``scheme://user:password@host`` URL becomes ``[REDACTED]``;
- in text, ``key=value`` / ``"key": "value"`` pairs whose key is a secret are masked, and so is every secret
  value registered with :func:`register_secrets` (the entry points register the config's secrets, so that a
  library printing the config in its own format -- DeepSpeed's "DeepSpeedEngine configuration" dump --
  cannot leak them either).

:func:`install_log_redaction` makes every log record of the process pass through :func:`redact_text`
(a log-record factory, so records of libraries with their own handlers are covered too).

:func:`split_secrets` / :func:`restore_secrets` let a config travel redacted through systems that record
what they carry (Ray Train keeps ``train_loop_config`` in its dashboard state) while the secret values go
separately to the processes that need them.

Pure Python, a leaf like ``distrib_face.atomic``: it imports nothing of distrib_face, so every layer may use it.
"""

from __future__ import annotations

import dataclasses
import logging
import re
import threading
from collections.abc import Iterable, Mapping
from typing import Any

__all__ = [
    "REDACTED",
    "install_log_redaction",
    "is_secret_key",
    "redact",
    "redact_text",
    "redact_value",
    "register_secrets",
    "restore_secrets",
    "secret_values",
    "split_secrets",
]

#: What replaces a secret.
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
# key=value, key: value, "key": "value", 'key'='value' (JSON, YAML, Python reprs, command lines).
_KEY_VALUE = re.compile(
    r"""(?P<key>["']?[A-Za-z_][\w.\-]*["']?)(?P<sep>\s*[:=]\s*)(?P<value>"[^"\n]*"|'[^'\n]*'|[^\s,;'"}\])]+)"""
)
# Shorter registered values are not masked in free text: "abc" would blank out every word containing it.
_MIN_SECRET_LENGTH = 4

_registered: set[str] = set()
_registered_lock = threading.Lock()


def is_secret_key(key: str) -> bool:
    """Whether ``key`` (one config field name, or a dotted path) names something that must not be logged.

    A key is secret when one of its words (split at non-alphanumerics and camelCase boundaries) is one of
    password, passwd, pass, pwd, passphrase, secret(s), token, credential(s), key, apikey, accesskey, secretkey,
    privatekey, authtoken, authorization.
    """
    words = [word.lower() for word in _WORD_SPLIT.split(str(key)) if word]
    return any(word in _SECRET_WORDS for word in words)


def redact_text(text: str) -> str:
    """``text`` with URL passwords, secret ``key=value`` pairs and every registered secret value masked."""
    if not isinstance(text, str) or not text:
        return text
    out = _URL_PASSWORD.sub(lambda m: f"{m.group('head')}{REDACTED}{m.group('tail')}", text)
    out = _KEY_VALUE.sub(_mask_pair, out)
    with _registered_lock:
        values = sorted(_registered, key=len, reverse=True)  # longest first: a secret containing another
    for value in values:
        if value in out:
            out = out.replace(value, REDACTED)
    return out


#: The name older callers use; the same function.
redact_value = redact_text


def _mask_pair(match: re.Match[str]) -> str:
    key = match.group("key").strip("\"'")
    if not is_secret_key(key):
        return match.group(0)
    value = match.group("value")
    if value.strip("\"'") in ("", "None", "null", REDACTED):
        return match.group(0)
    quote = value[0] if value[0] in "\"'" else ""
    return f"{match.group('key')}{match.group('sep')}{quote}{REDACTED}{quote}"


def redact(obj: Any) -> Any:
    """Return a copy of ``obj`` with secrets obfuscated, at any depth.

    Mappings: the value of every key that :func:`is_secret_key` flags becomes ``"[REDACTED]"`` (a whole
    sub-mapping too, e.g. ``credentials: {...}``; ``None`` and empty values stay as they are, so a reader
    still sees that nothing was set); strings anywhere pass through :func:`redact_text`; lists and tuples
    are walked; dataclasses are converted with ``dataclasses.asdict``. Other values are returned as they
    are. The input is not modified.
    """
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        obj = dataclasses.asdict(obj)
    if isinstance(obj, Mapping):
        return {
            key: (REDACTED if is_secret_key(str(key)) and not _is_empty(value) else redact(value))
            for key, value in obj.items()
        }
    if isinstance(obj, (list, tuple)):
        return type(obj)(redact(value) for value in obj)
    if isinstance(obj, str):
        return redact_text(obj)
    return obj


def _is_empty(value: Any) -> bool:
    return value is None or value == "" or (isinstance(value, (Mapping, list, tuple)) and not value)


def secret_values(obj: Any) -> set[str]:
    """Every secret string inside ``obj``: the leaves under secret keys and the passwords of URLs."""
    found: set[str] = set()

    def walk(node: Any, secret: bool) -> None:
        if dataclasses.is_dataclass(node) and not isinstance(node, type):
            node = dataclasses.asdict(node)
        if isinstance(node, Mapping):
            for key, value in node.items():
                walk(value, secret or is_secret_key(str(key)))
        elif isinstance(node, (list, tuple)):
            for value in node:
                walk(value, secret)
        elif node is not None and not isinstance(node, bool):
            text = str(node)
            if secret and text:
                found.add(text)
            found.update(m.group("password") for m in _URL_PASSWORD.finditer(text))

    walk(obj, False)
    return {value for value in found if value != REDACTED}


def register_secrets(obj: Any) -> set[str]:
    """Remember the secrets of ``obj`` (a config) so that :func:`redact_text` masks them in any text.

    Returns the values registered (those of at least 4 characters).
    """
    values = {value for value in secret_values(obj) if len(value) >= _MIN_SECRET_LENGTH}
    with _registered_lock:
        _registered.update(values)
    return values


Path = tuple[Any, ...]


def split_secrets(obj: Mapping[str, Any]) -> tuple[dict[str, Any], list[tuple[Path, Any]]]:
    """``(redact(obj), secrets)``: the redacted copy and what :func:`restore_secrets` needs to undo it.

    ``secrets`` lists ``(path, original value)`` for every place the redaction changed, a path being the
    keys (and list indices) from the top. Send the redacted copy where things are recorded and the
    secrets by a channel that is not (an object in Ray's object store, the environment, a 0600 file).
    """
    redacted = redact(obj)
    secrets: list[tuple[Path, Any]] = []

    def diff(original: Any, masked: Any, path: Path) -> None:
        if isinstance(original, Mapping) and isinstance(masked, Mapping):
            for key in original:
                diff(original[key], masked[key], (*path, key))
        elif isinstance(original, (list, tuple)) and isinstance(masked, (list, tuple)):
            for index, (a, b) in enumerate(zip(original, masked)):
                diff(a, b, (*path, index))
        elif original != masked:
            secrets.append((path, original))

    diff(dataclasses.asdict(obj) if dataclasses.is_dataclass(obj) else obj, redacted, ())
    return redacted, secrets


def restore_secrets(redacted: Mapping[str, Any], secrets: Iterable[tuple[Path, Any]]) -> dict[str, Any]:
    """The inverse of :func:`split_secrets`: a copy of ``redacted`` with the original values put back (the
    input is not modified; lists stay lists and tuples tuples)."""
    out: Any = redacted
    for path, value in secrets:
        out = _put(out, path, value)
    return dict(out) if out is redacted else out


def _put(node: Any, path: Path, value: Any) -> Any:
    """A copy of ``node`` with ``value`` at ``path`` (only the containers along the path are copied)."""
    if not path:
        return value
    key, rest = path[0], path[1:]
    if isinstance(node, Mapping):
        copy = dict(node)
        copy[key] = _put(node[key], rest, value)
        return copy
    items = list(node)
    items[key] = _put(items[key], rest, value)
    return type(node)(items) if isinstance(node, tuple) else items


_installed = False


def install_log_redaction(config: Any = None) -> None:
    """Pass every log record of this process through :func:`redact_text`; register ``config``'s secrets.

    It replaces the log-record factory (once per process), so records are cleaned when they are made,
    whichever logger, handler or formatter later prints them (DeepSpeed's logger has a stdout handler of
    its own). The message is formatted eagerly for that, and the traceback text of a record with
    ``exc_info`` is formatted and cleaned too. Call it from entry points and worker functions, after
    logging is configured; calling it again only registers more secrets.
    """
    global _installed
    if config is not None:
        register_secrets(config)
    with _registered_lock:
        if _installed:
            return
        _installed = True
    previous = logging.getLogRecordFactory()
    formatter = logging.Formatter()

    def factory(*args: Any, **kwargs: Any) -> logging.LogRecord:
        record = previous(*args, **kwargs)
        try:
            message = record.getMessage()
        except Exception:  # a bad format string: let logging report it the usual way
            return record
        clean = redact_text(message)
        if clean != message:
            record.msg, record.args = clean, None
        if record.exc_info and not record.exc_text:
            record.exc_text = redact_text(formatter.formatException(record.exc_info))
        return record

    logging.setLogRecordFactory(factory)
