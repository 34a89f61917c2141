"""The real DALI CPU pipeline, a real HTTP server on 127.0.0.1, the real ORL faces, the synthetic set."""

from __future__ import annotations

import functools
import http.server
import io
import tarfile
import threading

import numpy as np
import pytest
import torch
from PIL import Image

from distrib_face.cli import main
from distrib_face.data import build_loader, read_manifest, write_synthetic
from distrib_face.data.pack import pack
from distrib_face.data.pairset import load_pairset
from distrib_face.data.testing import write_indexed_shards


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    out = tmp_path_factory.mktemp("indexed")
    write_indexed_shards(out, [30, 25, 35], image_size=24)
    return out


def _pil_reference(manifest, label: int) -> np.ndarray:
    for shard in manifest.shards:
        with tarfile.open(shard) as tar:
            names = tar.getnames()
            if f"{label:08d}.jpg" in names:
                data = tar.extractfile(f"{label:08d}.jpg").read()
                image = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), dtype=np.float64)
                return ((image - 127.5) / 127.5).transpose(2, 0, 1)
    raise KeyError(label)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_dali_cpu_equals_a_pil_decode_within_jpeg_tolerance(shards, num_workers):
    manifest = read_manifest(shards)
    loader = build_loader(shards, batch_size=16, rank=0, world_size=1, num_workers=num_workers, decoder="dali",
                          augment=False, dali_threads=2, drop_last=False)
    seen = []
    for images, labels in loader:
        assert images.dtype == torch.float32 and images.shape[1:] == (3, 24, 24) and labels.dtype == torch.int64
        for image, label in zip(images, labels):
            reference = _pil_reference(manifest, int(label))
            diff = np.abs(image.numpy() - reference)
            # libjpeg-turbo in DALI and in Pillow may differ in IDCT / chroma upsampling by a few levels
            assert diff.mean() < 2 / 127.5 and diff.max() <= 24 / 127.5
            seen.append(int(label))
    assert sorted(seen) == list(range(90))


def test_dali_flip_mirrors_and_half_precision(shards):
    manifest = read_manifest(shards)
    loader = build_loader(shards, batch_size=30, rank=0, world_size=1, num_workers=0, decoder="dali",
                          augment={"flip": True}, dtype="float16", seed=1)
    images, labels = next(iter(loader))
    assert images.dtype == torch.float16
    flipped = 0
    for image, label in zip(images.float().numpy(), labels):
        reference = _pil_reference(manifest, int(label))
        straight = np.abs(image - reference).mean()
        mirrored = np.abs(image - reference[:, :, ::-1]).mean()
        assert min(straight, mirrored) < 2 / 127.5
        flipped += mirrored < straight
    assert 3 <= flipped <= 27, f"about half the images should be mirrored, got {flipped} of 30"


def test_dali_augmentations_run_and_resize(shards):
    loader = build_loader(shards, batch_size=8, rank=0, world_size=1, num_workers=0, decoder="dali",
                          image_size=20, augment={"random_resized_crop": (0.5, 1.0), "color_jitter": 0.3,
                                                  "grey_prob": 0.5, "blur_prob": 0.5})
    images, _ = next(iter(loader))
    assert images.shape == (8, 3, 20, 20)
    assert images.min() >= -1 and images.max() <= 1
    pil = build_loader(shards, batch_size=8, rank=0, world_size=1, num_workers=0, decoder="pil", image_size=20,
                       augment={"random_resized_crop": (0.5, 1.0), "color_jitter": 0.3, "grey_prob": 0.5,
                                "blur_prob": 0.5})
    assert next(iter(pil))[0].shape == (8, 3, 20, 20)


def test_dali_skips_a_corrupt_jpeg_and_keeps_the_epoch(tmp_path):
    write_indexed_shards(tmp_path, [12, 12], corrupt=[3])
    loader = build_loader(tmp_path, batch_size=4, rank=0, world_size=1, num_workers=0, decoder="dali")
    labels = [int(v) for _, batch in loader for v in batch]
    assert len(labels) == 24 and 3 not in labels and loader.num_skipped >= 1


