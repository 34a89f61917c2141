import io

import numpy as np
import pytest
from PIL import Image

from distrib_face.data.pairset import PairSet, load_pairset, save_pairset


def _jpeg(value: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((8, 8, 3), value, np.uint8)).save(buf, format="JPEG")
    return buf.getvalue()


def test_round_trip(tmp_path):
    images = [_jpeg(v) for v in (0, 50, 100, 150, 200, 250)]
    pairs = PairSet("t", images, [True, False, True], folds=[0, 1, 0])
    path = save_pairset(tmp_path / "p.npz", pairs)
    back = load_pairset(path)
    assert back.name == "t" and back.images == images
    assert back.issame.tolist() == [True, False, True] and back.folds.tolist() == [0, 1, 0]


def test_mismatched_counts_name_the_set():
    with pytest.raises(ValueError, match="'bad'.*3 images for 2 pairs"):
        PairSet("bad", [b"a", b"b", b"c"], [True, False])


def test_not_a_pairset_file(tmp_path):
    np.savez(tmp_path / "x.npz", foo=np.zeros(3))
    with pytest.raises(ValueError, match="x.npz.*missing arrays"):
        load_pairset(tmp_path / "x.npz")
