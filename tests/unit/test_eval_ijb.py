"""IJB-style template verification on a small constructed protocol with a hand-computed answer."""

import math

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.metrics import roc_auc_score
from sklearn.metrics import roc_curve as sk_roc_curve

from distrib_face.eval import embed_images, evaluate_templates, read_ijb_protocol, template_features
from distrib_face.eval.ijb import ARCFACE_LANDMARKS_112, align_face, embed_ijb, similarity_transform

# image name, template, media, feature: see the expected template features below
IMAGES = [
    ("1.jpg", 1, 10, (1.0, 0.0, 0.0)),
    ("2.jpg", 1, 10, (3.0, 0.0, 0.0)),  # media 10 mean (2, 0, 0)
    ("3.jpg", 1, 11, (0.0, 2.0, 0.0)),  # template 1 = mean of media (2,0,0), (0,2,0) -> (1,1,0)/sqrt2
    ("4.jpg", 2, 12, (0.0, 0.0, 5.0)),  # template 2 -> (0,0,1)
    ("5.jpg", 3, 10, (4.0, 0.0, 0.0)),  # media id 10 again, but in another template -> (1,0,0)
    ("6.jpg", 4, 13, (0.0, 1.0, 0.0)),
    ("7.jpg", 4, 13, (0.0, 3.0, 0.0)),  # media 13 mean (0, 2, 0)
    ("8.jpg", 4, 14, (0.0, 0.0, 2.0)),  # template 4 -> (0,1,1)/sqrt2 (a plain image mean would give (0,4,2)/3)
]
PAIRS = [(1, 3, 1), (2, 4, 1), (2, 3, 1), (1, 4, 0), (1, 2, 0), (3, 4, 0)]
S = 1 / math.sqrt(2)
EXPECTED_SCORES = [S, S, 0.0, 0.5, 0.0, 0.0]  # cosines of the template features above


def _write_protocol(root, landmarks=None):
    (root / "meta").mkdir(parents=True)
    (root / "meta" / "ijbc_face_tid_mid.txt").write_text("".join(f"{n} {t} {m}\n" for n, t, m, _ in IMAGES))
    (root / "meta" / "ijbc_template_pair_label.txt").write_text("".join(f"{a} {b} {y}\n" for a, b, y in PAIRS))
    if landmarks is not None:
        lines = [
            f"{n} " + " ".join(f"{v:.4f}" for v in lmk.reshape(-1)) + " 0.99\n"
            for (n, *_), lmk in zip(IMAGES, landmarks)
        ]
        (root / "meta" / "ijbc_name_5pts_score.txt").write_text("".join(lines))
    return np.array([f for *_, f in IMAGES])


def test_template_features_are_media_averaged(tmp_path):
    feats = _write_protocol(tmp_path)
    protocol = read_ijb_protocol(tmp_path, "IJBC")
    assert protocol.landmarks is None and protocol.labels.tolist() == [True, True, True, False, False, False]
    ids, tfeats = template_features(feats, protocol.templates, protocol.medias)
    assert ids.tolist() == [1, 2, 3, 4]
    np.testing.assert_allclose(tfeats, [[S, S, 0], [0, 0, 1], [1, 0, 0], [0, S, S]], atol=1e-12)
    # per-image weights act before the media means: weight 3 on image 3 -> template 1 = (2, 6, 0) / 2
    weights = np.ones(8)
    weights[2] = 3.0
    _, weighted = template_features(feats, protocol.templates, protocol.medias, image_weights=weights)
    np.testing.assert_allclose(weighted[0], np.array([1.0, 3.0, 0.0]) / math.sqrt(10))


