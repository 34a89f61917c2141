"""pairs.txt and insightface .bin readers, the restricted unpickler, and `distrib-face pack-pairs`."""

import io
import os
import pickle
import pickletools

import numpy as np
import pytest
from PIL import Image

from distrib_face.cli import main
from distrib_face.data.pairset import PairSet, load_pairset
from distrib_face.eval import load_any_pairs, read_bin, read_lfw_pairs, restricted_loads, write_bin


def _jpeg(value: int, size: int = 8) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((size, size, 3), value, np.uint8)).save(buf, format="JPEG")
    return buf.getvalue()


# ------------------------------------------------------------------------------------------------ pairs.txt

PEOPLE = {"Alice_A": 3, "Bob_B": 2, "Carol_C": 2, "Dan_D": 1}
PAIRS_TXT = """2\t2
Alice_A\t1\t2
Bob_B\t1\t2
Alice_A\t3\tCarol_C\t1
Dan_D\t1\tBob_B\t2
Carol_C\t1\t2
Alice_A\t2\t3
Bob_B\t1\tDan_D\t1
Carol_C\t2\tAlice_A\t1
"""


def _lfw_folder(root):
    files = {}
    for k, (person, count) in enumerate(PEOPLE.items()):
        (root / person).mkdir(parents=True)
        for n in range(1, count + 1):
            data = _jpeg(20 * k + n)
            (root / person / f"{person}_{n:04d}.jpg").write_bytes(data)
            files[(person, n)] = data
    return files


def test_pairs_txt_both_line_formats_and_folds(tmp_path):
    files = _lfw_folder(tmp_path / "lfw")
    (tmp_path / "pairs.txt").write_text(PAIRS_TXT)
    pairs = read_lfw_pairs(tmp_path / "pairs.txt", tmp_path / "lfw")
    expected = [
        (("Alice_A", 1), ("Alice_A", 2)),
        (("Bob_B", 1), ("Bob_B", 2)),
        (("Alice_A", 3), ("Carol_C", 1)),
        (("Dan_D", 1), ("Bob_B", 2)),
        (("Carol_C", 1), ("Carol_C", 2)),
        (("Alice_A", 2), ("Alice_A", 3)),
        (("Bob_B", 1), ("Dan_D", 1)),
        (("Carol_C", 2), ("Alice_A", 1)),
    ]
    assert pairs.name == "lfw" and pairs.num_pairs == 8
    assert pairs.images == [files[key] for pair in expected for key in pair]
    assert pairs.issame.tolist() == [True, True, False, False, True, True, False, False]
    # header "2 2": two folds, each 2 same pairs then 2 different ones
    assert pairs.folds.tolist() == [0, 0, 0, 0, 1, 1, 1, 1]


def test_pairs_txt_one_number_header_and_other_extensions(tmp_path):
    (tmp_path / "P_Q").mkdir()
    for n in (1, 2):
        buf = io.BytesIO()
        Image.fromarray(np.full((4, 4), 9 * n, np.uint8)).save(buf, format="PNG")
        (tmp_path / "P_Q" / f"P_Q_{n:04d}.png").write_bytes(buf.getvalue())
    (tmp_path / "pairs.txt").write_text("1\nP_Q 1 2\n")
    pairs = load_any_pairs(tmp_path)  # a folder holding pairs.txt
    assert pairs.folds is None and pairs.issame.tolist() == [True]
    assert pairs.images[1] == (tmp_path / "P_Q" / "P_Q_0002.png").read_bytes()


def test_pairs_txt_errors_name_file_and_line(tmp_path):
    _lfw_folder(tmp_path)
    bad = tmp_path / "bad.txt"
    bad.write_text("1 1\nAlice_A 1 2\nAlice_A 1 x Bob_B\n")
    with pytest.raises(ValueError, match=r"bad.txt:3: expected 'name n1 n2'"):
        read_lfw_pairs(bad, tmp_path)
    bad.write_text("1 1\nAlice_A 1 2\nAlice_A 7 Bob_B 1\n")
    with pytest.raises(FileNotFoundError, match=r"bad.txt:3: image .*Alice_A_0007.jpg not found"):
        read_lfw_pairs(bad, tmp_path)
    bad.write_text("2 1\nAlice_A 1 2\nAlice_A 1 Bob_B 1\n")
    with pytest.raises(ValueError, match="header says 2 folds x 1 pairs .4 pair lines., found 2"):
        read_lfw_pairs(bad, tmp_path)


# --------------------------------------------------------------------------------------------------- .bin


def test_bin_round_trip_as_insightface_writes_it(tmp_path):
    images = [_jpeg(v) for v in (10, 60, 110, 160, 210, 250)]
    issame = [True, False, True]
    # insightface: pickle.dump((bins, issame_list), f, protocol=pickle.HIGHEST_PROTOCOL)
    (tmp_path / "agedb_30.bin").write_bytes(pickle.dumps((images, issame), protocol=pickle.HIGHEST_PROTOCOL))
    pairs = read_bin(tmp_path / "agedb_30.bin")
    assert pairs.name == "agedb_30" and pairs.images == images and pairs.issame.tolist() == issame
    # and our own writer reads back the same
    back = read_bin(write_bin(tmp_path / "x.bin", PairSet("x", images, issame)))
    assert back.images == images and back.issame.tolist() == issame


