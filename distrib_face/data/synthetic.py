"""A synthetic, long-tailed, face-like identity set: procedural faces written as webdataset shards.

Each identity is a fixed draw of shape, colour and texture parameters: face width / height, skin tone,
hair colour and style, eye spacing / height / size / iris colour, eyebrow slant and thickness, nose length
and width, mouth width / height / curve / lip colour, glasses, beard, and a few moles at fixed places.
Each image of an identity varies the nuisances: position and scale, in-plane rotation, a yaw-like shift of
the inner features, background colour, a directional lighting ramp, brightness, sensor noise and the JPEG
quality. Identities differ in many independent cues, images of one identity differ in nuisance only, so a
small network learns to verify held-out identities well above chance, while raw pixels do only somewhat
better than chance.

The number of images per identity follows a Zipf law truncated to ``[min_images, max_images]``:
``P(k) ~ k^(-zipf_a)``. ``holdout_identities`` further identities (never in the shards) are written as a
verification pair set ``holdout_pairs.npz`` (see :mod:`distrib_face.data.pairset`). With ``seen_pairs > 0``,
``seen_pairs.npz`` holds pairs of *training* identities drawn from new renders (never in the shards), with
each image's identity name and training-image count, for verification accuracy by class size.
"""

from __future__ import annotations

import io
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from distrib_face.data.manifest import Manifest, content_hash, write_manifest
from distrib_face.data.pairset import PairSet, save_pairset
from distrib_face.data.shards import ShardWriter

log = logging.getLogger(__name__)

HOLDOUT_PAIRS = "holdout_pairs.npz"
SEEN_PAIRS = "seen_pairs.npz"


@dataclass(frozen=True)
class Identity:
    """The fixed appearance of one synthetic identity (all lengths relative to the face size)."""

    face_w: float
    face_h: float
    skin: tuple[int, int, int]
    hair: tuple[int, int, int]
    hair_style: int  # 0 bald, 1 cap, 2 long, 3 fringe
    hair_height: float
    eye_dx: float
    eye_y: float
    eye_size: float
    iris: tuple[int, int, int]
    brow_slant: float
    brow_width: int
    nose_len: float
    nose_w: float
    mouth_w: float
    mouth_h: float
    mouth_curve: float
    lips: tuple[int, int, int]
    glasses: bool
    beard: bool
    moles: tuple[tuple[float, float], ...]


def random_identity(rng: np.random.Generator) -> Identity:
    """Draw one identity's parameters."""
    def colour(low: int, high: int) -> tuple[int, int, int]:
        return tuple(int(v) for v in rng.integers(low, high, size=3))  # type: ignore[return-value]

    tone = rng.uniform(0.25, 1.0)
    skin = (int(90 + 160 * tone), int(60 + 140 * tone), int(40 + 120 * tone * rng.uniform(0.7, 1.0)))
    return Identity(
        face_w=float(rng.uniform(0.26, 0.36)), face_h=float(rng.uniform(0.34, 0.44)), skin=skin,
        hair=colour(10, 230), hair_style=int(rng.integers(0, 4)), hair_height=float(rng.uniform(0.15, 0.45)),
        eye_dx=float(rng.uniform(0.28, 0.50)), eye_y=float(rng.uniform(0.05, 0.30)),
        eye_size=float(rng.uniform(0.08, 0.17)), iris=colour(0, 200), brow_slant=float(rng.uniform(-0.5, 0.5)),
        brow_width=int(rng.integers(1, 4)), nose_len=float(rng.uniform(0.15, 0.40)),
        nose_w=float(rng.uniform(0.06, 0.20)), mouth_w=float(rng.uniform(0.20, 0.55)),
        mouth_h=float(rng.uniform(0.03, 0.14)), mouth_curve=float(rng.uniform(-1.0, 1.0)), lips=colour(60, 220),
        glasses=bool(rng.random() < 0.3), beard=bool(rng.random() < 0.25),
        moles=tuple((float(rng.uniform(-0.7, 0.7)), float(rng.uniform(-0.5, 0.8)))
                    for _ in range(int(rng.integers(0, 4)))),
    )


