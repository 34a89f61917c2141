"""Packing: folder / RecordIO / list sources -> shards that read back image for image, label for label;
bad input skipped, reported and signalled by the exit code; existing output refused, resumed or replaced."""

from __future__ import annotations

import io
import json
import tarfile

import numpy as np
import pytest
from PIL import Image

from distrib_face.cli import main
from distrib_face.data import read_manifest
from distrib_face.data.pack import PackError, pack
from distrib_face.data.recordio import (
    MAGIC,
    pack_record,
    read_idx,
    read_record,
    unpack_record,
    write_insightface_rec,
    write_recordio,
)
from distrib_face.data.testing import jpeg_bytes, sample_image


def _read_shards(out) -> dict[int, list[bytes]]:
    """label -> images, read with the plain tarfile module (independent of the reader under test)."""
    manifest = read_manifest(out)
    by_label: dict[int, list[bytes]] = {}
    for shard in manifest.shards:
        with tarfile.open(shard) as tar:
            members = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
        for name, data in members.items():
            if name.endswith(".jpg"):
                label = int(members[name[:-4] + ".cls"])
                by_label.setdefault(label, []).append(data)
    return by_label


def _decode(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), dtype=np.float64)


@pytest.fixture()
def folder(tmp_path):
    root = tmp_path / "faces"
    formats = ["JPEG", "PNG", "BMP", "PPM", "WEBP"]
    for person in range(5):
        (root / f"person{person}").mkdir(parents=True)
        for k in range(4):
            fmt = formats[(person + k) % len(formats)]
            ext = {"JPEG": "jpg", "PPM": "pgm"}.get(fmt, fmt.lower())
            image = Image.fromarray(sample_image(person * 10 + k, 20))
            if ext == "pgm":
                image = image.convert("L")
            kwargs = {"lossless": True} if fmt == "WEBP" else {}
            image.save(root / f"person{person}" / f"{k}.{ext}", format=fmt, **kwargs)
    (root / "nobody").mkdir()
    (root / "person2" / "notes.txt").write_text("not an image")
    return root


def test_folder_round_trip_every_image_with_its_label(folder, tmp_path):
    out = tmp_path / "shards"
    result = pack(folder, out, max_count=7, workers=2, progress=False)
    manifest = read_manifest(out)
    assert manifest.num_classes == 5 and manifest.num_samples == 20
    assert manifest.shard_counts == [7, 7, 6]
    assert manifest.label_map == {f"person{i}": i for i in range(5)}
    assert manifest.class_counts.tolist() == [4] * 5 and manifest.image_size == (20, 20)
    assert result.empty_identities == ["nobody"] and result.num_skipped == 0
    packed = _read_shards(out)
    for person in range(5):
        originals = sorted((folder / f"person{person}").glob("*.*"))
        originals = [p for p in originals if p.suffix != ".txt"]
        assert len(packed[person]) == len(originals)
        for path, data in zip(originals, packed[person]):
            reference = np.asarray(Image.open(path).convert("RGB"), dtype=np.float64)
            if path.suffix == ".jpg":
                assert data == path.read_bytes(), "JPEG input is passed through unchanged"
            else:
                assert np.abs(_decode(data) - reference).mean() < 2.0  # re-encoded at quality 95


