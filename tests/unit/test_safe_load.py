"""distrib_face.safe_load: plain torch files load, anything that would import or call is refused naming the file."""

from __future__ import annotations

import os
import pickle

import pytest
import torch

from distrib_face.safe_load import UnsafeFileError, safe_torch_load


class _Touch:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_plain_values_load(tmp_path):
    payload = {"w": torch.arange(6.0).view(2, 3), "n": 3, "x": 0.5, "s": "a", "none": None, "t": (1, [2.0]),
               "dtype": torch.bfloat16, "ints": {0: torch.zeros(2, dtype=torch.int64)}}
    torch.save(payload, tmp_path / "ok.pt")
    for mmap in (False, True):
        loaded = safe_torch_load(tmp_path / "ok.pt", mmap=mmap)
        assert loaded.keys() == payload.keys() and torch.equal(loaded["w"], payload["w"])
        assert loaded["dtype"] is torch.bfloat16 and loaded["t"] == (1, [2.0])


@pytest.mark.parametrize("fmt", ["torch", "raw"])
@pytest.mark.parametrize("mmap", [False, True])
def test_code_is_refused_before_it_runs(tmp_path, fmt, mmap):
    marker, path = tmp_path / "MARKER", tmp_path / "evil.pt"
    if fmt == "torch":
        torch.save({"w": torch.zeros(1), "x": _Touch(marker)}, path)
    else:
        path.write_bytes(pickle.dumps(_Touch(marker)))
    with pytest.raises(UnsafeFileError) as err:
        safe_torch_load(path, mmap=mmap)
    assert not marker.exists()
    text = str(err.value)
    assert text.startswith(f"{path}: refused to load: ") and "could run code" in text
    assert ("the global posix.system" in text) if fmt == "torch" else ("pickle opcode 149" in text)
    assert "weights_only" not in text  # never the advice to load it unrestricted
    assert err.value.path == path


def test_damaged_files_are_not_called_unsafe(tmp_path):
    (tmp_path / "text.pt").write_text("hello")
    with pytest.raises(Exception) as err:
        safe_torch_load(tmp_path / "text.pt")
    assert not isinstance(err.value, UnsafeFileError)
    with pytest.raises(FileNotFoundError):
        safe_torch_load(tmp_path / "absent.pt")