def test_dali_epochs_repeat_and_resume(shards):
    kwargs = dict(batch_size=10, rank=0, world_size=1, num_workers=2, decoder="dali", seed=4)
    loader = build_loader(shards, **kwargs)
    epochs = [[int(v) for _, labels in loader for v in labels] for _ in range(2)]
    assert all(sorted(e) == list(range(90)) for e in epochs), "external_source must not run dry after epoch 1"
    assert epochs[0] != epochs[1]
    partial = build_loader(shards, **kwargs)
    iterator = iter(partial)
    first = [int(v) for _ in range(4) for v in next(iterator)[1]]
    state = partial.state_dict()
    iterator.close()
    resumed = build_loader(shards, **kwargs)
    resumed.load_state_dict(state)
    rest = [int(v) for _, labels in resumed for v in labels]
    assert first == epochs[0][:40]
    assert sorted(first + rest) == list(range(90))


@pytest.fixture()
def http_root(shards):
    class QuietHandler(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):  # noqa: D102 - keep the test output clean
            pass

    handler = functools.partial(QuietHandler, directory=str(shards))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


@pytest.mark.parametrize("decoder", ["pil", "dali"])
def test_streaming_shards_over_http(http_root, decoder):
    manifest = read_manifest(http_root)
    assert manifest.shards[0].startswith("http://127.0.0.1") and manifest.num_samples == 90
    labels = []
    for rank in range(2):
        loader = build_loader(http_root + "/", batch_size=5, rank=rank, world_size=2, num_workers=2,
                              decoder=decoder, drop_last=False)
        labels += [int(v) for _, batch in loader for v in batch]
    # 90 samples over 4 readers: 23 + 23 | 22 + 22, each rank takes the smaller share, 44
    assert len(labels) == 88 and len(set(labels)) == 88 and set(labels) <= set(range(90))


def test_pack_orl_faces(shared_data, tmp_path):
    result = pack(shared_data / "orl_faces", tmp_path / "orl", workers=2, progress=False)
    manifest = read_manifest(tmp_path / "orl")
    assert manifest.num_classes == 40 and manifest.num_samples == 400
    assert manifest.class_counts.tolist() == [10] * 40 and result.num_skipped == 0
    assert manifest.image_size == (112, 92)
    loader = build_loader(tmp_path / "orl", batch_size=50, rank=0, world_size=1, num_workers=0, decoder="dali",
                          image_size=112)
    images, labels = next(iter(loader))
    assert images.shape == (50, 3, 112, 112) and int(labels.max()) < 40


def test_synthetic_identities_are_learnable_but_not_trivial(tmp_path):
    """Raw pixels verify held-out identities only a little above chance; a linear discriminant fitted on the
    training identities (PCA + LDA, scikit-learn) transfers to the held-out identities far above chance."""
    from sklearn.decomposition import PCA
    from sklearn.discriminant_analysis import LinearDiscriminantAnalysis

    manifest = write_synthetic(tmp_path, num_identities=80, min_images=6, max_images=30, holdout_identities=30,
                               num_pairs=300, image_size=32, seed=3)
    assert manifest.num_classes == 80 and min(manifest.class_counts) >= 6 and max(manifest.class_counts) <= 30
    pairs = load_pairset(tmp_path / "holdout_pairs.npz")
    assert pairs.num_pairs == 300 and pairs.issame.sum() == 150

    def pixels(data: bytes) -> np.ndarray:
        return np.asarray(Image.open(io.BytesIO(data)).convert("RGB").resize((20, 20)), np.float32).ravel()

    train_x, train_y = [], []
    for shard in manifest.shards:
        with tarfile.open(shard) as tar:
            members = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
        for name, data in members.items():
            if name.endswith(".jpg"):
                train_x.append(pixels(data))
                train_y.append(int(members[name[:-4] + ".cls"]))
    held = np.stack([pixels(d) for d in pairs.images])

    def accuracy(embeddings: np.ndarray) -> float:
        e = embeddings - embeddings.mean(0)
        e /= np.linalg.norm(e, axis=1, keepdims=True)
        sim = (e[0::2] * e[1::2]).sum(1)
        return max(float(((sim > t) == pairs.issame).mean()) for t in np.unique(sim))

    pca = PCA(60, random_state=0).fit(np.stack(train_x))
    lda = LinearDiscriminantAnalysis().fit(pca.transform(np.stack(train_x)), train_y)
    raw = accuracy(held.copy())
    learned = accuracy(lda.transform(pca.transform(held)))
    assert 0.5 < raw < 0.75, f"raw pixels should be weak but not useless, got {raw:.3f}"
    assert learned > 0.78 and learned > raw + 0.1, f"learned {learned:.3f} vs raw {raw:.3f}"


