"""IJB-B / IJB-C style 1:1 template verification from insightface's protocol files.

The layout (as insightface distributes IJB-B / IJB-C for evaluation), under a root folder::

    meta/<target>_face_tid_mid.txt          image_name template_id media_id      (one line per image)
    meta/<target>_template_pair_label.txt   template_id_1 template_id_2 label    (label 1 = same person)
    meta/<target>_name_5pts_score.txt       image_name x1 y1 ... x5 y5 face_score (optional: alignment)
    loose_crop/<image_name>                 the images

A template's feature is the mean over its media of the mean over each medium's image features (frames
of one video count once), L2-normalised; a pair's score is the cosine of its two template features.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from PIL import Image

from distrib_face.data.decode import BadSample, decode_image, resize_rgb
from distrib_face.eval.metrics import (
    DEFAULT_FAR_TARGETS,
    VerificationResult,
    feature_norm_stats,
    l2_normalize,
    verification_metrics_from_scores,
)

logger = logging.getLogger(__name__)

# Five reference points (eyes, nose tip, mouth corners) of insightface's 112 x 112 aligned crops.
ARCFACE_LANDMARKS_112: np.ndarray = np.array(
    [[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366], [41.5493, 92.3655], [70.7299, 92.2041]],
    dtype=np.float64,
)


@dataclass
class IjbProtocol:
    """The parsed protocol files of one IJB target.

    Attributes:
        root: the folder holding ``meta/`` and ``loose_crop/``.
        target: ``ijbb`` or ``ijbc`` (the file-name prefix).
        image_names: [N] image file names, in the order of ``<target>_face_tid_mid.txt``.
        templates: [N] template id of each image.
        medias: [N] media id of each image.
        pair_templates: [P, 2] template ids of each pair.
        labels: [P] bool, whether the pair is genuine.
        landmarks: [N, 5, 2] five-point landmarks in the loose crops, or None when the file is absent.
        face_scores: [N] detector scores, or None when the file is absent.
    """

    root: Path
    target: str
    image_names: np.ndarray
    templates: np.ndarray
    medias: np.ndarray
    pair_templates: np.ndarray
    labels: np.ndarray
    landmarks: np.ndarray | None = None
    face_scores: np.ndarray | None = None


def _read_columns(path: Path, num_columns: int, what: str) -> list[list[str]]:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: IJB protocol file ({what}) not found")
    rows = []
    for line_no, line in enumerate(path.read_text().splitlines(), start=1):
        tokens = line.split()
        if not tokens:
            continue
        if len(tokens) != num_columns:
            raise ValueError(f"{path}:{line_no}: expected {num_columns} fields ({what}), got {len(tokens)}: {line!r}")
        rows.append(tokens)
    if not rows:
        raise ValueError(f"{path}: empty protocol file")
    return rows


def read_ijb_protocol(root: str | os.PathLike, target: str = "ijbc") -> IjbProtocol:
    """Read ``root/meta/<target>_*.txt`` (see the module docstring for the layout).

    Raises:
        FileNotFoundError: a required meta file is missing. ValueError: a malformed line (file and line named),
            a pair naming a template no image belongs to, or a landmark file that does not list the same
            images in the same order.
    """
    root, target = Path(root), target.lower()
    meta = root / "meta"
    rows = _read_columns(meta / f"{target}_face_tid_mid.txt", 3, "image_name template_id media_id")
    try:
        image_names = np.array([r[0] for r in rows])
        templates = np.array([int(r[1]) for r in rows], dtype=np.int64)
        medias = np.array([int(r[2]) for r in rows], dtype=np.int64)
        pair_rows = _read_columns(meta / f"{target}_template_pair_label.txt", 3, "template_1 template_2 label")
        pairs = np.array([[int(r[0]), int(r[1]), int(r[2])] for r in pair_rows], dtype=np.int64)
    except ValueError as err:
        raise ValueError(f"{meta}: non-integer template / media / label id: {err}") from err
    if not np.isin(pairs[:, 2], (0, 1)).all():
        raise ValueError(f"{meta}/{target}_template_pair_label.txt: labels must be 0 or 1")
    unknown = np.setdiff1d(pairs[:, :2], templates)
    if unknown.size:
        raise ValueError(f"{meta}/{target}_template_pair_label.txt: templates {unknown[:5].tolist()} have no image")
    landmarks = face_scores = None
    lmk_path = meta / f"{target}_name_5pts_score.txt"
    if lmk_path.is_file():
        lmk_rows = _read_columns(lmk_path, 12, "image_name 10 landmark coordinates face_score")
        if [r[0] for r in lmk_rows] != image_names.tolist():
            raise ValueError(f"{lmk_path}: image names differ from {target}_face_tid_mid.txt (order or content)")
        values = np.array([[float(v) for v in r[1:]] for r in lmk_rows], dtype=np.float64)
        landmarks, face_scores = values[:, :10].reshape(-1, 5, 2), values[:, 10]
    return IjbProtocol(
        root=root,
        target=target,
        image_names=image_names,
        templates=templates,
        medias=medias,
        pair_templates=pairs[:, :2],
        labels=pairs[:, 2].astype(bool),
        landmarks=landmarks,
        face_scores=face_scores,
    )


def template_features(
    image_features: np.ndarray,
    templates: np.ndarray,
    medias: np.ndarray,
    normalize_images: bool = False,
    image_weights: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Aggregate image features into L2-normalised template features.

    Args:
        image_features: [N, D] one feature per image.
        templates: [N] template id per image.
        medias: [N] media id per image (images of one video share it).
        normalize_images: L2-normalise image features first. Off by default, as in insightface's evaluation:
            the raw norm then acts as a quality weight.
        image_weights: [N] optional per-image weights applied before aggregation (e.g. detector scores).

    Returns:
        ``(template_ids [T], template_features [T, D])``: features are the normalised mean over media of the
        mean over each medium's images.
    """
    feats = np.asarray(image_features, dtype=np.float64)
    templates, medias = np.asarray(templates).reshape(-1), np.asarray(medias).reshape(-1)
    if not (feats.ndim == 2 and feats.shape[0] == templates.size == medias.size):
        raise ValueError(f"shapes disagree: features {feats.shape}, templates {templates.shape}, medias {medias.shape}")
    if normalize_images:
        feats = l2_normalize(feats)
    if image_weights is not None:
        feats = feats * np.asarray(image_weights, dtype=np.float64).reshape(-1, 1)
    # media means: group images by (template, media)
    keys = np.stack([templates, medias], axis=1)
    media_keys, media_index = np.unique(keys, axis=0, return_inverse=True)
    media_index = media_index.reshape(-1)
    media_sums = np.zeros((len(media_keys), feats.shape[1]))
    np.add.at(media_sums, media_index, feats)
    media_means = media_sums / np.bincount(media_index, minlength=len(media_keys))[:, None]
    # template means over their media
    template_ids, template_index = np.unique(media_keys[:, 0], return_inverse=True)
    template_sums = np.zeros((len(template_ids), feats.shape[1]))
    np.add.at(template_sums, template_index, media_means)
    template_means = template_sums / np.bincount(template_index, minlength=len(template_ids))[:, None]
    return template_ids, l2_normalize(template_means)


