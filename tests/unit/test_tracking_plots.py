"""Plot helpers: the histogram's numbers against a bincount reference, and real PNG files."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from distrib_face.tracking import class_size_histogram, plot_class_histogram, plot_loss_curve


def test_class_size_histogram_matches_bincount():
    rng = np.random.default_rng(0)
    counts = np.minimum(rng.zipf(1.8, size=5000), 3000)  # long-tailed images per identity
    counts[:3] = 0  # identities with no images are left out
    edges, hist = class_size_histogram(counts)
    assert edges[0] == 1 and edges[-1] == counts.max() + 1 and np.all(np.diff(edges) > 0)
    per_value = np.bincount(counts)  # reference: identities with exactly k images
    reference = [per_value[lo:hi].sum() for lo, hi in zip(edges[:-1], edges[1:])]
    assert hist.tolist() == reference
    assert hist.sum() == np.count_nonzero(counts)


def test_small_range_gets_one_bin_per_count():
    edges, hist = class_size_histogram({"a": 1, "b": 2, "c": 2, "d": 4})
    assert edges.tolist() == [1, 2, 3, 4, 5] and hist.tolist() == [1, 2, 0, 1]
    with pytest.raises(ValueError, match="negative"):
        class_size_histogram([3, -1])


def _png_size(path):
    with Image.open(path) as image:
        assert image.format == "PNG"
        return image.size


def test_plot_class_histogram_writes_png(tmp_path):
    out = plot_class_histogram(np.random.default_rng(1).zipf(2.0, size=300), tmp_path / "plots" / "classes.png")
    assert out == tmp_path / "plots" / "classes.png"
    assert _png_size(out) == (600, 400)


def test_plot_loss_curve_writes_png(tmp_path):
    history = {
        "loss": [(step, 10.0 * 0.9**step) for step in range(0, 200, 10)],
        "lr": [(step, 0.1 * (1 - step / 200) + 1e-6) for step in range(0, 200, 10)],
        "img_per_s": [],
    }
    out = plot_loss_curve(history, tmp_path / "loss.png")
    width, height = _png_size(out)
    assert width == 700 and height == 2 * 240 + 60  # one panel per non-empty series
    with pytest.raises(ValueError, match="no points"):
        plot_loss_curve({"loss": []}, tmp_path / "empty.png")
