"""Single-device face backbones behind a registry: ``create_backbone("iresnet50")``.

Every backbone maps float images ``[N, 3, 112, 112]`` (RGB, ``(x - 127.5) / 127.5``) to embeddings
``[N, embedding_size]``. See docs/models.md.
"""

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
