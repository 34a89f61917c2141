"""Bad samples never stop training: every kind of issue 9 in one shard set (tests/faults/shardset.py), read by
the real loader with both decoders (DALI's CPU pipeline and PIL), by ``pack``, ``data verify`` and the
evaluation readers. Every expected count is written down by hand in the shard-set builder."""

from __future__ import annotations

import collections
import io
import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from distrib_face.cli import main
from distrib_face.data import build_loader
from distrib_face.data.quality import DataCounts, DataQualityError
from tests.faults.shardset import IMAGE_SIZE, _broken_huffman, _jpeg, _png, _with_sof_size, face, write_fault_set

TARGET = 20 + 13 + 12 + 6  # the manifest counts of the present shards: the epoch of one rank (drop_last=False)


@pytest.fixture(scope="module")
def faults(tmp_path_factory):
    return write_fault_set(tmp_path_factory.mktemp("faults"))


def _loader(faults, decoder, num_workers, **kwargs):
    options = dict(batch_size=8, rank=0, world_size=1, num_workers=num_workers, decoder=decoder, shuffle=False,
                   drop_last=False, chunk_size=4, allow_missing_shards=True, max_skip_fraction=1.0, augment=False)
    options.update(kwargs)
    return build_loader(faults.root, **options)


@pytest.mark.parametrize("decoder,num_workers", [("pil", 0), ("pil", 2), ("dali", 0), ("dali", 2)])
def test_every_bad_sample_is_skipped_counted_by_reason_and_the_rest_is_used(faults, decoder, num_workers):
    loader = _loader(faults, decoder, num_workers)
    assert loader.counts.missing_shards == [faults.missing_shard]
    assert loader.samples_per_epoch() == TARGET and len(loader) == math.ceil(TARGET / 8)
    labels, sizes = [], []
    for images, batch_labels in loader:
        assert images.shape[1:] == (3, IMAGE_SIZE, IMAGE_SIZE) and torch.isfinite(images).all()
        assert batch_labels.min() >= 0 and batch_labels.max() < faults.num_classes  # never a bad label
        labels += [int(v) for v in batch_labels]
        sizes.append(len(batch_labels))
    assert len(sizes) == len(loader), "every rank must take the same number of steps"
    # ... of the same size (the last one of this drop_last=False epoch aside): the classifier's gathers need it
    assert sizes[:-1] == [8] * (len(sizes) - 1) and sum(sizes) == TARGET
    assert loader.skip_counts() == faults.skipped
    assert dict(loader.counts.repaired) == faults.repaired
    assert {name: dict(c) for name, c in loader.counts.per_shard.items()} == faults.skipped_by_shard
    assert loader.counts.worst_shard()[0] == "part-000001.tar"
    # DALI finds the broken Huffman table only when decoding: that one batch goes through PIL, which drops it,
    # and one kept sample of the batch stands in for it (the batch keeps its size)
    fallbacks = 1 if decoder == "dali" else 0
    assert loader.counts.dali_fallback_batches == fallbacks
    # every good sample once in the first pass; the second pass fills the epoch from the clean first shard
    seen = collections.Counter(labels)
    assert sorted(seen) == faults.good_labels
    repeats = sorted(label for label, n in seen.items() for _ in range(n - 1))
    taken_in_pass_one = len(faults.good_labels) + fallbacks  # the undecodable JPEG passed the header check
    assert len(repeats) == TARGET - taken_in_pass_one + fallbacks
    assert len(set(repeats) - set(faults.shard_labels["part-000000.tar"])) <= fallbacks  # only the stand-in
    assert loader.counts.delivered == len(labels) - fallbacks == TARGET - fallbacks
    assert loader.samples_read == loader.counts.delivered + sum(faults.skipped.values())
    report = json.loads(json.dumps(loader.data_report()))
    assert report["skipped"] == faults.skipped and report["worst_shard"]["shard"] == "part-000001.tar"


def test_a_missing_shard_is_an_error_naming_it_unless_allowed(faults):
    with pytest.raises(FileNotFoundError, match=r"part-000004\.tar.*allow_missing_shards"):
        build_loader(faults.root, batch_size=8, rank=0, world_size=1, decoder="pil")


@pytest.mark.parametrize("decoder", ["pil", "dali"])
def test_too_many_skips_stop_with_the_worst_shard_named(faults, decoder):
    loader = _loader(faults, decoder, 0, max_skip_fraction=0.1, skip_check_after=30)
    delivered = 0
    with pytest.raises(DataQualityError) as caught:
        for _, labels in loader:
            delivered += len(labels)
    message = str(caught.value)
    assert "worst shard part-000001.tar" in message and "data.max_skip_fraction=0.1" in message
    assert "data verify" in message
    assert delivered >= 20, "the data before the bad shard was used"
    assert loader.counts.skip_fraction > 0.1 and loader.samples_read >= 30


