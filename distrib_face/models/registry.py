"""The backbone registry: ``@register_backbone`` and ``create_backbone(name, ...)``, timm-style.

A backbone is a single-device ``nn.Module`` mapping float images ``[N, 3, S, S]`` (RGB, normalised as
``(x - 127.5) / 127.5``; ``S`` is the ``input_size`` keyword, 112 by default) to embeddings
``[N, embedding_size]``. Every factory registered here accepts ``embedding_size``, ``dropout`` and
``input_size`` keywords, so that ``create_backbone`` can pass them uniformly.
"""

from __future__ import annotations

import inspect
import typing
from typing import Any, Callable, TypeVar

import torch
from torch import nn

BackboneFactory = Callable[..., nn.Module]
_F = TypeVar("_F", bound=BackboneFactory)

_REGISTRY: dict[str, BackboneFactory] = {}


class UnknownBackboneError(KeyError):
    """Raised when a backbone name is not in the registry; the message lists the known names."""

    def __str__(self) -> str:  # KeyError quotes its argument; show the sentence as written
        return str(self.args[0])


def register_backbone(fn: _F) -> _F:
    """Register a backbone factory under its function name.

    Args:
        fn: a function ``fn(embedding_size=..., dropout=..., input_size=..., **kw) -> nn.Module``.

    Returns:
        ``fn`` unchanged, so this works as a decorator.

    Raises:
        ValueError: if a factory of the same name is already registered.
    """
    name = fn.__name__
    if name in _REGISTRY and _REGISTRY[name] is not fn:
        raise ValueError(f"backbone {name!r} is already registered (by {_REGISTRY[name].__module__})")
    _REGISTRY[name] = fn
    return fn


def list_backbones() -> list[str]:
    """Names of every registered backbone, sorted."""
    return sorted(_REGISTRY)


def is_backbone(name: str) -> bool:
    """Whether ``name`` is a registered backbone."""
    return name in _REGISTRY


def backbone_options(name: str) -> list[str] | None:
    """The keyword arguments ``create_backbone(name, **kwargs)`` accepts, read from the factory's signature.

    A factory that forwards ``**kwargs`` to the class it returns (``-> IResNet``) accepts that class's
    keyword-only parameters too. ``None`` when that cannot be known (``**kwargs`` without a class return
    annotation): every keyword may be valid.

    Raises:
        UnknownBackboneError: if ``name`` is not registered.
    """
    if name not in _REGISTRY:
        raise UnknownBackboneError(f"unknown backbone {name!r}; registered: {', '.join(sorted(_REGISTRY))}")
    factory = _REGISTRY[name]
    params = inspect.signature(factory).parameters.values()
    names = {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    if any(p.kind is p.VAR_KEYWORD for p in params):
        try:
            built = typing.get_type_hints(factory).get("return")
        except Exception:  # noqa: BLE001 - an annotation that does not resolve: nothing to follow
            built = None
        if not isinstance(built, type):
            return None
        names |= {p.name for p in inspect.signature(built).parameters.values() if p.kind is p.KEYWORD_ONLY}
    return sorted(names)


def create_backbone(
    name: str,
    embedding_size: int = 512,
    dropout: float = 0.0,
    *,
    channels_last: bool = False,
    **kwargs: Any,
) -> nn.Module:
    """Build a registered backbone.

    Args:
        name: a name from ``list_backbones()``, e.g. ``"iresnet50"``, ``"mobilefacenet"``, ``"vit_t"``.
        embedding_size: size of the output embedding.
        dropout: dropout probability before the embedding layer (active in training mode only).
        channels_last: convert parameters to ``torch.channels_last`` memory format (feed channels-last
            inputs too for the fast convolution kernels on GPU).
        **kwargs: passed to the factory: ``input_size`` (image side, default 112), and per-family
            options such as ``gradient_checkpointing`` for iresnet.

    Returns:
        The backbone, in training mode, fp32, on the default device.

    Raises:
        UnknownBackboneError: if ``name`` is not registered.
    """
    if name not in _REGISTRY:
        raise UnknownBackboneError(f"unknown backbone {name!r}; registered: {', '.join(sorted(_REGISTRY))}")
    model = _REGISTRY[name](embedding_size=embedding_size, dropout=dropout, **kwargs)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model

