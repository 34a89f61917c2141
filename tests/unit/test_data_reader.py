"""The shard reader: exactly-once epochs across ranks and workers, determinism, resume, long-tail weights,
corrupt samples and truncated shards. Every expectation is a plain count of sample identities (label i is
sample i) or a closed form."""

from __future__ import annotations

import collections
import json

import numpy as np
import pytest
import torch

from distrib_face.data import build_loader, read_manifest
from distrib_face.data.stream import class_weights, epoch_samples_per_rank, shard_permutation
from distrib_face.data.testing import write_indexed_shards


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    out = tmp_path_factory.mktemp("indexed")
    write_indexed_shards(out, [23, 17, 30, 11, 19, 25, 14, 21, 16, 24])  # 200 samples, uneven shards
    return out


def _labels(loader) -> list[int]:
    return [int(v) for _, labels in loader for v in labels]


@pytest.mark.parametrize("world_size,num_workers,split", [(1, 0, "shard"), (2, 2, "sample"), (3, 2, "sample"),
                                                          (2, 1, "shard")])
def test_every_rank_takes_a_disjoint_share_of_equal_length(shards, world_size, num_workers, split):
    manifest = read_manifest(shards)
    per_rank = []
    for rank in range(world_size):
        loader = build_loader(shards, batch_size=8, rank=rank, world_size=world_size, num_workers=num_workers,
                              decoder="pil", seed=3, split=split, drop_last=False, shuffle_buffer=20)
        expected, num_batches = loader.samples_per_epoch(), len(loader)
        labels = _labels(loader)
        assert len(labels) == expected
        assert num_batches == -(-len(labels) // 8)
        per_rank.append(labels)
    lengths = {len(labels) for labels in per_rank}
    assert len(lengths) == 1, "every rank must take the same number of samples"
    flat = [v for labels in per_rank for v in labels]
    assert len(flat) == len(set(flat)), "a sample was read by two ranks or twice"
    if split == "sample" or world_size == 1:
        # sample split leaves out at most world_size - 1 samples (the uneven remainder)
        assert manifest.num_samples - len(flat) < world_size
    if world_size == 1:
        assert sorted(flat) == list(range(manifest.num_samples))


def test_epoch_length_is_the_smallest_rank_share(shards):
    manifest = read_manifest(shards)
    counts = manifest.shard_counts
    for epoch in range(3):
        order = shard_permutation(len(counts), 5, epoch, 0, True)
        per_slot = [sum(counts[i] for i in order[s::4]) for s in range(4)]
        expected = min(per_slot[0] + per_slot[1], per_slot[2] + per_slot[3])
        assert epoch_samples_per_rank(counts, 2, 2, 5, epoch, "shard", True, False) == expected


def test_order_is_deterministic_given_seed_and_epoch(shards):
    def run(seed, epoch):
        loader = build_loader(shards, batch_size=10, rank=1, world_size=2, num_workers=2, decoder="pil", seed=seed,
                              epoch=epoch)
        return _labels(loader)

    first = run(7, 1)
    assert first == run(7, 1)
    assert first != run(7, 2)
    assert first != run(8, 1)


def test_pil_images_are_normalised_chw(shards):
    loader = build_loader(shards, batch_size=4, rank=0, world_size=1, num_workers=0, decoder="pil", augment=False,
                          shuffle=False, dtype="bfloat16")
    images, labels = next(iter(loader))
    assert images.shape == (4, 3, 16, 16) and images.dtype == torch.bfloat16 and labels.dtype == torch.int64
    from PIL import Image
    import io
    import tarfile

    with tarfile.open(read_manifest(shards).shards[0]) as tar:
        data = tar.extractfile(f"{int(labels[0]):08d}.jpg").read()
    reference = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), dtype=np.float64)
    reference = (reference - 127.5) / 127.5
    np.testing.assert_allclose(images[0].float().numpy().transpose(1, 2, 0), reference, atol=1 / 127.5)


@pytest.mark.parametrize("num_workers,stop_after", [(0, 3), (2, 5), (2, 0)])
def test_mid_epoch_resume_repeats_and_loses_nothing(shards, num_workers, stop_after):
    kwargs = dict(batch_size=6, rank=0, world_size=2, num_workers=num_workers, decoder="pil", seed=11, epoch=4)
    reference = _labels(build_loader(shards, **kwargs))
    loader = build_loader(shards, **kwargs)
    seen = []
    iterator = iter(loader)
    for _ in range(stop_after):
        seen += [int(v) for v in next(iterator)[1]]
    state = json.loads(json.dumps(loader.state_dict()))  # JSON-able
    iterator.close()
    resumed = build_loader(shards, **kwargs)
    resumed.load_state_dict(state)
    rest = _labels(resumed)
    assert len(seen) + len(rest) == len(reference)
    assert sorted(seen + rest) == sorted(reference)
    assert resumed.epoch == 5, "a finished epoch moves the loader to the next one"


def test_resume_refuses_another_layout(shards):
    loader = build_loader(shards, batch_size=6, rank=0, world_size=2, num_workers=2, decoder="pil")
    state = loader.state_dict()
    other = build_loader(shards, batch_size=6, rank=0, world_size=2, num_workers=1, decoder="pil")
    with pytest.raises(ValueError, match="num_workers"):
        other.load_state_dict(state)
    per_rank = {"per_rank": [state, {**state, "rank": 1}]}
    twin = build_loader(shards, batch_size=6, rank=1, world_size=2, num_workers=2, decoder="pil")
    twin.load_state_dict(per_rank)


