"""ROC / CMC figures: files are written, and thinning a huge ROC keeps its upper envelope."""

import numpy as np
from PIL import Image

from distrib_face.eval import identification_metrics, plot_cmc, plot_roc, verification_metrics_from_scores
from distrib_face.eval.plots import _thin


def test_plot_roc_and_cmc_write_pngs(tmp_path):
    rng = np.random.default_rng(0)
    issame = rng.random(3000) < 0.3
    results = {
        name: verification_metrics_from_scores(rng.normal(issame * shift, 1.0), issame, name=name)
        for name, shift in (("a", 1.0), ("b", 2.0))
    }
    plot_roc(results, tmp_path / "sub" / "roc.png")
    cmc = identification_metrics(np.eye(4), [0, 1, 2, 3], np.eye(4) + 0.1, [0, 1, 2, 3])
    plot_cmc({"toy": cmc}, tmp_path / "cmc.png")
    for name in ("sub/roc.png", "cmc.png"):
        with Image.open(tmp_path / name) as png:
            assert png.format == "PNG"


def test_thin_keeps_best_tar_at_each_kept_far():
    rng = np.random.default_rng(1)
    issame = rng.random(200_000) < 0.05
    roc = verification_metrics_from_scores(rng.normal(issame * 2.0, 1.0), issame, nfolds=2).roc
    fpr, tpr = _thin(roc.fpr, roc.tpr, max_points=500)
    assert fpr.size <= 500 and np.all(np.diff(fpr) >= 0)
    for f, t in zip(fpr[::25], tpr[::25]):
        assert t == roc.tpr[roc.fpr <= f].max()
