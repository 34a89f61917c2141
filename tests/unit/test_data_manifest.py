"""The shard manifest, format 2 (``manifest.json`` + a class table ``classes-*.npz``) and format 1 (inline),
read alike; a damaged or inconsistent class table refused naming the file and the field."""

from __future__ import annotations

import hashlib
import io
import json
import pickle

import numpy as np
import pytest

from distrib_face.data.loader import build_loader
from distrib_face.data.manifest import FORMAT, FORMAT_V1, Manifest, read_manifest, write_manifest
from distrib_face.data.testing import write_indexed_shards


def _manifest(num_classes=5, names=None):
    counts = np.arange(1, num_classes + 1)
    total = int(counts.sum())
    return Manifest(num_classes=num_classes, num_samples=total, shards=["a.tar", "b.tar"],
                    shard_counts=[total - 3, 3], class_counts=counts,
                    class_names=names if names is not None else [f"person é{i}" for i in range(num_classes)],
                    source={"kind": "test"}, content_hash="c" * 64, image_size=(16, 16),
                    shard_hashes=["1" * 64, "2" * 64], shard_bytes=[100, 200])


def _same(a: Manifest, b: Manifest) -> None:
    for name in ("num_classes", "num_samples", "shard_counts", "source", "content_hash", "image_size",
                 "shard_hashes", "shard_bytes", "class_names", "label_map"):
        assert getattr(a, name) == getattr(b, name), name
    assert [s.rsplit("/", 1)[-1] for s in a.shards] == [s.rsplit("/", 1)[-1] for s in b.shards]
    assert a.class_counts.tolist() == b.class_counts.tolist()


def _table(root):
    (path,) = root.glob("classes-*.npz")
    return path


def test_format2_round_trip_keeps_every_field_and_the_table_is_named_by_its_digest(tmp_path):
    written = _manifest()
    write_manifest(tmp_path, written)
    raw = json.loads((tmp_path / "manifest.json").read_text())
    assert raw["format"] == FORMAT and "class_counts" not in raw and "label_map" not in raw
    table = _table(tmp_path)
    digest = hashlib.sha256(table.read_bytes()).hexdigest()
    assert raw["classes"] == {"name": f"classes-{digest[:16]}.npz", "bytes": table.stat().st_size, "sha256": digest}
    with np.load(table, allow_pickle=False) as npz:  # the documented layout, readable without distrib_face
        assert npz["class_counts"].tolist() == [1, 2, 3, 4, 5]
        offsets, blob = npz["name_offsets"], npz["name_bytes"].tobytes()
        assert blob[offsets[2]:offsets[3]].decode() == "person é2"
    read = read_manifest(tmp_path)
    assert read.format == FORMAT and not read.class_counts.flags.writeable
    _same(written, read)
    assert read.label_map["person é3"] == 3 and read.counts_by_name()["person é3"] == 4


def test_format1_manifests_still_read_and_rewrite_as_format2(tmp_path):
    written = _manifest(names=["ann", "", "cat", "dan", "eve"])  # label 1 has no name
    (tmp_path / "manifest.json").write_text(json.dumps(written.to_json_dict_v1()))
    old = read_manifest(tmp_path)
    assert old.format == FORMAT_V1 and old.label_map == {"ann": 0, "cat": 2, "dan": 3, "eve": 4}
    assert old.class_names == ["ann", "", "cat", "dan", "eve"]
    write_manifest(tmp_path, old)  # the upgrade
    new = read_manifest(tmp_path)
    assert new.format == FORMAT
    _same(old, new)
    # a label without a name is known by its number, as load_class_counts always did
    assert dict(new.counts_by_name()) == {"ann": 1, "1": 2, "cat": 3, "dan": 4, "eve": 5}


# A format-1 manifest.json as the packer of format 1 wrote it, frozen here by hand (not produced by this
# library's own writer): class counts and the label map inline, label 1 without a name.
FROZEN_V1 = """{
  "format": "distrib_face.shards/1",
  "num_classes": 3,
  "num_samples": 9,
  "shards": [
    {"name": "shard-00000.tar", "count": 5, "bytes": 40960, "sha256": "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa"},
    {"name": "shard-00001.tar", "count": 4, "bytes": 30720, "sha256": "bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb"}
  ],
  "class_counts": [2, 3, 4],
  "label_map": {"alice": 0, "carol": 2},
  "image_size": [112, 112],
  "source": {"kind": "image_folder", "root": "/data/faces"},
  "content_hash": "ffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff"
}
"""


def test_a_frozen_hand_written_format1_manifest_reads(tmp_path):
    (tmp_path / "manifest.json").write_text(FROZEN_V1)
    old = read_manifest(tmp_path)
    assert old.format == FORMAT_V1 == "distrib_face.shards/1"
    assert (old.num_classes, old.num_samples, old.shard_counts) == (3, 9, [5, 4])
    assert [s.rsplit("/", 1)[-1] for s in old.shards] == ["shard-00000.tar", "shard-00001.tar"]
    assert old.shards[0] == str(tmp_path / "shard-00000.tar")
    assert old.shard_bytes == [40960, 30720] and old.shard_hashes == ["a" * 64, "b" * 64]
    assert old.class_counts.tolist() == [2, 3, 4]
    assert old.label_map == {"alice": 0, "carol": 2} and old.class_names == ["alice", "", "carol"]
    assert old.image_size == (112, 112) and old.content_hash == "f" * 64
    assert old.source == {"kind": "image_folder", "root": "/data/faces"}
    assert dict(old.counts_by_name()) == {"alice": 2, "1": 3, "carol": 4}


