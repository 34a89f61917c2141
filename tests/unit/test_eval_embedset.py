"""`distrib-face embed`: every source kind, parity with eval's embedding, bad images skipped and counted."""

from __future__ import annotations

import io
import os
import struct
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from distrib_face.cli import main
from distrib_face.data.manifest import Manifest, content_hash, write_manifest
from distrib_face.data.shards import ShardWriter
from distrib_face.eval.embed import embed_images, load_model
from distrib_face.eval.embedset import EmbeddingSet, embed_source, load_embeddings, save_embeddings
from distrib_face.eval.metrics import l2_normalize
from distrib_face.eval.sources import SourceError, decode_safely, reader_context, scan_image_source


def _net(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 5, stride=4), torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(4 * 27 * 27, 8),
    ).eval()


def _encoded(rng: np.random.Generator, fmt: str = "JPEG") -> bytes:
    # sizes other than 112 x 112 exercise the resize; grey images the RGB conversion
    h, w = int(rng.integers(60, 140)), int(rng.integers(60, 140))
    shape = (h, w) if rng.random() < 0.3 else (h, w, 3)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)).save(buf, format=fmt)
    return buf.getvalue()


def _bomb_png() -> bytes:
    """A valid PNG header claiming 20000 x 20000 pixels (over the default pixel limit); tiny on disk."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", 20000, 20000, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + \
        chunk(b"IEND", b"")


BAD = {
    "empty": b"",
    "not_an_image": b"this is not an image at all",
    "too_large": _bomb_png(),
}


def _truncated(rng: np.random.Generator) -> bytes:
    data = _encoded(rng)
    return data[: len(data) // 2]


def _identity_folder(root: Path, seed: int = 0) -> tuple[dict[str, bytes], dict[str, str]]:
    """3 identities x 4 good images (+ planted bad ones); returns {relative name: bytes} and {name: reason}."""
    rng = np.random.default_rng(seed)
    good, bad = {}, {}
    for ident in ("carol", "alice", "bob"):
        (root / ident).mkdir(parents=True)
        for k in range(4):
            name = f"{ident}/{k}.{'png' if k % 2 else 'jpg'}"
            data = _encoded(rng, "PNG" if k % 2 else "JPEG")
            (root / name).write_bytes(data)
            good[name] = data
    planted = {"alice/x_empty.jpg": "empty", "bob/x_text.jpg": "not_an_image", "bob/x_bomb.png": "too_large",
               "carol/x_cut.jpg": "truncated", "carol/y_cut.jpg": "truncated"}
    for name, reason in planted.items():
        (root / name).write_bytes(_truncated(rng) if reason == "truncated" else BAD[reason])
        bad[name] = reason
    return good, bad


def _reference(net: torch.nn.Module, images: list[bytes]) -> np.ndarray:
    """What `distrib-face eval` computes for these images: embed_images on the bytes, then L2 normalisation."""
    return l2_normalize(embed_images(net, images, batch_size=5, flip=True))


def test_decode_safely_names_each_reason():
    rng = np.random.default_rng(1)
    assert decode_safely(_encoded(rng), (112, 112))[0].shape == (112, 112, 3)
    for reason, data in BAD.items():
        array, got, message = decode_safely(data, (112, 112))
        assert array is None and got == reason and message
    assert decode_safely(_truncated(rng), (112, 112))[1] == "truncated"
    assert decode_safely(None, (112, 112))[1] == "missing_image"


@pytest.mark.parametrize("workers", [0, 2])
def test_identity_folder_matches_eval_and_counts_bad_images(tmp_path, workers):
    good, bad = _identity_folder(tmp_path / "faces")
    net = _net()
    emb = embed_source(net, tmp_path / "faces", workers=workers, batch_size=3, chunk_size=4, progress=False)
    assert emb.names == sorted(good)  # identity folders sorted, files sorted inside
    reference = _reference(net, [good[n] for n in emb.names])
    np.testing.assert_allclose(emb.embeddings, reference, atol=1e-6)
    assert emb.embeddings.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(emb.embeddings, axis=1), 1.0, atol=1e-6)
    labels = {"alice": 0, "bob": 1, "carol": 2}  # the labels `pack` gives: sorted identity names
    assert emb.identities == [n.split("/")[0] for n in emb.names]
    assert emb.labels.tolist() == [labels[n.split("/")[0]] for n in emb.names]
    assert dict(zip(emb.skipped_names, emb.skipped_reasons)) == bad
    assert emb.skip_counts == {"too_large": 1, "empty": 1, "not_an_image": 1, "truncated": 2}


def test_flat_folder_and_list_file(tmp_path):
    rng = np.random.default_rng(2)
    flat = tmp_path / "flat"
    flat.mkdir()
    images = {f"img{k}.jpg": _encoded(rng) for k in range(5)}
    for name, data in images.items():
        (flat / name).write_bytes(data)
    (flat / "broken.jpg").write_bytes(b"\xff\xd8\xff garbage")
    net = _net(1)
    emb = embed_source(net, flat, workers=0, batch_size=2, progress=False)
    assert scan_image_source(flat).kind == "flat"
    assert emb.names == sorted(images) and emb.labels.tolist() == [-1] * 5 and emb.identities == [""] * 5
    np.testing.assert_allclose(emb.embeddings, _reference(net, [images[n] for n in emb.names]), atol=1e-6)
    assert emb.skipped_names == ["broken.jpg"] and len(emb.skipped_reasons) == 1

    # a list file, paths relative to it, identities that are not folder names; a missing file is skipped
    lines = ["# comment", "flat/img3.jpg  zed", "flat/img0.jpg 7", "flat/img1.jpg zed", "flat/gone.jpg 7"]
    (tmp_path / "list.txt").write_text("\n".join(lines) + "\n")
    emb = embed_source(net, tmp_path / "list.txt", workers=0, progress=False)
    assert scan_image_source(tmp_path / "list.txt").kind == "list"
    assert emb.names == ["flat/img3.jpg", "flat/img0.jpg", "flat/img1.jpg"]
    assert emb.identities == ["zed", "7", "zed"]
    assert emb.labels.tolist() == [1, 0, 1]  # scan_list's order: numbers first, then names
    assert emb.skip_counts == {"unreadable_file": 1}
    np.testing.assert_allclose(
        emb.embeddings, _reference(net, [images[n.split("/")[1]] for n in emb.names]), atol=1e-6
    )


def test_shard_folder_labels_names_and_bad_samples(tmp_path):
    rng = np.random.default_rng(3)
    writer = ShardWriter(tmp_path / "shards", prefix="train", max_count=4)
    (tmp_path / "shards").mkdir()
    samples = []
    for index in range(9):
        label = index % 3
        data = _encoded(rng) if index not in (2, 6) else (b"junk" if index == 2 else _truncated(rng))
        writer.write(f"{index:09d}", data, label)
        samples.append((f"train-{index // 4:06d}.tar/{index:09d}", data, label))
    finished = writer.close()
    counts = [3, 3, 3]
    write_manifest(tmp_path / "shards", Manifest(
        num_classes=3, num_samples=9, shards=[str(f.path) for f in finished], shard_counts=[f.count for f in finished],
        class_counts=counts, label_map={"ann": 0, "ben": 1, "cat": 2},
        content_hash=content_hash([f.sha256 for f in finished]),
    ))
    net = _net(2)
    emb = embed_source(net, tmp_path / "shards", workers=2, batch_size=4, chunk_size=3, progress=False)
    kept = [s for i, s in enumerate(samples) if i not in (2, 6)]
    assert emb.names == [s[0] for s in kept]
    assert emb.labels.tolist() == [s[2] for s in kept]
    assert emb.identities == [["ann", "ben", "cat"][s[2]] for s in kept]
    assert emb.skipped_names == [samples[2][0], samples[6][0]]
    assert emb.skipped_reasons == ["not_an_image", "truncated"]
    np.testing.assert_allclose(emb.embeddings, _reference(net, [s[1] for s in kept]), atol=1e-6)
    # the manifest file itself is a shard source too
    assert scan_image_source(tmp_path / "shards" / "manifest.json").kind == "shards"


def test_embedding_file_round_trip_without_pickle(tmp_path):
    emb = EmbeddingSet(
        embeddings=l2_normalize(np.random.default_rng(0).normal(size=(3, 4))).astype(np.float32),
        labels=[0, -1, 2], names=["a", "b", "c"], identities=["x", "", "z"],
        skipped_names=["d", "e"], skipped_reasons=["empty", "empty"],
        meta={"source": "somewhere", "source_kind": "folder", "model": "m.onnx", "flip": True, "image_size": [112, 96]},
    )
    back = load_embeddings(save_embeddings(tmp_path / "e.npz", emb))
    np.testing.assert_array_equal(back.embeddings, emb.embeddings)
    assert back.labels.tolist() == [0, -1, 2] and back.names == emb.names and back.identities == emb.identities
    assert back.skip_counts == {"empty": 2} and back.meta == emb.meta
    with np.load(tmp_path / "e.npz", allow_pickle=False) as z:
        assert z["skip_reasons"].tolist() == ["empty"] and z["skip_counts"].tolist() == [2]
    np.savez(tmp_path / "other.npz", x=np.zeros(3))
    with pytest.raises(ValueError, match="other.npz: not an embedding file.*'embeddings'"):
        load_embeddings(tmp_path / "other.npz")
    (tmp_path / "text.npz").write_text("hello")
    with pytest.raises(ValueError, match="text.npz: not an embedding file"):
        load_embeddings(tmp_path / "text.npz")
    (tmp_path / "manifest.json").write_text('{"format": "distrib_face.shards/2"}')
    with pytest.raises(ValueError, match="manifest.json: not an embedding file") as refused:
        load_embeddings(tmp_path / "manifest.json")
    assert "pickle" not in str(refused.value)  # not np.load's advice to allow pickles


def test_source_errors_name_the_path(tmp_path):
    with pytest.raises(SourceError, match="nowhere: no such file or folder"):
        scan_image_source(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(SourceError, match="empty: no images"):
        scan_image_source(tmp_path / "empty")
    (tmp_path / "bad.txt").write_text("only-a-path\n")
    with pytest.raises(SourceError, match=r"bad.txt:1: expected 'path label'"):
        scan_image_source(tmp_path / "bad.txt")
    with pytest.raises(SourceError, match="no shard manifest"):
        scan_image_source(tmp_path / "missing" / "manifest.json")


def test_embed_cli_with_onnx_model(tmp_path, capsys):
    good, bad = _identity_folder(tmp_path / "faces", seed=4)
    net = _net(3)
    torch.onnx.export(net, torch.zeros(1, 3, 112, 112), str(tmp_path / "m.onnx"), input_names=["input"],
                      output_names=["embedding"], dynamic_axes={"input": {0: "batch"}, "embedding": {0: "batch"}},
                      dynamo=False)
    out = tmp_path / "out" / "faces.npz"
    code = main(["embed", str(tmp_path / "faces"), "--model", str(tmp_path / "m.onnx"), "--output", str(out),
                 "--workers", "1", "--batch-size", "4", "--no-progress"])
    assert code == 0
    err = capsys.readouterr().err
    assert "12 embeddings of dim 8" in err
    assert "skipped 5: empty 1, not_an_image 1, too_large 1, truncated 2" in err
    emb = load_embeddings(out)
    onnx_reference = l2_normalize(embed_images(load_model(tmp_path / "m.onnx"), [good[n] for n in emb.names]))
    np.testing.assert_allclose(emb.embeddings, onnx_reference, atol=1e-6)
    np.testing.assert_allclose(emb.embeddings, _reference(net, [good[n] for n in emb.names]), atol=1e-5)
    assert emb.meta["source_kind"] == "folder" and emb.meta["model"] == str(tmp_path / "m.onnx")
    assert main(["embed", str(tmp_path / "nowhere"), "--model", str(tmp_path / "m.onnx"), "--output", str(out)]) == 2
    # the one error line every subcommand prints (cli/errors.py: report), naming the path
    assert [line for line in capsys.readouterr().err.splitlines() if "error" in line] == [
        f"distrib-face: error: {tmp_path / 'nowhere'}: no such file or folder"]


def test_readers_never_fork_and_a_stuck_read_fails_within_the_timeout(tmp_path):
    assert reader_context().get_start_method() in ("forkserver", "spawn")
    flat = tmp_path / "flat"
    flat.mkdir()
    (flat / "a.jpg").write_bytes(_encoded(np.random.default_rng(5)))
    os.mkfifo(flat / "b.jpg")  # open() blocks until a writer comes: a read that never finishes
    (tmp_path / "list.txt").write_text("flat/a.jpg 0\nflat/b.jpg 1\n")
    start = time.monotonic()
    with pytest.raises(RuntimeError, match="no result within 2 s"):
        embed_source(_net(), tmp_path / "list.txt", workers=1, chunk_size=1, timeout=2, progress=False)
    assert time.monotonic() - start < 30  # the stuck reader was terminated, not waited for


def test_progress_without_a_terminal_logs_rate_and_skips(caplog):
    from distrib_face.eval.embedset import ImageProgress

    caplog.set_level("INFO", logger="distrib_face.eval.embedset")
    bar = ImageProgress(10, use_bar=False, every_s=0.0)
    bar.update(4, 1)
    bar.close()
    assert bar.bar is None and bar.done == 4 and bar.skipped == 1
    assert any("embedded 4/10 images (1 skipped)" in r.message and "img/s" in r.message for r in caplog.records)
