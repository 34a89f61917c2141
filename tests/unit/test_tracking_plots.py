"""Plot helpers: the histogram's numbers against a bincount reference, what the figures draw against their
inputs, tick labels that do not overlap, and real PNG files."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from distrib_face.tracking import (
    class_size_histogram,
    plot_class_histogram,
    plot_training_curves,
)


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
    assert _png_size(out) == (1000, 400)  # histogram and rank-size side by side


def _visible_labels(figure, axis):
    figure.canvas.draw()
    renderer = figure.canvas.get_renderer()
    lo, hi = axis.get_view_interval()
    labels = []
    for tick in [*axis.get_major_ticks(), *axis.get_minor_ticks()]:
        label = tick.label1
        if label.get_visible() and label.get_text() and lo <= tick.get_loc() <= hi:
            labels.append((label.get_text(), label.get_window_extent(renderer)))
    return labels


def _assert_readable(figure, axis, min_labels=2):
    labels = _visible_labels(figure, axis)
    assert len(labels) >= min_labels, [t for t, _ in labels]
    for text, _ in labels:
        assert "times" not in text and "cdot" not in text, text  # no "3x10^1" scientific minor labels
    for i, (text_a, box_a) in enumerate(labels):
        for text_b, box_b in labels[i + 1:]:
            assert not box_a.overlaps(box_b), f"tick labels {text_a!r} and {text_b!r} overlap"


@pytest.mark.parametrize("counts", [
    np.arange(30, 46),                                          # `data stats` on a short range (0.2 decades)
    np.clip(np.random.default_rng(2).zipf(1.5, 200), 4, 60),     # the demo's range (1.2 decades)
    np.clip(np.random.default_rng(3).zipf(1.8, 50000), 1, 5000),  # a long tail over 3.7 decades
])
def test_class_size_figure_draws_the_log_bins_with_readable_ticks(counts):
    from distrib_face.data.stats import class_sizes_figure

    figure = class_sizes_figure(counts, title="t")
    histogram, rank_size = figure.axes
    assert histogram.get_xscale() == histogram.get_yscale() == "log"
    edges, hist = class_size_histogram(counts)
    bars = [(p.get_x(), p.get_height()) for p in histogram.patches]
    assert bars == [(float(lo), float(n)) for lo, n in zip(edges[:-1], hist) if n > 0]
    # the rank-size line drawn through its vertices is the images of every rank, largest first
    x, y = rank_size.lines[0].get_xdata(), rank_size.lines[0].get_ydata()
    np.testing.assert_array_equal(np.interp(np.arange(1, counts.size + 1), x, y), np.sort(counts)[::-1])
    assert len(x) <= 2 * len(np.unique(counts))
    for ax in figure.axes:
        _assert_readable(figure, ax.xaxis)
        _assert_readable(figure, ax.yaxis)


def test_training_curves_draw_loss_lr_and_accuracy_over_steps(tmp_path):
    from distrib_face.tracking.plots import training_curves_figure

    loss = [(step, 20.0 * 0.97**step + 0.5) for step in range(20, 301, 20)]
    lr = {"backbone": [(s, 0.1 * (1 - s / 300)) for s in range(1, 301)],
          "classifier": [(s, 0.2 * (1 - s / 300)) for s in range(1, 301)]}
    evals = [(0, {"lfw": 0.62, "cfp": 0.55}), (100, {"lfw": 0.9, "cfp": 0.8}), (300, {"lfw": 0.975, "cfp": None})]
    figure = training_curves_figure(loss, lr, evals, title="run")
    loss_ax, lr_ax, acc_ax = figure.axes
    np.testing.assert_allclose(loss_ax.lines[0].get_xydata(), np.asarray(loss))
    assert [line.get_label() for line in lr_ax.lines] == ["backbone", "classifier"]
    np.testing.assert_allclose(lr_ax.lines[1].get_xydata(), np.asarray(lr["classifier"]))
    by_label = {line.get_label().split(" ")[0]: line.get_xydata() for line in acc_ax.lines}
    assert sorted(by_label) == ["cfp", "lfw"]  # a None accuracy (set not evaluated) is left out
    np.testing.assert_allclose(by_label["cfp"], [[0, 55.0], [100, 80.0]])
    np.testing.assert_allclose(by_label["lfw"], [[0, 62.0], [100, 90.0], [300, 97.5]])
    assert loss_ax.get_yscale() == "log"  # 20x range
    _assert_readable(figure, loss_ax.yaxis)

    out = plot_training_curves(loss, tmp_path / "training.png", lr_history=lr["backbone"], eval_history=None)
    assert _png_size(out) == (750, int(100 * (2 * 2.3 + 0.7)))  # two panels: no verification ran
    with pytest.raises(ValueError, match="empty"):
        plot_training_curves([], tmp_path / "none.png")
