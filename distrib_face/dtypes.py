"""The one map from the dtype names of configs and command lines to torch dtypes.

A leaf module: it imports nothing of distrib_face, so every layer may use it.
"""

from __future__ import annotations

import torch

DTYPES: dict[str, torch.dtype] = {
    "fp32": torch.float32, "float32": torch.float32,
    "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
    "fp16": torch.float16, "float16": torch.float16,
    "fp64": torch.float64, "float64": torch.float64,
}
"""Accepted names (short config names and torch's own) and their torch dtypes."""

SHORT_NAMES: dict[torch.dtype, str] = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16",
                                       torch.float64: "fp64"}


def parse_dtype(name: str | torch.dtype, what: str = "dtype") -> torch.dtype:
    """The torch dtype for ``name`` (``"bf16"``, ``"float32"``, or a dtype, returned as is).

    Raises:
        ValueError: an unknown name; the message names ``what`` and the value.
    """
    if isinstance(name, torch.dtype):
        return name
    try:
        return DTYPES[str(name)]
    except KeyError:
        raise ValueError(f"{what} must be one of {sorted(DTYPES)}, got {name!r}") from None


def short_name(dtype: torch.dtype) -> str:
    """``"fp32"`` / ``"bf16"`` / ``"fp16"`` / ``"fp64"`` for a floating dtype (``str(dtype)`` otherwise)."""
    return SHORT_NAMES.get(dtype, str(dtype).removeprefix("torch."))