def template_pair_scores(
    template_ids: np.ndarray, template_feats: np.ndarray, pair_templates: np.ndarray, chunk_size: int = 100_000
) -> np.ndarray:
    """Cosine score of each template pair (template features already normalised), in chunks."""
    pair_templates = np.asarray(pair_templates)
    rows = np.searchsorted(template_ids, pair_templates)
    rows = np.minimum(rows, len(template_ids) - 1)
    if not (template_ids[rows] == pair_templates).all():
        missing = pair_templates[template_ids[rows] != pair_templates]
        raise ValueError(f"pairs name templates without features: {np.unique(missing)[:5].tolist()}")
    scores = np.empty(len(pair_templates))
    for start in range(0, len(pair_templates), chunk_size):
        part = rows[start:start + chunk_size]
        scores[start:start + chunk_size] = np.einsum("nd,nd->n", template_feats[part[:, 0]], template_feats[part[:, 1]])
    return scores


def evaluate_templates(
    image_features: np.ndarray,
    protocol: IjbProtocol,
    far_targets: Sequence[float] = DEFAULT_FAR_TARGETS,
    normalize_images: bool = False,
    use_face_scores: bool = True,
    nfolds: int = 10,
) -> VerificationResult:
    """TAR@FAR (and the other verification metrics) over the protocol's template pairs.

    Args:
        image_features: [N, D] raw features of the protocol's images, in its order.
        protocol: from :func:`read_ijb_protocol`.
        far_targets: FARs at which the TAR is reported (IJB-C's 15.6M impostor-heavy pairs reach 1e-6).
        normalize_images: see :func:`template_features`.
        use_face_scores: weight images by the detector score when the protocol has them (insightface's default).
        nfolds: folds of the (secondary) accuracy figure; at most the number of pairs.

    Returns:
        A :class:`VerificationResult` named after the target; its accuracy is the 10-fold accuracy over the
        template pairs (not an IJB metric; TAR@FAR is the figure to compare).
    """
    weights = protocol.face_scores if use_face_scores else None
    ids, feats = template_features(image_features, protocol.templates, protocol.medias, normalize_images, weights)
    scores = template_pair_scores(ids, feats, protocol.pair_templates)
    result = verification_metrics_from_scores(
        scores, protocol.labels, nfolds=min(nfolds, len(scores)), far_targets=far_targets, name=protocol.target
    )
    result.norm_stats = feature_norm_stats(image_features)
    return result