def render(identity: Identity, rng: np.random.Generator, size: int = 112) -> np.ndarray:
    """Render one image of ``identity`` with random pose, lighting and noise; uint8 [size, size, 3]."""
    from PIL import Image, ImageDraw

    s = float(size)
    background = tuple(int(v) for v in rng.integers(0, 256, size=3))
    image = Image.new("RGB", (size, size), background)
    draw = ImageDraw.Draw(image)
    scale = rng.uniform(0.9, 1.1)
    cx = s * (0.5 + rng.uniform(-0.05, 0.05))
    cy = s * (0.54 + rng.uniform(-0.05, 0.05))
    fw, fh = identity.face_w * s * scale, identity.face_h * s * scale
    yaw = rng.uniform(-0.12, 0.12) * fw  # inner features slide sideways as the head turns

    if identity.hair_style == 2:  # long hair behind the face
        draw.rectangle([cx - fw * 1.15, cy - fh * 0.6, cx + fw * 1.15, cy + fh * 0.9], fill=identity.hair)
    if identity.hair_style in (1, 2, 3):
        top = cy - fh * (1.0 + identity.hair_height)
        draw.ellipse([cx - fw * 1.08, top, cx + fw * 1.08, cy + fh * 0.2], fill=identity.hair)
    draw.ellipse([cx - fw, cy - fh, cx + fw, cy + fh], fill=identity.skin)
    if identity.hair_style == 3:  # fringe over the forehead
        draw.chord([cx - fw, cy - fh, cx + fw, cy + fh * 0.1], 180, 360, fill=identity.hair)
    if identity.beard:
        draw.chord([cx - fw * 0.95, cy - fh * 0.2, cx + fw * 0.95, cy + fh], 0, 180, fill=identity.hair)

    fx = cx + yaw
    eye_y = cy - identity.eye_y * fh
    eye_r = identity.eye_size * fw
    for side in (-1, 1):
        ex = fx + side * identity.eye_dx * fw
        draw.ellipse([ex - eye_r * 1.4, eye_y - eye_r, ex + eye_r * 1.4, eye_y + eye_r], fill=(245, 245, 240))
        draw.ellipse([ex - eye_r * 0.7, eye_y - eye_r * 0.7, ex + eye_r * 0.7, eye_y + eye_r * 0.7],
                     fill=identity.iris)
        brow_y = eye_y - eye_r * 2.2
        slant = side * identity.brow_slant * eye_r
        draw.line([ex - eye_r * 1.6, brow_y + slant, ex + eye_r * 1.6, brow_y - slant], fill=identity.hair,
                  width=max(1, int(identity.brow_width * s / 112)))
        if identity.glasses:
            draw.ellipse([ex - eye_r * 2.0, eye_y - eye_r * 1.6, ex + eye_r * 2.0, eye_y + eye_r * 1.6],
                         outline=(20, 20, 20), width=max(1, int(2 * s / 112)))
    nose_top, nose_bottom = eye_y + eye_r, eye_y + eye_r + identity.nose_len * fh
    darker = tuple(int(c * 0.75) for c in identity.skin)
    draw.polygon([(fx, nose_top), (fx - identity.nose_w * fw, nose_bottom), (fx + identity.nose_w * fw, nose_bottom)],
                 fill=darker)
    mouth_y = nose_bottom + (cy + fh - nose_bottom) * 0.4
    mw, mh = identity.mouth_w * fw, identity.mouth_h * fh
    start, end = (0, 180) if identity.mouth_curve >= 0 else (180, 360)
    draw.chord([fx - mw, mouth_y - mh, fx + mw, mouth_y + mh], start, end, fill=identity.lips)
    for mx, my in identity.moles:
        px, py = fx + mx * fw, cy + my * fh
        r = max(1.0, 0.04 * fw)
        draw.ellipse([px - r, py - r, px + r, py + r], fill=(60, 40, 30))

    image = image.rotate(float(rng.uniform(-10, 10)), resample=Image.BILINEAR, fillcolor=background)
    pixels = np.asarray(image, dtype=np.float32)
    angle = rng.uniform(0, 2 * np.pi)
    ramp = np.cos(angle) * np.linspace(-1, 1, size)[None, :] + np.sin(angle) * np.linspace(-1, 1, size)[:, None]
    light = rng.uniform(0.75, 1.2) * (1 + rng.uniform(0.0, 0.3) * ramp)
    pixels = pixels * light[..., None] + rng.normal(0, rng.uniform(2, 10), size=pixels.shape)
    return np.clip(pixels, 0, 255).astype(np.uint8)


def zipf_counts(rng: np.random.Generator, num: int, low: int, high: int, exponent: float) -> np.ndarray:
    """``num`` draws of ``k`` in ``[low, high]`` with ``P(k) ~ k^(-exponent)``."""
    if not 1 <= low <= high:
        raise ValueError(f"need 1 <= min_images <= max_images, got {low}, {high}")
    support = np.arange(low, high + 1)
    weights = support.astype(np.float64) ** (-exponent)
    return rng.choice(support, size=num, p=weights / weights.sum())


def _jpeg(array: np.ndarray, quality: int) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def identity_of(seed: int, label: int) -> Identity:
    """Identity ``label`` of the set made with ``seed``: its own RNG stream, so any process can draw it."""
    return random_identity(np.random.default_rng([seed, 3, label]))


