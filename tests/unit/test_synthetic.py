"""``distrib-face synth``: the written set depends on the seed alone, not on the number of worker processes."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from distrib_face.data.manifest import read_manifest
from distrib_face.data.stream import iter_shard
from distrib_face.data.synthetic import write_synthetic


def _samples(folder):
    manifest = read_manifest(folder)
    out = []
    for index, shard in enumerate(manifest.shards):
        out += [(s.key, s.label, s.image) for s in iter_shard(shard, index, num_classes=manifest.num_classes)]
    return manifest, out


def test_workers_do_not_change_the_set(tmp_path):
    kwargs = dict(num_identities=30, min_images=1, max_images=6, holdout_identities=0, image_size=16,
                  samples_per_shard=20, seed=7)
    one = write_synthetic(tmp_path / "one", workers=1, **kwargs)
    two = write_synthetic(tmp_path / "two", workers=2, **kwargs)
    assert len(one.shards) >= 3  # several shards, so two workers really split the work
    assert one.content_hash == two.content_hash and one.shard_hashes == two.shard_hashes
    manifest, samples = _samples(tmp_path / "two")
    labels = np.array([label for _, label, _ in samples])
    # every sample is where the manifest says, once: class counts and the total agree with the shards
    assert len(samples) == manifest.num_samples == sum(manifest.shard_counts)
    assert np.bincount(labels, minlength=manifest.num_classes).tolist() == manifest.class_counts.tolist()
    assert len({key for key, _, _ in samples}) == len(samples)
    assert Image.open(io.BytesIO(samples[0][2])).size == (16, 16)