def test_a_rewrite_replaces_the_table_only_after_the_manifest(tmp_path):
    write_manifest(tmp_path, _manifest())
    first = _table(tmp_path)
    changed = _manifest(names=[f"other{i}" for i in range(5)])
    write_manifest(tmp_path, changed)
    second = _table(tmp_path)
    assert second.name != first.name and not first.exists()  # the stale table went once nothing named it
    assert read_manifest(tmp_path).class_names == [f"other{i}" for i in range(5)]


def test_format2_refuses_two_names_for_one_label_and_empty_names(tmp_path):
    counts = [1, 1]
    with pytest.raises(ValueError, match="maps both 'a' and 'b' to label 0"):
        write_manifest(tmp_path, Manifest(2, 2, ["x.tar"], [2], counts, label_map={"a": 0, "b": 0}))
    with pytest.raises(ValueError, match="empty identity name"):
        write_manifest(tmp_path, Manifest(2, 2, ["x.tar"], [2], counts, label_map={"": 1}))


def _rewrite_table(root, **arrays):
    """Replace the class table's arrays and re-point the manifest at it (a consistent digest)."""
    path = _table(root)
    with np.load(path, allow_pickle=False) as npz:
        current = {key: npz[key] for key in npz.files}
    current.update(arrays)
    buffer = io.BytesIO()
    np.savez(buffer, **current)
    data = buffer.getvalue()
    path.write_bytes(data)
    manifest = json.loads((root / "manifest.json").read_text())
    manifest["classes"].update(bytes=len(data), sha256=hashlib.sha256(data).hexdigest())
    (root / "manifest.json").write_text(json.dumps(manifest))


def _edit_json(root, change):
    manifest = json.loads((root / "manifest.json").read_text())
    change(manifest)
    (root / "manifest.json").write_text(json.dumps(manifest))


@pytest.mark.parametrize("damage,message", [
    (lambda r: _rewrite_table(r, class_counts=np.array([1] * 11 + [-1])), r"class_counts\[11\] must be >= 0, got -1"),
    (lambda r: _rewrite_table(r, class_counts=np.ones(11, np.int64)), "class_counts has 11 entries for num_classes=12"),
    (lambda r: _rewrite_table(r, class_counts=np.array([2] + [1] * 11)), "num_samples=12 but the class counts sum to 13"),
    (lambda r: _rewrite_table(r, class_counts=np.ones(12, np.float64)), "class_counts must be a 1-d integer array"),
    (lambda r: _rewrite_table(r, name_offsets=np.zeros(13, np.int64)), "name_offsets must rise from 0"),
    (lambda r: _rewrite_table(r, name_bytes=np.array([0xFF] * 14, np.uint8)), "name of label 0 is not UTF-8"),
    (lambda r: _rewrite_table(r, class_counts=np.array([object()] * 12)), "not a class table"),
    (lambda r: _table(r).write_bytes(_table(r).read_bytes()[:-1]), "bytes but .* says classes.bytes="),
    (lambda r: _table(r).write_bytes(b"x" * _table(r).stat().st_size), "SHA-256 differs from classes.sha256"),
    (lambda r: _table(r).unlink(), "the class table named by .* is missing"),
    (lambda r: _edit_json(r, lambda m: m["classes"].update(name="../classes.npz")), "classes.name must be a file name"),
    (lambda r: _edit_json(r, lambda m: m["classes"].update(sha256="abc")), "classes.sha256 must be 64"),
    (lambda r: _edit_json(r, lambda m: m.pop("classes")), "missing field 'classes'"),
    (lambda r: _edit_json(r, lambda m: m.update(format="distrib_face.shards/3")), "is not one of"),
])
def test_a_damaged_or_inconsistent_class_table_is_refused_naming_the_field(tmp_path, damage, message):
    write_indexed_shards(tmp_path, [5, 7])
    damage(tmp_path)
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        manifest = read_manifest(tmp_path)
        manifest.class_names  # the names are decoded on first use  # noqa: B018


def test_the_reader_spec_carries_one_weight_array_not_a_list(tmp_path):
    # a reader process gets the long-tail repeat factors as one float64 array: 8 bytes a class when pickled
    write_indexed_shards(tmp_path, [6, 6, 6, 6])
    loader = build_loader(tmp_path, batch_size=4, rank=0, world_size=1, num_workers=2, decoder="pil",
                          rebalance="sqrt", augment=False)
    spec = loader._specs(0, 0, [0, 0])[0]
    assert isinstance(spec.weights, np.ndarray) and spec.weights.dtype == np.float64 and spec.weights.shape == (24,)
    without = pickle.dumps(loader._specs(0, 0, [0, 0])[0].__class__(**{**spec.__dict__, "weights": None}))
    assert len(pickle.dumps(spec)) - len(without) < 8 * 24 + 200
    counts = np.ones(24)
    assert np.allclose(spec.weights, counts.sum() / (np.sqrt(counts) * np.sqrt(counts).sum()))


def test_data_verify_finds_class_counts_the_shards_do_not_hold(tmp_path):
    from distrib_face.data.verify import verify_shards

    write_indexed_shards(tmp_path, [5, 7])  # sample i has label i: one sample per class
    assert verify_shards(tmp_path, workers=2, progress=False).ok
    _rewrite_table(tmp_path, class_counts=np.array([2, 0] + [1] * 10))  # same total, two classes wrong
    result = verify_shards(tmp_path, workers=2, progress=False)
    assert result.set_problems == ["class_counts[0] = 2 in the manifest, but the shards hold 1 samples of label 0 "
                                   "(and 1 more classes differ)"]
