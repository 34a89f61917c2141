"""Single-device face backbones behind a registry: ``create_backbone("iresnet50")``.

Every backbone maps float images ``[N, 3, 112, 112]`` (RGB, ``(x - 127.5) / 127.5``) to embeddings
``[N, embedding_size]``. See docs/models.md.

The families register themselves when imported, and this package imports them (as timm does): the
registry knows nothing of the families, the families import the registry and ``layers``, never each other.
"""

from distrib_face.models import iresnet, mobilefacenet, vit  # noqa: F401  (registration)
from distrib_face.models.io import BackboneFileError, load_backbone, save_backbone
from distrib_face.models.registry import (
    UnknownBackboneError,
    create_backbone,
    is_backbone,
    list_backbones,
    register_backbone,
)

__all__ = [
    "BackboneFileError",
    "UnknownBackboneError",
    "create_backbone",
    "is_backbone",
    "list_backbones",
    "load_backbone",
    "register_backbone",
    "save_backbone",
]