def test_one_bad_sample_among_the_first_does_not_stop_training(faults):
    # 1 skip in the first 2 samples is 50%, but the check waits for skip_check_after samples
    loader = _loader(faults, "pil", 0, max_skip_fraction=0.2, skip_check_after=1000)
    assert len([1 for _ in loader]) == len(loader)


@pytest.mark.parametrize("decoder", ["pil", "dali"])
def test_a_mid_epoch_resume_counts_every_skip_exactly_once(faults, decoder):
    # the same batches in the same order, and the same counts, whether or not the run stopped; stops inside
    # the first pass, at its end, and inside the pass that fills the epoch (batch 5 holds the first refill)
    whole = _loader(faults, decoder, 2, shuffle=True, seed=3, shuffle_buffer=16)
    reference = [[int(v) for v in labels] for _, labels in whole]
    for stop_after in (1, 3, 5, 6):
        partial = _loader(faults, decoder, 2, shuffle=True, seed=3, shuffle_buffer=16)
        iterator = iter(partial)
        first = [[int(v) for v in next(iterator)[1]] for _ in range(stop_after)]
        state = json.loads(json.dumps(partial.state_dict()))
        iterator.close()
        resumed = _loader(faults, decoder, 2, shuffle=True, seed=3, shuffle_buffer=16)
        resumed.load_state_dict(state)
        rest = [[int(v) for v in labels] for _, labels in resumed]
        assert first + rest == reference, f"stopped after {stop_after} batches"
        assert resumed.counts.to_dict() == whole.counts.to_dict(), f"stopped after {stop_after} batches"


def test_counts_sum_over_ranks_and_read_back(faults):
    counts = DataCounts.from_dict({})
    assert counts.samples_read == 0 and counts.progress_text() == "" and counts.worst_shard() is None
    loader = _loader(faults, "pil", 0)
    for _ in loader:
        pass
    one = loader.counts
    two = DataCounts.merged([one, one.to_dict()])
    assert two.skipped_total == 2 * one.skipped_total and two.per_shard["part-000001.tar"]["too_large"] == 4
    assert DataCounts.from_vector([2 * v for v in one.vector()]).to_dict()["skipped"] == two.to_dict()["skipped"]
    metrics = one.metrics()
    assert metrics["data/skipped/too_large"] == 2 and metrics["data/skipped/missing_shard"] == 0
    assert metrics["data/samples_read"] == one.samples_read
    assert one.progress_text().startswith(f"skipped {one.skipped_total} (too_large 2, not_an_image 2, truncated 1")


def test_data_verify_lists_every_problem_by_shard_and_reason(faults, capsys):
    code = main(["data", "verify", str(faults.root), "--workers", "2", "--sha256", "--no-progress"])
    out = capsys.readouterr().out
    assert code == 3
    rows = {line.split()[0]: line.split() for line in out.splitlines() if line.startswith("part-")}
    header = next(line.split() for line in out.splitlines() if line.startswith("shard"))
    table = {shard: {reason: int(cell) for reason, cell in zip(header[3:], row[3:]) if cell != "-"}
             for shard, row in rows.items()}
    expected = {name: dict(c) for name, c in faults.skipped_by_shard.items()}
    expected["part-000004.tar"] = {"missing_shard": 5}
    assert table == expected, out
    assert "repaired, not problems: resized 1, converted 4" in out


def test_data_verify_passes_a_clean_set_and_refuses_a_bad_manifest(tmp_path, capsys):
    from distrib_face.data.testing import write_indexed_shards

    write_indexed_shards(tmp_path / "clean", [5, 7])
    assert main(["data", "verify", str(tmp_path / "clean"), "--no-progress", "--sha256"]) == 0
    assert "no problems" in capsys.readouterr().out
    manifest = json.loads((tmp_path / "clean" / "manifest.json").read_text())
    manifest["shards"][1]["count"] = -7
    (tmp_path / "clean" / "manifest.json").write_text(json.dumps(manifest))
    assert main(["data", "verify", str(tmp_path / "clean"), "--no-progress"]) == 2


