"""The training progress bar and log lines name throughput ``img/s`` (docs/tracking.md: ``img_s`` is gone)."""

from __future__ import annotations

import logging

from distrib_face.train.progress import Progress


def test_the_bar_shows_img_per_s_and_the_note():
    progress = Progress(10, 0, enabled=True, use_bar=True)
    try:
        progress.step(2, {"loss": 1.25, "lr": 0.1, "images_per_sec": 123.4}, note="skipped 1")
        fields = dict(part.split("=", 1) for part in progress.bar.postfix.split(", "))
    finally:
        progress.close()
    assert fields == {"loss": "1.2500", "lr": "1.00e-01", "img/s": "123", "data": "skipped 1"}


def test_the_log_line_shows_img_per_s(caplog):
    progress = Progress(10, 0, enabled=True, use_bar=False)
    with caplog.at_level(logging.INFO, logger="distrib_face.train.progress"):
        progress.step(2, {"loss": 1.25, "lr": 0.1, "images_per_sec": 123.4})
    (record,) = caplog.records
    assert "step 2/10 | loss 1.2500 | lr 1.000e-01 | 123.4 img/s" in record.getMessage()
    assert "img_s" not in record.getMessage()