def test_template_pair_tar_at_far_known_answer(tmp_path):
    feats = _write_protocol(tmp_path)
    protocol = read_ijb_protocol(tmp_path)
    result = evaluate_templates(feats, protocol, far_targets=(0.5, 0.34, 0.1))
    np.testing.assert_allclose(result.roc.thresholds[1:], sorted(set(EXPECTED_SCORES), reverse=True), atol=1e-12)
    # genuine {S, S, 0}, impostor {0.5, 0, 0}: FAR <= 1/3 allows one impostor -> accept scores > 0 -> TAR 2/3
    assert result.tar_at_far[0.5] == pytest.approx(2 / 3) and result.tar_at_far[0.34] == pytest.approx(2 / 3)
    assert result.tar_at_far[0.1] is None  # 3 impostor pairs cannot measure 1e-1
    labels = [y for *_, y in PAIRS]
    assert result.auc == pytest.approx(7 / 9) == pytest.approx(roc_auc_score(labels, EXPECTED_SCORES))
    fpr, tpr, _ = sk_roc_curve(labels, EXPECTED_SCORES, drop_intermediate=False)
    assert result.tar_at_far[0.34] == pytest.approx(tpr[fpr <= 0.34].max())
    assert result.num_pairs == 6 and result.name == "ijbc"


def test_protocol_errors_name_the_file(tmp_path):
    _write_protocol(tmp_path)
    with (tmp_path / "meta" / "ijbc_template_pair_label.txt").open("a") as f:
        f.write("1 99 0\n")
    with pytest.raises(ValueError, match=r"ijbc_template_pair_label.txt: templates \[99\] have no image"):
        read_ijb_protocol(tmp_path)
    (tmp_path / "meta" / "ijbc_template_pair_label.txt").write_text("1 2\n")
    with pytest.raises(ValueError, match=r"ijbc_template_pair_label.txt:1: expected 3 fields"):
        read_ijb_protocol(tmp_path)
    with pytest.raises(FileNotFoundError, match="ijbb_face_tid_mid.txt"):
        read_ijb_protocol(tmp_path, "ijbb")


def test_similarity_transform_recovers_a_known_one():
    angle, scale, shift = math.radians(20), 1.7, np.array([5.0, -3.0])
    rotation = np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
    dst = ARCFACE_LANDMARKS_112 @ (scale * rotation).T + shift
    estimated = similarity_transform(ARCFACE_LANDMARKS_112, dst)
    np.testing.assert_allclose(estimated, np.hstack([scale * rotation, shift[:, None]]), atol=1e-10)


def _loose_crop(landmarks: np.ndarray, seed: int) -> Image.Image:
    canvas = np.random.default_rng(seed).integers(0, 60, (220, 200, 3), dtype=np.uint8)
    for x, y in np.round(landmarks).astype(int):
        canvas[y - 3:y + 4, x - 3:x + 4] = 255
    return Image.fromarray(canvas)


def test_align_face_puts_landmarks_on_the_reference():
    landmarks = ARCFACE_LANDMARKS_112 * 1.5 + np.array([20.0, 30.0])
    aligned = align_face(_loose_crop(landmarks, 0), landmarks)
    assert aligned.shape == (112, 112, 3)
    for x, y in np.round(ARCFACE_LANDMARKS_112).astype(int):
        assert aligned[y, x].min() > 200  # the white dot landed on the reference point


def test_embed_ijb_aligns_from_landmarks(tmp_path):
    landmarks = np.stack([ARCFACE_LANDMARKS_112 * (1.2 + 0.05 * i) + 10 + i for i in range(len(IMAGES))])
    _write_protocol(tmp_path, landmarks)
    (tmp_path / "loose_crop").mkdir()
    crops = []
    for i, (name, *_) in enumerate(IMAGES):
        crops.append(_loose_crop(landmarks[i], i))
        crops[-1].save(tmp_path / "loose_crop" / name, format="PNG")  # lossless, whatever the name says
    protocol = read_ijb_protocol(tmp_path)
    assert protocol.face_scores.tolist() == [0.99] * 8
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 2, 8, stride=8), torch.nn.Flatten(), torch.nn.Linear(2 * 14 * 14, 6))
    aligned = np.stack([align_face(c, lmk) for c, lmk in zip(crops, protocol.landmarks)])
    np.testing.assert_allclose(
        embed_ijb(net, protocol, batch_size=3, chunk_images=5), embed_images(net, aligned), rtol=1e-5, atol=1e-5
    )