@dataclass(frozen=True)
class _ShardJob:
    """One shard to render: its number, the labels of its samples in order, and where the set goes."""

    out_dir: str
    index: int
    first_sample: int
    labels: np.ndarray
    seed: int
    image_size: int


def _render_shard(job: _ShardJob) -> tuple[int, str, int, int, str]:
    """Render and write one shard (in a worker process); ``(index, path, count, bytes, sha256)``.

    Every image draws from the RNG stream of its shard, ``(seed, 1, shard)``, so the shard's bytes depend on
    the seed and the shard number alone: the same set for any number of workers.
    """
    rng = np.random.default_rng([job.seed, 1, job.index])
    cache: dict[int, Identity] = {}
    writer = ShardWriter(job.out_dir, prefix="train", max_count=len(job.labels) + 1, start_index=job.index)
    for offset, label in enumerate(job.labels.tolist()):
        identity = cache.get(label)
        if identity is None:
            identity = cache[label] = identity_of(job.seed, label)
        array = render(identity, rng, job.image_size)
        writer.write(f"{job.first_sample + offset:09d}", _jpeg(array, int(rng.integers(75, 96))), label)
    (shard,) = writer.close()
    return job.index, str(shard.path), shard.count, shard.bytes, shard.sha256


def write_synthetic(
    out_dir: str | os.PathLike,
    num_identities: int = 200,
    min_images: int = 4,
    max_images: int = 60,
    zipf_a: float = 1.5,
    holdout_identities: int = 50,
    image_size: int = 112,
    seed: int = 0,
    num_pairs: int = 600,
    samples_per_shard: int = 500,
    holdout_images: int = 6,
    seen_pairs: int = 0,
    workers: int = 1,
) -> Manifest:
    """Write a synthetic long-tailed identity set as shards + ``manifest.json`` + ``holdout_pairs.npz``.

    Args:
        out_dir: output folder (created; existing shards of the same name are overwritten).
        num_identities: training identities.
        min_images: fewest images of a training identity.
        max_images: most images of a training identity.
        zipf_a: Zipf exponent of the images-per-identity law.
        holdout_identities: further identities, only in the held-out pair set (0: no pair set).
        image_size: side of the square images.
        seed: everything is a function of it (not of ``workers``).
        num_pairs: held-out pairs, half genuine and half impostor.
        samples_per_shard: samples per tar shard.
        holdout_images: images rendered per held-out identity.
        seen_pairs: pairs of training identities (new renders) written to ``seen_pairs.npz`` (0: none).
        workers: processes rendering shards in parallel (started with ``forkserver``, never ``fork``);
            1 renders in this process.

    Returns:
        The written manifest.
    """
    if num_identities < 1:
        raise ValueError(f"num_identities must be >= 1, got {num_identities}")
    if image_size < 16:
        raise ValueError(f"image_size must be >= 16, got {image_size}")
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    if samples_per_shard < 1:
        raise ValueError(f"samples_per_shard must be >= 1, got {samples_per_shard}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    counts = zipf_counts(rng, num_identities, min_images, max_images, zipf_a)
    # samples in a random global order so that every shard mixes identities
    labels = np.repeat(np.arange(num_identities), counts)
    rng.shuffle(labels)
    jobs = [_ShardJob(str(out), index, start, labels[start:start + samples_per_shard], seed, image_size)
            for index, start in enumerate(range(0, len(labels), samples_per_shard))]
    finished = sorted(_run_shard_jobs(jobs, workers, len(labels)))
    manifest = Manifest(
        num_classes=num_identities, num_samples=int(len(labels)), shards=[f[1] for f in finished],
        shard_counts=[f[2] for f in finished], class_counts=counts,
        class_names=[f"id{i:06d}" for i in range(num_identities)],
        source={"kind": "synthetic", "num_identities": num_identities, "min_images": min_images,
                "max_images": max_images, "zipf_a": zipf_a, "holdout_identities": holdout_identities,
                "image_size": image_size, "seed": seed},
        content_hash=content_hash([f[4] for f in finished]), image_size=(image_size, image_size),
        shard_hashes=[f[4] for f in finished], shard_bytes=[f[3] for f in finished],
    )
    write_manifest(out, manifest)
    if holdout_identities > 1 and num_pairs > 0:
        pairs = holdout_pairset(holdout_identities, holdout_images, num_pairs, image_size, seed)
        save_pairset(out / HOLDOUT_PAIRS, pairs)
    if seen_pairs > 0:
        save_pairset(out / SEEN_PAIRS, seen_identity_pairset(counts, seen_pairs, image_size, seed))
    log.info("wrote %d images of %d identities in %d shards to %s", len(labels), num_identities,
             len(finished), out)
    return manifest


def _run_shard_jobs(jobs: list[_ShardJob], workers: int, total: int) -> list[tuple[int, str, int, int, str]]:
    """Render ``jobs`` in this process or in ``workers`` processes, with a progress bar on a terminal."""
    import sys
    import time

    from tqdm import tqdm

    bar = tqdm(total=total, unit="img", desc="synth", disable=not sys.stderr.isatty())
    start, done, results = time.perf_counter(), 0, []

    def advance(result: tuple[int, str, int, int, str]) -> None:
        nonlocal done
        results.append(result)
        done += result[2]
        bar.update(result[2])
        if bar.disable and (len(results) % max(1, len(jobs) // 10) == 0 or done == total):
            rate = done / max(time.perf_counter() - start, 1e-9)
            log.info("synth: %d / %d images, %.0f img/s, ETA %.0f s", done, total, rate, (total - done) / rate)

    try:
        if workers == 1 or len(jobs) == 1:
            for job in jobs:
                advance(_render_shard(job))
        else:
            import concurrent.futures
            import multiprocessing

            # forkserver: the workers are forked from a clean server process, never from this (threaded) one.
            context = multiprocessing.get_context("forkserver")
            context.set_forkserver_preload([__name__])
            with concurrent.futures.ProcessPoolExecutor(max_workers=workers, mp_context=context) as pool:
                for result in pool.map(_render_shard, jobs):
                    advance(result)
    finally:
        bar.close()
    elapsed = time.perf_counter() - start
    log.info("synth: %d images in %.1f s (%.0f img/s, %d worker%s)", total, elapsed, total / max(elapsed, 1e-9),
             workers, "" if workers == 1 else "s")
    return results


def holdout_pairset(num_identities: int, images_per_identity: int, num_pairs: int, image_size: int,
                    seed: int) -> PairSet:
    """Genuine and impostor pairs of identities drawn apart from the training ones (another RNG stream)."""
    if images_per_identity < 2:
        raise ValueError(f"holdout_images must be >= 2 for genuine pairs, got {images_per_identity}")
    rng = np.random.default_rng([seed, 2])
    identities = [random_identity(rng) for _ in range(num_identities)]
    images = [[_jpeg(render(ident, rng, image_size), 90) for _ in range(images_per_identity)]
              for ident in identities]
    pair_images: list[bytes] = []
    names: list[str] = []
    issame = []
    for k in range(num_pairs):
        same = k % 2 == 0
        if same:
            who = int(rng.integers(num_identities))
            a, b = rng.choice(images_per_identity, size=2, replace=False)
            pair_images += [images[who][a], images[who][b]]
            names += [f"holdout{who:06d}"] * 2
        else:
            first, second = rng.choice(num_identities, size=2, replace=False)
            pair_images += [images[first][int(rng.integers(images_per_identity))],
                            images[second][int(rng.integers(images_per_identity))]]
            names += [f"holdout{first:06d}", f"holdout{second:06d}"]
        issame.append(same)
    folds = np.arange(num_pairs) * 10 // max(1, num_pairs)
    return PairSet(name="synthetic_holdout", images=pair_images, issame=np.array(issame), folds=folds,
                   identities=names)


def seen_identity_pairset(class_counts: np.ndarray, num_pairs: int, image_size: int, seed: int) -> PairSet:
    """Pairs of training identities from new renders (an RNG stream of their own, never in the shards).

    Identities are drawn uniformly (not by image count), so that the tail, most of a Zipf set, fills its
    bucket; each image carries its identity name (``id%06d``, the manifest's ``label_map``) and the
    identity's training-image count.
    """
    num_identities = len(class_counts)
    if num_identities < 2:
        raise ValueError(f"seen pairs need at least 2 training identities, got {num_identities}")
    rng = np.random.default_rng([seed, 4])
    pair_images: list[bytes] = []
    who: list[int] = []
    issame = []
    for k in range(num_pairs):
        same = k % 2 == 0
        pair = [int(rng.integers(num_identities))] * 2 if same else \
            [int(v) for v in rng.choice(num_identities, size=2, replace=False)]
        pair_images += [_jpeg(render(identity_of(seed, i), rng, image_size), 90) for i in pair]
        who += pair
        issame.append(same)
    folds = np.arange(num_pairs) * 10 // max(1, num_pairs)
    return PairSet(name="synthetic_seen", images=pair_images, issame=np.array(issame), folds=folds,
                   identities=[f"id{i:06d}" for i in who], image_counts=np.asarray(class_counts)[who])