def _flip_density_byte(shard, member_index=0):
    """Flip one byte of the first image member's JFIF density field in place: the digest changes, the size does
    not, and the tar and the image still read the same (no decoder looks at the density)."""
    import tarfile

    with tarfile.open(shard) as tar:
        member = [m for m in tar.getmembers() if m.name.endswith(".jpg")][member_index]
    data = bytearray(shard.read_bytes())
    image = data[member.offset_data:member.offset_data + member.size]
    assert image[2:4] == b"\xff\xe0" and image[6:11] == b"JFIF\0", "not a JFIF header"
    data[member.offset_data + 14] ^= 0x01  # the X density's high byte
    shard.write_bytes(bytes(data))


def test_data_verify_names_each_shard_whose_sha256_count_or_bytes_differ(tmp_path, capsys):
    from distrib_face.data.manifest import Manifest, read_manifest, write_manifest
    from distrib_face.data.testing import write_indexed_shards

    root = tmp_path / "set"
    write_indexed_shards(root, [4, 4, 4, 4])  # sample i has label i, one sample a class
    _flip_density_byte(root / "part-000000.tar")
    # The manifest rewritten through its writer: shard 1 holds one sample more than it says (label 7 counted
    # out of the class table, so the set's counts stay consistent), shard 2 one tar block fewer bytes.
    old = read_manifest(root)
    shard_counts, class_counts, shard_bytes = list(old.shard_counts), old.class_counts.copy(), list(old.shard_bytes)
    shard_counts[1] -= 1
    class_counts[7] -= 1
    shard_bytes[2] -= 512
    write_manifest(root, Manifest(
        num_classes=old.num_classes, num_samples=old.num_samples - 1, shards=old.shards, shard_counts=shard_counts,
        class_counts=class_counts, class_names=old.class_names, source=old.source, content_hash=old.content_hash,
        image_size=old.image_size, shard_hashes=old.shard_hashes, shard_bytes=shard_bytes))
    assert read_manifest(root).shard_counts == [4, 3, 4, 4]

    def table(*flags):
        code = main(["data", "verify", str(root), "--workers", "2", "--no-progress", *flags])
        out = capsys.readouterr().out
        lines = out.splitlines()
        header = next(line.split() for line in lines if line.startswith("shard"))
        rows = {line.split()[0]: line.split() for line in lines if line.startswith("part-")}
        found = {shard: {reason: int(cell) for reason, cell in zip(header[3:], row[3:]) if cell != "-"}
                 for shard, row in rows.items()}
        return code, found, {shard: (int(row[1]), int(row[2])) for shard, row in rows.items()}, out

    code, found, read_expected, out = table("--sha256")
    assert code == 3, out
    assert found == {"part-000000.tar": {"sha256_mismatch": 1}, "part-000001.tar": {"count_mismatch": 1},
                     "part-000002.tar": {"bytes_mismatch": 1}}, out
    assert read_expected == {"part-000000.tar": (4, 4), "part-000001.tar": (4, 3), "part-000002.tar": (4, 4)}
    assert "set: class_counts[7] = 0 in the manifest, but the shards hold 1 samples of label 7" in out
    assert "16 samples read (15 in the manifest): 4 problems in 3 shards and 1 of the set" in out
    # the flipped byte is only found by the digest: without --sha256 that shard reads clean
    code, found, _, out = table()
    assert code == 3 and set(found) == {"part-000001.tar", "part-000002.tar"}, out


