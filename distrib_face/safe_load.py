"""The one way this package reads a ``torch.save`` file: ``torch.load(weights_only=True)``, never unrestricted.

Every file distrib_face writes with ``torch.save`` (checkpoints, backbone files, classifier shards, RNG
states) holds only tensors and plain values (None, bool, int, float, str, torch dtypes, and lists / tuples /
dicts of them), so the restricted unpickler of ``weights_only=True`` reads it. A file that needs more --
a pickled class, a function call (``__reduce__``) -- was not written by us: it is refused before anything
in it runs, with :class:`UnsafeFileError` naming the file and what it asked for. The error never suggests
``weights_only=False`` (torch's own message does: that is exactly the load that could run code).

This module is a leaf: it imports nothing of distrib_face, so every layer may use it.
"""

from __future__ import annotations

import os
import pickle
import re
import zipfile
from pathlib import Path
from typing import Any

import torch

__all__ = ["UnsafeFileError", "safe_torch_load"]

# torch's WeightsUnpickler explains the refusal on a line of its own, e.g.
# "Trying to load unsupported GLOBAL posix.system whose module posix is blocked.",
# "Unsupported global: GLOBAL builtins.print was not an allowed global by default. Please use ..." or
# "Unsupported operand 149". Only the name of what the file asked for is kept (never torch's advice to allow it).
_GLOBAL = re.compile(r"(?:Trying to load unsupported GLOBAL|Unsupported global: GLOBAL) ([\w.]+)")
_OPCODE = re.compile(r"Unsupported operand (\d+)")
_CLASS = re.compile(r"Unsupported class ([\w.]+)")


class UnsafeFileError(ValueError):
    """A file asked for more than tensors and plain values (it would need an unrestricted unpickler).

    Bad input: exit code 2 at the entry points."""

    exit_code = 2

    def __init__(self, path: str | os.PathLike, reason: str) -> None:
        self.path = Path(path)
        self.reason = reason
        super().__init__(
            f"{self.path}: refused to load: it holds pickled objects that are not tensors or plain values "
            f"({reason}); loading it without restriction could run code. Files written by distrib_face never "
            "need that, so this one was modified or comes from another program"
        )


def _reason(err: BaseException) -> str:
    text = str(err)
    for pattern, template in ((_GLOBAL, "it asks for the global {}"), (_CLASS, "it asks for the class {}"),
                              (_OPCODE, "pickle opcode {}, which the restricted reader does not accept")):
        match = pattern.search(text)
        if match:  # opcode 149 is FRAME: pickle protocol 4, which torch.save (protocol 2) never writes
            return template.format(match.group(1))
    return type(err).__name__


def safe_torch_load(path: str | os.PathLike, *, mmap: bool = False) -> Any:
    """``torch.load(path, map_location="cpu", weights_only=True)``, with a refusal that names the file.

    Args:
        path: the file.
        mmap: map the tensors' storage instead of reading it (large classifier shards).

    Raises:
        UnsafeFileError: the file needs an unrestricted unpickler (it would import or call something).
        OSError, RuntimeError, ...: the file is missing or not a torch file (torch's own errors; callers
            wrap them with the file named).
    """
    if mmap and not zipfile.is_zipfile(path):
        mmap = False  # torch maps only its zip format; anything else is read (and judged) the plain way
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as err:
        if "Weights only load failed" not in str(err):
            raise  # a damaged pickle, not a refused one
        raise UnsafeFileError(path, _reason(err)) from err