def test_stats_and_synth_commands(tmp_path, capsys):
    assert main(["synth", str(tmp_path / "s"), "--identities", "30", "--image-size", "24", "--holdout", "0"]) == 0
    manifest = read_manifest(tmp_path / "s")
    assert main(["data", "stats", str(tmp_path / "s"), "--png", str(tmp_path / "h.png")]) == 0
    text = capsys.readouterr().out
    assert f"identities {manifest.num_classes}, images {manifest.num_samples}" in text
    assert (tmp_path / "h.png").stat().st_size > 1000
    from distrib_face.data.stats import images_per_identity_histogram

    hist = images_per_identity_histogram(manifest.class_counts)
    assert sum(hist.identities) == 30 and sum(hist.images) == manifest.num_samples


def test_bench_command_prints_every_row(tmp_path, capsys):
    code = main(["bench", "data", "--identities", "20", "--image-size", "32", "--batch-size", "16",
                 "--batches", "2", "--warmup", "1", "--workers", "1"])
    assert code == 0
    out = capsys.readouterr().out
    for row in ("DALI cpu, 1 thread", "DALI cpu, 2 threads", "PIL, 1 workers"):
        assert row in out


def test_dali_flips_are_the_same_after_a_mid_epoch_resume(shards):
    """Mirror flags are a function of (seed, epoch, sample position): a resumed loader flips what the
    uninterrupted one flipped, so training with flips resumes exactly. (Labels are unique per sample here.)"""
    kwargs = dict(batch_size=10, rank=0, world_size=1, num_workers=2, decoder="dali", seed=4, augment={"flip": True})

    def by_label(batches):
        return {int(label): image.clone() for images, labels in batches for image, label in zip(images, labels)}

    whole = by_label(build_loader(shards, **kwargs))
    partial = build_loader(shards, **kwargs)
    iterator = iter(partial)
    first = by_label(next(iterator) for _ in range(4))
    state = partial.state_dict()
    iterator.close()
    resumed = build_loader(shards, **kwargs)
    resumed.load_state_dict(state)
    rest = by_label(resumed)
    assert sorted([*first, *rest]) == sorted(whole) == list(range(90))
    for label, image in {**first, **rest}.items():
        assert torch.equal(image, whole[label]), label
    # and the flags really mirror about half of the images (against a decode without flips)
    plain = by_label(build_loader(shards, **{**kwargs, "augment": False}))
    mirrored = sum(not torch.equal(whole[label], plain[label]) for label in whole)
    assert 25 <= mirrored <= 65, mirrored


def test_flip_bit_is_a_fair_pure_function():
    from distrib_face.data.loader import flip_bit

    bits = [flip_bit(3, 1, (0, w, p)) for w in range(2) for p in range(2000)]
    assert bits == [flip_bit(3, 1, (0, w, p)) for w in range(2) for p in range(2000)]
    assert abs(sum(bits) / len(bits) - 0.5) < 0.03
    assert bits != [flip_bit(3, 2, (0, w, p)) for w in range(2) for p in range(2000)]  # epochs differ