def _write_folder(root):
    """An identity folder per kind: what pack must skip (with its reason) and what it must convert."""
    base = _jpeg(Image.fromarray(face(1)))
    bad = {"too_large": [_with_sof_size(base, 60000, 60000), _with_sof_size(base, 12000, 12000)],
           "truncated": [base[: len(base) // 2]], "not_an_image": [b"just text\n", b"\x00\x01" + bytes(range(200))],
           "undecodable": [_broken_huffman(base)]}
    person = root / "person0"
    person.mkdir(parents=True)
    for reason, blobs in bad.items():
        for k, blob in enumerate(blobs):
            (person / f"{reason}{k}.jpg").write_bytes(blob)
    sixteen = face(2)[..., 0].astype(np.uint16) * 257 + 100  # values that Image.convert("L") would clip to 255
    good = root / "person1"
    good.mkdir()
    Image.fromarray(sixteen).save(good / "sixteen.png")
    Image.fromarray(np.dstack([face(3), np.zeros((IMAGE_SIZE, IMAGE_SIZE), np.uint8)])).save(good / "rgba.png")
    Image.fromarray(face(4)).convert("CMYK").save(good / "cmyk.jpg")
    (good / "plain.jpg").write_bytes(base)
    return {reason: len(blobs) for reason, blobs in bad.items()}, sixteen


def test_pack_skips_every_bad_image_by_reason_and_converts_the_rest(tmp_path):
    from distrib_face.data.pack import pack

    expected, sixteen = _write_folder(tmp_path / "faces")
    result = pack(tmp_path / "faces", tmp_path / "out", workers=2, progress=False)
    report = json.loads(result.report_path.read_text())
    assert report["skipped_by_reason"] == expected
    assert result.manifest.num_samples == 4 and result.manifest.class_counts.tolist() == [0, 4]
    import tarfile

    with tarfile.open(result.manifest.shards[0]) as tar:
        images = {m.name: tar.extractfile(m).read() for m in tar.getmembers() if m.name.endswith(".jpg")}
    # the 16-bit image is scaled to 8 bits (v / 257), not clipped: its first sample is sixteen.png's
    # (the folder is read in name order: cmyk, plain, rgba, sixteen)
    decoded = np.asarray(Image.open(io.BytesIO(images[sorted(images)[3]])), dtype=np.float64)
    assert np.abs(decoded - sixteen / 257.0).mean() < 2.0


def test_eval_leaves_out_the_pairs_of_bad_images_and_says_so():
    from distrib_face.data.pairset import PairSet
    from distrib_face.eval import embed_images, evaluate_pairset, verification_metrics

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 16 * 16, 8)).eval()
    rng = np.random.default_rng(0)
    images = [_png(Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8))) for _ in range(40)]
    bomb = _with_sof_size(_jpeg(Image.fromarray(face(9))), 60000, 60000)
    broken = images[7][: len(images[7]) // 2]
    dirty = list(images)
    dirty[4], dirty[7] = bomb, broken  # pairs 2 and 3
    issame = rng.random(20) < 0.5
    result = evaluate_pairset(net, PairSet("toy", dirty, issame, folds=np.arange(20) % 4), batch_size=16,
                              image_size=(16, 16))
    keep = np.ones(20, bool)
    keep[[2, 3]] = False
    emb = embed_images(net, images, image_size=(16, 16))
    reference = verification_metrics(emb[0::2][keep], emb[1::2][keep], issame[keep], folds=(np.arange(20) % 4)[keep])
    assert result.num_pairs == 18 and result.accuracy == pytest.approx(reference.accuracy)
    assert any("too_large 1" in note and "truncated 1" in note and "2 of 20 pairs" in note for note in result.notes)
    with pytest.raises(ValueError, match="image 4: cannot decode .*too_large"):
        embed_images(net, dirty, image_size=(16, 16))


def test_a_broken_dali_pipeline_stops_with_dalis_own_message(tmp_path, monkeypatch):
    """The fault of issue 9 itself: an op DALI refuses (coin_flip with dtype=FLOAT) made every batch fail with a
    blank "Critical error in pipeline:" and fall back to PIL silently. Injected into a real DALI pipeline, it
    must stop the loader after a few batches with DALI's own explanation."""
    from distrib_face.data import dali
    from distrib_face.data.quality import DaliFallbackError
    from distrib_face.data.testing import write_indexed_shards

    def broken_pipeline(source, *, batch_size, num_threads, seed, **_):
        from nvidia.dali import fn, pipeline_def, types

        @pipeline_def(batch_size=batch_size, num_threads=num_threads, device_id=None, seed=seed)
        def pipe():
            jpegs, labels = fn.external_source(source=source, num_outputs=2, cycle="raise", batch=True,
                                               dtype=[types.UINT8, types.INT64])
            images = fn.decoders.image(jpegs, device="cpu", output_type=types.RGB)
            chosen = fn.random.coin_flip(probability=0.5, dtype=types.FLOAT)
            images = fn.cast(images * chosen, dtype=types.UINT8)
            return fn.crop_mirror_normalize(images, mean=[127.5] * 3, std=[127.5] * 3, output_layout="CHW"), labels

        built = pipe()
        built.build()
        return built

    monkeypatch.setattr(dali, "build_pipeline", broken_pipeline)
    write_indexed_shards(tmp_path, [40, 40], image_size=8)
    loader = build_loader(tmp_path, batch_size=8, rank=0, world_size=1, num_workers=0, decoder="dali", augment=False)
    delivered = 0
    with pytest.raises(DaliFallbackError) as caught:
        for _, labels in loader:
            delivered += len(labels)
    message = str(caught.value)
    assert "Data type float is currently not supported" in message and "coin_flip" in message
    assert "Critical error in pipeline" not in message and "3 of 3 batches" in message
    assert delivered == 16 and loader.counts.dali_fallback_batches == 2  # decoded by PIL, counted, then stop
