"""The toy and the margin-curve picture: commands write PNGs; ArcFace opens a wider angular gap than NormFace."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from distrib_face.cli import main
from distrib_face.train.toy import ToyResult, angular_gap_degrees, spread_directions, train_toy


@pytest.fixture
def one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def test_gap_grows_from_normface_to_arcface(one_thread):
    norm = train_toy("normface", steps=300, seed=0)
    arc = train_toy("arcface", steps=300, seed=0)
    assert norm.accuracy > 0.85 and arc.accuracy > 0.85
    assert angular_gap_degrees(arc) > angular_gap_degrees(norm) + 3.0


def test_angular_gap_measure_on_known_clusters():
    """Two tight clusters 20 degrees apart (others far away): the gap is 20 minus both spreads."""
    rng = np.random.default_rng(0)
    angles, labels = [], []
    for c in range(8):
        centre = 20.0 * c if c < 2 else 60.0 + 40.0 * c
        angles.append(centre + rng.uniform(-2.0, 2.0, 200))
        labels.append(np.full(200, c))
    theta = np.radians(np.concatenate(angles))
    result = ToyResult("x", np.stack([np.cos(theta), np.sin(theta)], 1), np.concatenate(labels),
                       spread_directions(8, 2).numpy(), 1.0, 0.0, 0.0)
    assert angular_gap_degrees(result) == pytest.approx(20.0 - 2 * 1.8, abs=0.3)


def test_toy_and_plot_commands_write_pngs(tmp_path):
    assert main(["toy", "--loss", "cosface", "--loss", "softmax", "--steps", "20", "--output", str(tmp_path)]) == 0
    out_3d = str(tmp_path / "3d")
    assert main(["toy", "--loss", "subcenter_arcface", "--steps", "20", "--dim", "3", "--output", out_3d]) == 0
    assert main(["plot", "margins", "--output", str(tmp_path / "margins.png")]) == 0
    for png in ("toy_cosface.png", "toy_softmax.png", "3d/toy_subcenter_arcface.png", "margins.png"):
        with Image.open(tmp_path / png) as image:
            assert image.format == "PNG" and image.size[0] > 400