def test_set_epoch_discards_a_position_of_another_epoch(shards):
    kwargs = dict(batch_size=5, rank=0, world_size=1, num_workers=0, decoder="pil")
    loader = build_loader(shards, **kwargs)
    iterator = iter(loader)
    next(iterator)
    iterator.close()
    loader.set_epoch(3)
    assert loader.state_dict()["batches"] == 0 and loader.epoch == 3
    assert len(_labels(loader)) == 200


def test_resampled_epochs_have_the_nominal_length(shards):
    loader = build_loader(shards, batch_size=8, rank=0, world_size=2, num_workers=2, decoder="pil", resampled=True)
    num_batches = len(loader)
    labels = _labels(loader)
    assert len(labels) == 200 // 2 // 8 * 8 == num_batches * 8


@pytest.mark.parametrize("mode", ["sqrt", "repeat_factor"])
def test_class_weights_closed_form(mode):
    counts = np.array([100, 25, 4, 1, 0])
    weights = class_weights(counts, mode)
    assert np.isclose((counts * weights).sum(), counts.sum()), "the epoch keeps its size"
    if mode == "sqrt":
        share = counts * weights / counts.sum()
        np.testing.assert_allclose(share[:4], np.sqrt(counts[:4]) / np.sqrt(counts[:4]).sum())
    else:
        raw = np.maximum(1, np.sqrt(np.median(counts[:4]) / counts[:4]))
        np.testing.assert_allclose(weights[:4] / weights[0], raw / raw[0])
    assert class_weights(counts, None) is None
    with pytest.raises(ValueError, match="rebalance"):
        class_weights(counts, "inverse")


def test_rebalanced_stream_follows_the_weights(tmp_path):
    # 2 classes with 160 and 10 samples: sqrt sampling draws them 4:1 instead of 16:1
    from distrib_face.data.manifest import Manifest, content_hash, write_manifest
    from distrib_face.data.shards import ShardWriter
    from distrib_face.data.testing import jpeg_bytes, sample_image

    writer = ShardWriter(tmp_path, max_count=50)
    labels = [0] * 160 + [1] * 10
    for i, label in enumerate(labels):
        writer.write(f"{i:06d}", jpeg_bytes(sample_image(i, 8)), label)
    done = writer.close()
    write_manifest(tmp_path, Manifest(2, 170, [str(f.path) for f in done], [f.count for f in done], [160, 10],
                                      content_hash=content_hash([f.sha256 for f in done])))
    drawn = collections.Counter()
    for epoch in range(6):
        loader = build_loader(tmp_path, batch_size=10, rank=0, world_size=1, num_workers=0, decoder="pil",
                              rebalance="sqrt", epoch=epoch, seed=1)
        drawn.update(_labels(loader))
    ratio = drawn[0] / drawn[1]
    assert 3.0 < ratio < 5.3, f"sqrt sampling should draw the classes about 4:1, got {ratio:.2f}"


def test_corrupt_jpeg_is_skipped_and_counted_and_the_epoch_is_filled(tmp_path):
    write_indexed_shards(tmp_path, [10, 10, 10], corrupt=[4, 17])
    loader = build_loader(tmp_path, batch_size=5, rank=0, world_size=1, num_workers=0, decoder="pil")
    num_batches = len(loader)
    labels = _labels(loader)
    assert len(labels) == 30 == num_batches * 5, "the epoch keeps its length"
    assert loader.num_skipped >= 2
    assert 4 not in labels and 17 not in labels
    assert set(range(30)) - {4, 17} <= set(labels)


def test_truncated_tar_is_reported_and_the_epoch_is_filled(tmp_path):
    manifest = write_indexed_shards(tmp_path, [20, 20], image_size=24)
    shard = manifest.shards[1]
    with open(shard, "rb") as handle:
        data = handle.read()
    with open(shard, "wb") as handle:
        handle.write(data[: len(data) // 2])
    loader = build_loader(tmp_path, batch_size=4, rank=0, world_size=1, num_workers=2, decoder="pil")
    labels = _labels(loader)
    assert len(labels) == 40 and loader.num_shard_errors >= 1
    assert set(range(20)) <= set(labels), "the intact shard is read in full"


def test_bad_arguments_name_the_value(shards):
    with pytest.raises(ValueError, match="decoder"):
        build_loader(shards, batch_size=4, rank=0, world_size=1, decoder="cv2")
    with pytest.raises(ValueError, match="rank"):
        build_loader(shards, batch_size=4, rank=2, world_size=2)
    with pytest.raises(FileNotFoundError, match="manifest"):
        build_loader(shards / "nowhere", batch_size=4, rank=0, world_size=1)


def test_shard_list_with_braces(shards):
    loader = build_loader(str(shards / "part-{000000..000002}.tar"), batch_size=1, rank=0, world_size=1,
                          num_workers=0, decoder="pil", drop_last=False)
    assert sorted(_labels(loader)) == list(range(23 + 17 + 30))