def test_corrupt_image_is_skipped_reported_and_sets_the_exit_code(folder, tmp_path):
    good = folder / "person1" / "bad.jpg"
    data = jpeg_bytes(sample_image(5, 20))
    good.write_bytes(data[: len(data) // 3])
    (folder / "person3" / "garbage.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    out = tmp_path / "shards"
    assert main(["pack", str(folder), str(out), "--workers", "2", "--no-progress"]) == 3
    report = json.loads((out / "pack_report.json").read_text())
    assert report["num_skipped"] == 2
    assert {entry["item"] for entry in report["skipped"]} == {str(good), str(folder / "person3" / "garbage.png")}
    assert report["empty_identities"] == ["nobody"]
    assert read_manifest(out).num_samples == 20  # 22 image files, 2 unreadable
    # the same output again is refused, strict mode stops at the first bad image
    assert main(["pack", str(folder), str(out), "--no-progress"]) == 2
    assert main(["pack", str(folder), str(tmp_path / "strict"), "--strict", "--no-progress", "--workers", "1"]) == 2


def test_resume_after_an_interrupted_run_gives_the_same_shards(folder, tmp_path):
    bad = folder / "person3" / "0.jpg"
    bad.parent.mkdir(exist_ok=True)
    fine = jpeg_bytes(sample_image(99, 20))
    bad.write_bytes(fine[:50])
    out = tmp_path / "shards"
    with pytest.raises(PackError, match="strict"):
        pack(folder, out, max_count=3, workers=1, strict=True, progress=False)
    assert (out / ".pack-progress.json").exists() and not (out / "manifest.json").exists()
    with pytest.raises(PackError, match="already holds"):
        pack(folder, out, max_count=3, workers=1, progress=False)
    with pytest.raises(PackError, match="another input listing"):
        pack(folder, out, max_count=4, workers=1, progress=False, if_exists="resume")
    bad.write_bytes(fine)
    resumed = pack(folder, out, max_count=3, workers=1, progress=False, if_exists="resume")
    fresh = pack(folder, tmp_path / "fresh", max_count=3, workers=2, progress=False)
    assert resumed.manifest.content_hash == fresh.manifest.content_hash
    assert resumed.manifest.num_samples == 21
    again = pack(folder, out, max_count=3, workers=1, progress=False, if_exists="resume")
    assert again.manifest.content_hash == fresh.manifest.content_hash
    replaced = pack(folder, out, max_count=5, workers=1, progress=False, if_exists="overwrite")
    assert replaced.manifest.shard_counts == [5, 5, 5, 5, 1]


def test_list_file_source(tmp_path):
    lines = []
    for i in range(6):
        path = tmp_path / "img" / f"{i}.png"
        path.parent.mkdir(exist_ok=True)
        Image.fromarray(sample_image(i, 12)).save(path)
        lines.append(f"img/{i}.png {10 + i % 2}")
    (tmp_path / "list.txt").write_text("# path label\n" + "\n".join(lines) + "\n")
    result = pack(tmp_path / "list.txt", tmp_path / "out", workers=1, progress=False)
    assert result.manifest.label_map == {"10": 0, "11": 1}
    assert result.manifest.class_counts.tolist() == [3, 3]


def test_recordio_records_split_at_the_magic_number_read_back(tmp_path):
    magic = MAGIC.to_bytes(4, "little")
    payloads = [b"plain", b"abcd" + magic + b"efgh" + magic, magic + b"xy", b"" , b"1234" * 3 + magic]
    write_recordio(tmp_path / "a.rec", tmp_path / "a.idx", list(enumerate(payloads)))
    raw = (tmp_path / "a.rec").read_bytes()
    assert raw.count(magic) > len(payloads), "payloads holding the magic are written in parts"
    with open(tmp_path / "a.rec", "rb") as handle:
        assert [read_record(handle, offset) for _, offset in read_idx(tmp_path / "a.idx")] == payloads


def test_recordio_header_and_labels():
    record = unpack_record(pack_record(7.0, b"IMG", record_id=3))
    assert (record.flag, record.label, record.id, record.payload) == (0, 7.0, 3, b"IMG")
    record = unpack_record(pack_record([5.0, 1.0, 2.0], b"IMG"))
    assert record.flag == 3 and record.label == 5.0 and record.payload == b"IMG"
    with pytest.raises(ValueError, match="IRHeader"):
        unpack_record(b"short")


@pytest.mark.parametrize("multi_label", [False, True])
def test_insightface_rec_to_shards(tmp_path, multi_label):
    images = [(label, jpeg_bytes(sample_image(i, 16))) for i, label in enumerate([3, 3, 8, 5, 8, 8, 3])]
    write_insightface_rec(tmp_path / "rec", images, multi_label=multi_label)
    result = pack(tmp_path / "rec", tmp_path / "out", workers=2, progress=False)
    manifest = result.manifest
    assert manifest.label_map == {"3": 0, "5": 1, "8": 2}
    assert manifest.class_counts.tolist() == [3, 1, 3] and manifest.num_samples == 7
    packed = _read_shards(tmp_path / "out")
    for label, data in images:
        assert data in packed[manifest.label_map[str(label)]]


def test_shard_bytes_are_tarfiles_and_the_digest_is_the_files(tmp_path):
    # the writer appends pre-encoded members itself: its shards must be byte for byte what tarfile writes
    import hashlib
    import io
    import tarfile

    from distrib_face.data.shards import ShardWriter, encode_sample

    samples = [(f"{i:09d}", bytes(range(i % 256)) * (i + 1), i * 7) for i in range(23)]
    writer = ShardWriter(tmp_path, prefix="t", max_count=10)
    for key, image, label in samples[:12]:
        writer.write(key, image, label)
    for key, image, label in samples[12:]:
        writer.write_encoded(encode_sample(key, image, label), len(image), label)
    shards = writer.close()
    assert [s.count for s in shards] == [10, 10, 3]
    for number, shard in enumerate(shards):
        reference = io.BytesIO()
        with tarfile.open(fileobj=reference, mode="w", format=tarfile.USTAR_FORMAT) as tar:
            for key, image, label in samples[10 * number:10 * number + 10]:
                for name, payload in ((f"{key}.jpg", image), (f"{key}.cls", str(label).encode())):
                    info = tarfile.TarInfo(name)
                    info.size, info.mode, info.mtime = len(payload), 0o444, 0
                    tar.addfile(info, io.BytesIO(payload))
        data = shard.path.read_bytes()
        assert data == reference.getvalue()
        assert shard.bytes == len(data) and shard.sha256 == hashlib.sha256(data).hexdigest()
        assert shard.labels == [label for _, _, label in samples[10 * number:10 * number + 10]]
    with pytest.raises(ValueError, match="must not contain"):
        encode_sample("a.b", b"x", 1)


def test_folder_scan_lists_what_pathlib_lists_in_the_same_order(tmp_path):
    # scan_folder walks with os.scandir (no stat per file); the reference is sorted(Path.rglob) per identity
    from distrib_face.data.pack import IMAGE_EXTENSIONS, scan_folder

    for rel in ["a/x.jpg", "a/sub/y.JPG", "a/sub-z.png", "a/sub/deeper/q.webp", "b/notes.txt", "c/.hidden.jpg",
                "a/a-b.jpg", "a/a/b.jpg", "d/e/f.bmp", "a b/ü.jpeg"]:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"x")
    (tmp_path / "empty").mkdir()
    (tmp_path / "a" / "link.jpg").symlink_to(tmp_path / "a" / "x.jpg")
    (tmp_path / "a" / "linked").symlink_to(tmp_path / "d", target_is_directory=True)
    scanned = scan_folder(tmp_path)
    expected, names = [], []
    for folder in sorted((p for p in tmp_path.iterdir() if p.is_dir()), key=lambda p: p.name):
        files = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
        expected += [(str(p), folder.name) for p in files]
        names += [folder.name] if files else []
    assert [(item.ref, item.identity) for item in scanned.items] == expected
    assert scanned.identities == names and scanned.empty_identities == ["b", "empty"]