def similarity_transform(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """Least-squares similarity transform (rotation, uniform scale, translation) mapping ``src`` onto ``dst``.

    Umeyama's closed form (IEEE TPAMI 1991), as ``skimage.transform.SimilarityTransform.estimate``.

    Returns:
        [2, 3] matrix ``M`` with ``dst ~ M @ [x, y, 1]``.
    """
    src, dst = np.asarray(src, np.float64), np.asarray(dst, np.float64)
    src_mean, dst_mean = src.mean(0), dst.mean(0)
    src_c, dst_c = src - src_mean, dst - dst_mean
    cov = dst_c.T @ src_c / len(src)
    u, s, vt = np.linalg.svd(cov)
    d = np.ones(2)
    if np.linalg.det(cov) < 0:
        d[-1] = -1
    rotation = u @ np.diag(d) @ vt
    scale = (s * d).sum() / src_c.var(0).sum()
    matrix = np.zeros((2, 3))
    matrix[:, :2] = scale * rotation
    matrix[:, 2] = dst_mean - scale * rotation @ src_mean
    return matrix


def align_face(image: Image.Image, landmarks: np.ndarray, size: tuple[int, int] = (112, 112)) -> np.ndarray:
    """Warp a face so its five landmarks land on the ArcFace reference points; uint8 [H, W, 3] RGB.

    Args:
        image: the loose crop.
        landmarks: [5, 2] (x, y) in ``image`` pixels: left eye, right eye, nose, left and right mouth corner.
        size: output (height, width); the reference points are scaled from 112 x 112.
    """
    height, width = size
    reference = ARCFACE_LANDMARKS_112 * np.array([width / 112.0, height / 112.0])
    forward = np.vstack([similarity_transform(landmarks, reference), [0, 0, 1]])
    inverse = np.linalg.inv(forward)[:2]  # PIL maps output pixels back to input pixels
    warped = image.convert("RGB").transform(
        (width, height), Image.AFFINE, data=tuple(inverse.reshape(-1)), resample=Image.BILINEAR, fillcolor=(0, 0, 0)
    )
    return np.asarray(warped)


def load_ijb_images(protocol: IjbProtocol, indices: Sequence[int], size: tuple[int, int] = (112, 112)) -> np.ndarray:
    """Images ``indices`` of the protocol from ``loose_crop/``, aligned when landmarks exist; uint8 [n, H, W, 3]."""
    out = []
    for i in indices:
        path = protocol.root / "loose_crop" / str(protocol.image_names[i])
        try:
            # the data side's safe decoder: pixel limit checked on the header, any mode to 8-bit RGB
            img = decode_image(path.read_bytes())
        except (OSError, BadSample) as err:
            raise ValueError(f"{path}: cannot read IJB image: {err}") from err
        if protocol.landmarks is not None:
            out.append(align_face(img, protocol.landmarks[i], size))
        else:
            out.append(np.asarray(resize_rgb(img, size)))
    return np.stack(out)


def embed_ijb(
    model: Any,
    protocol: IjbProtocol,
    batch_size: int = 64,
    device: Any = None,
    flip: bool = True,
    chunk_images: int = 4096,
) -> np.ndarray:
    """Embed every image of an IJB protocol (aligned from its landmarks when present); float32 [N, D]."""
    from distrib_face.eval.embed import as_embedder, embed_images

    embedder = as_embedder(model, device=device)
    size = getattr(embedder, "input_size", (112, 112))
    parts = []
    for start in range(0, len(protocol.image_names), chunk_images):
        indices = range(start, min(start + chunk_images, len(protocol.image_names)))
        images = load_ijb_images(protocol, indices, size)
        parts.append(embed_images(embedder, images, batch_size=batch_size, flip=flip, image_size=size))
        logger.info("IJB %s: embedded %d / %d images", protocol.target, indices.stop, len(protocol.image_names))
    return np.concatenate(parts)