def test_bin_written_by_python2_reads_as_bytes(tmp_path):
    # Python 2 pickles str as SHORT_BINSTRING; insightface reads them with encoding="bytes".
    def short_binstring(data: bytes) -> bytes:
        return b"U" + bytes([len(data)]) + data

    payload = (
        b"\x80\x02"  # PROTO 2
        + b"]q\x00(" + short_binstring(b"\xff\xd8img-a") + short_binstring(b"\xff\xd8img-b") + b"e"  # list, APPENDS
        + b"]q\x01(\x88e"  # [True]
        + b"\x86q\x02."  # TUPLE2, STOP
    )
    pickletools.dis(payload, out=io.StringIO())  # a well-formed pickle
    (tmp_path / "lfw.bin").write_bytes(payload)
    pairs = read_bin(tmp_path / "lfw.bin")
    assert pairs.images == [b"\xff\xd8img-a", b"\xff\xd8img-b"] and pairs.issame.tolist() == [True]


class _Exploit:
    """Pickles to a call of os.system when unpickled by a plain unpickler."""

    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


def test_malicious_pickle_is_refused_without_running(tmp_path):
    marker = tmp_path / "pwned"
    payload = pickle.dumps(([b"\xff\xd8", _Exploit(f"touch {marker}")], [True]), protocol=4)
    (tmp_path / "evil.bin").write_bytes(payload)
    with pytest.raises(ValueError, match=r"evil.bin: refused .*refusing to load global (posix|os|nt)\.system"):
        read_bin(tmp_path / "evil.bin")
    assert not marker.exists()
    # the payload is armed: a plain unpickler does run it
    pickle.loads(payload)
    assert marker.exists()


@pytest.mark.parametrize(
    "payload",
    [
        pickle.dumps(([b"a", b"b"], [np.bool_(True)])),  # numpy scalars need numpy's globals
        b"\x80\x02cbuiltins\neval\nq\x00X\x04\x00\x00\x001+1q\x01\x85q\x02Rq\x03.",  # GLOBAL + REDUCE
        b"\x80\x02\x82\x01.",  # EXT1: the copyreg extension registry resolves through find_class
        b"\x80\x02X\x01\x00\x00\x00xQ.",  # BINPERSID
    ],
)
def test_restricted_unpickler_refuses_globals_and_persistent_ids(payload):
    with pytest.raises((pickle.UnpicklingError, ValueError)):
        restricted_loads(payload)


def test_bin_wrong_structure_is_refused(tmp_path):
    cases = {
        "dict": {"images": []},
        "floats": ([b"a", b"b"], [0.5]),
        "text": (["a", "b"], [True]),
        "counts": ([b"a", b"b", b"c"], [True]),
    }
    for name, obj in cases.items():
        path = tmp_path / f"{name}.bin"
        path.write_bytes(pickle.dumps(obj))
        with pytest.raises(ValueError, match=f"{name}.bin"):
            read_bin(path)


# ------------------------------------------------------------------------------------------- pack-pairs CLI


def test_pack_pairs_cli_from_bin_and_from_pairs_txt(tmp_path, capsys):
    images = [_jpeg(v) for v in (10, 60, 110, 160)]
    (tmp_path / "cfp_fp.bin").write_bytes(pickle.dumps((images, [False, True])))
    assert main(["pack-pairs", "--bin", str(tmp_path / "cfp_fp.bin"), "--output", str(tmp_path / "a.npz")]) == 0
    packed = load_pairset(tmp_path / "a.npz")
    assert packed.name == "cfp_fp" and packed.images == images and packed.issame.tolist() == [False, True]

    _lfw_folder(tmp_path / "lfw")
    (tmp_path / "pairs.txt").write_text(PAIRS_TXT)
    argv = ["pack-pairs", "--pairs", str(tmp_path / "pairs.txt"), "--images", str(tmp_path / "lfw")]
    assert main([*argv, "--output", str(tmp_path / "b.npz"), "--name", "mini_lfw"]) == 0
    packed, direct = load_pairset(tmp_path / "b.npz"), read_lfw_pairs(tmp_path / "pairs.txt", tmp_path / "lfw")
    assert packed.name == "mini_lfw" and packed.images == direct.images
    assert packed.folds.tolist() == direct.folds.tolist()
    assert "8 pairs (4 same)" in capsys.readouterr().out

    (tmp_path / "evil.bin").write_bytes(pickle.dumps(([_Exploit("true")], [])))
    assert main(["pack-pairs", "--bin", str(tmp_path / "evil.bin"), "--output", str(tmp_path / "c.npz")]) == 2
    assert "refusing to load global" in capsys.readouterr().err and not (tmp_path / "c.npz").exists()
