"""1:N search through faiss: against a brute-force numpy reference, identification_metrics, and a hand case."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from distrib_face.cli import main
from distrib_face.eval.embedset import EmbeddingSet, save_embeddings
from distrib_face.eval.metrics import identification_metrics, l2_normalize
from distrib_face.eval.search import (
    build_index,
    default_nlist,
    distinct_identities,
    identify,
    make_gallery,
    open_set_threshold,
    search_embeddings,
)
from distrib_face.eval.search_bench import recall_at, run_search_bench, synthetic_search_set

FPIRS = (0.5, 0.2, 1e-1, 1e-2)


def _unit(x: np.ndarray) -> np.ndarray:
    return l2_normalize(x).astype(np.float32)


def _problem(seed: int = 0, dim: int = 16, num_ids: int = 30, num_distractors: int = 200):
    """Identities with 1-3 gallery images, distractors, mated and non-mated probes (keys: strings)."""
    rng = np.random.default_rng(seed)
    centres = _unit(rng.normal(size=(num_ids + 15, dim)))
    gallery, gallery_keys = [], []
    for i in range(num_ids):
        for _ in range(int(rng.integers(1, 4))):
            gallery.append(centres[i] + 0.5 * rng.normal(size=dim) / np.sqrt(dim))
            gallery_keys.append(f"id{i}")
    probes, probe_keys = [], []
    for _ in range(60):  # mated
        i = int(rng.integers(num_ids))
        probes.append(centres[i] + 0.9 * rng.normal(size=dim) / np.sqrt(dim))
        probe_keys.append(f"id{i}")
    for _ in range(40):  # non-mated: identities num_ids .. num_ids + 14
        i = int(rng.integers(num_ids, num_ids + 15))
        probes.append(centres[i] + 0.9 * rng.normal(size=dim) / np.sqrt(dim))
        probe_keys.append(f"id{i}")
    return (_unit(np.array(gallery)), gallery_keys, _unit(rng.normal(size=(num_distractors, dim))),
            _unit(np.array(probes)), probe_keys)


def _brute_force(gallery, gallery_keys, distractors, probes, probe_keys, top_k, fpirs):
    """Every probe against every entry in float64, identities by their best image, TPIR by a threshold sweep."""
    entries = np.concatenate([gallery, distractors]).astype(np.float64)
    keys = list(gallery_keys) + [("distractor", j) for j in range(len(distractors))]
    sims = probes.astype(np.float64) @ entries.T
    enrolled = set(gallery_keys)
    tops, ranks, mate_scores, non_mated_best = [], [], [], []
    for p, key in enumerate(probe_keys):
        best: dict = {}
        for e, k in enumerate(keys):
            best[k] = max(best.get(k, -np.inf), sims[p, e])
        ordered = sorted(best.items(), key=lambda kv: -kv[1])
        tops.append(ordered[:top_k])
        if key in enrolled:
            ranks.append(1 + sum(1 for k, v in best.items() if k != key and v >= best[key]))
            mate_scores.append(best[key])
        else:
            ranks.append(None)
            non_mated_best.append(sims[p].max())
    mated_ranks = np.array([r for r in ranks if r is not None])
    mated_scores = np.array(mate_scores)
    cmc = [float(np.mean(mated_ranks <= r)) for r in range(1, top_k + 1)]
    tpir = {}
    nm = np.array(non_mated_best)
    for f in fpirs:
        if f * nm.size < 1:
            tpir[f] = None
            continue
        best_tpir = 0.0
        for t in np.r_[np.unique(np.r_[nm, mated_scores]), np.inf]:
            if np.mean(nm >= t) <= f:
                best_tpir = max(best_tpir, float(np.mean((mated_ranks == 1) & (mated_scores >= t))))
        tpir[f] = best_tpir
    return tops, ranks, cmc, tpir


def test_flat_search_equals_brute_force_and_identification_metrics():
    gallery, gkeys, distractors, probes, pkeys = _problem()
    store = make_gallery(gallery, gkeys, distractors)
    result, index, _ = identify(store, probes, pkeys, top_k=5, fpir_targets=FPIRS, kind="flat")
    assert index.kind == "flat"
    tops, ranks, cmc, tpir = _brute_force(gallery, gkeys, distractors, probes, pkeys, 5, FPIRS)
    for p, top in enumerate(tops):
        got = [store.identity_keys[i] if i < store.num_enrolled else ("distractor", i - store.num_enrolled)
               for i in result.top_identities[p]]
        assert got == [k for k, _ in top]
        np.testing.assert_allclose(result.top_scores[p], [v for _, v in top], atol=1e-5)
        assert result.mate_ranks[p] == (ranks[p] if ranks[p] is not None and ranks[p] <= 5 else 0)
    np.testing.assert_allclose(result.cmc, cmc)
    assert result.num_mated == 60 and result.num_non_mated == 40 and result.num_unknown == 0
    assert tpir[1e-2] is None and result.tpir_at_fpir[1e-2] is None and result.notes  # 40 non-mated: no 1e-2
    for f in (0.5, 0.2, 1e-1):
        assert result.tpir_at_fpir[f] == pytest.approx(tpir[f])
    assert 0 < tpir[1e-1] < tpir[0.5] < 1  # the sweep is not trivially 0 or 1 here

    # the closed-set numbers of the existing numpy implementation (distractors as identities of their own)
    labels = {k: i for i, k in enumerate(dict.fromkeys(gkeys))}
    reference = identification_metrics(
        np.concatenate([gallery, distractors]),
        np.r_[[labels[k] for k in gkeys], 10_000 + np.arange(len(distractors))],
        probes, np.array([labels.get(k, 5_000 + int(k[2:])) for k in pkeys]),
    )
    assert reference.num_probes == result.num_mated and reference.num_skipped == result.num_non_mated
    np.testing.assert_allclose(result.cmc, reference.cmc[:5])
    assert result.rank1 == reference.rank1


def test_ivf_with_every_cell_probed_is_exact_and_hnsw_is_close():
    gallery, gkeys, distractors, probes, pkeys = _problem(seed=1, num_distractors=2000)
    store = make_gallery(gallery, gkeys, distractors)
    exact, _, _ = identify(store, probes, pkeys, top_k=5, kind="flat")
    nlist = 16
    ivf, index, _ = identify(store, probes, pkeys, top_k=5, kind="ivf", nlist=nlist, nprobe=nlist)
    assert index.params["nlist"] == nlist and index.params["nprobe"] == nlist
    np.testing.assert_array_equal(ivf.top_identities, exact.top_identities)
    np.testing.assert_allclose(ivf.top_scores, exact.top_scores, atol=1e-5)
    hnsw, index, _ = identify(store, probes, pkeys, top_k=5, kind="hnsw", ef_search=256)
    assert index.kind == "hnsw"
    assert np.mean(hnsw.top_identities[:, 0] == exact.top_identities[:, 0]) >= 0.95
    with pytest.raises(ValueError, match="index kind must be one of"):
        build_index(gallery, "lsh")
    with pytest.raises(ValueError, match="gpu='on'"):
        build_index(gallery, "flat", gpu="on")  # the CPU build has no GPU
    assert build_index(gallery, "auto").kind == "flat"
    assert default_nlist(1_000_000) == 4000 and default_nlist(100) == 2


def test_auto_picks_ivf_above_the_exact_limit_and_still_agrees_with_exact_search(monkeypatch):
    import distrib_face.eval.search as search

    gallery, gkeys, distractors, probes, pkeys = _problem(seed=2, num_distractors=3000)
    store = make_gallery(gallery, gkeys, distractors)
    entries = len(store.embeddings)
    monkeypatch.setattr(search, "AUTO_EXACT_LIMIT", entries + 1)  # one entry below the limit: exact
    assert build_index(store.embeddings, "auto").kind == "flat"
    monkeypatch.setattr(search, "AUTO_EXACT_LIMIT", entries)  # at the limit (a 1M-entry gallery, scaled down)
    approx, index, _ = identify(store, probes, pkeys, top_k=5, kind="auto")
    assert index.kind == "ivf" and index.params["nlist"] == default_nlist(entries)
    assert index.params["nprobe"] < index.params["nlist"]  # approximate: not every cell is searched
    exact, _, _ = identify(store, probes, pkeys, top_k=5, kind="flat")
    assert recall_at(approx.top_identities, exact.top_identities, 1) >= 0.95
    assert recall_at(approx.top_identities, exact.top_identities, 5) >= 0.9
    _, _, cmc, _ = _brute_force(gallery, gkeys, distractors, probes, pkeys, 5, FPIRS)  # float64, every entry
    np.testing.assert_allclose(approx.cmc, cmc, atol=0.05)
    # Options reach the IVF index auto built: 16 of the cells (78 here) searched still find nearly every best match.
    coarse, index, _ = identify(store, probes, pkeys, top_k=5, kind="auto", nprobe=16)
    assert index.kind == "ivf" and index.params["nprobe"] == 16 < index.params["nlist"]
    assert recall_at(coarse.top_identities, exact.top_identities, 1) >= 0.95
    assert recall_at(coarse.top_identities, exact.top_identities, 5) >= 0.9


def test_open_set_hand_case():
    """2-D unit vectors at known angles: every score is a cosine of an angle difference."""
    def at(*degrees):
        return np.array([[math.cos(math.radians(d)), math.sin(math.radians(d))] for d in degrees], np.float32)

    gallery = at(0, 90, 180, 270)  # identities A, B, C, D
    # mated probes of A: 5 and 20 deg (rank 1), 29 deg (rank 1, cos 0.875), 50 deg (B at 40 deg is nearer: rank 2)
    # non-mated probes of E: nearest gallery vector 44, 42, ..., 26 deg away
    probes = np.concatenate([at(5, 20, 29, 50), at(*[d for d in range(44, 25, -2)])])
    keys = ["A", "A", "A", "A"] + ["E"] * 10
    result, _, _ = identify(make_gallery(gallery, ["A", "B", "C", "D"]), probes, keys, top_k=2,
                            fpir_targets=(0.1, 0.2, 0.01, 1.0))
    assert result.mate_ranks[:4].tolist() == [1, 1, 1, 2]
    assert result.rank1 == 0.75 and result.cmc.tolist() == [0.75, 1.0]
    # FPIR 0.1 of 10 non-mated searches: at most 1 accepted, so the threshold is the 2nd best one, cos 28 deg;
    # mates above it at rank 1: 5 and 20 deg (29 deg: cos 0.875 < cos 28 = 0.883)
    assert result.fpir_thresholds[0.1] == pytest.approx(math.cos(math.radians(28)), abs=1e-6)
    assert result.tpir_at_fpir[0.1] == 0.5
    # FPIR 0.2: threshold cos 30 deg = 0.866, now 29 deg passes too
    assert result.tpir_at_fpir[0.2] == 0.75
    assert result.tpir_at_fpir[0.01] is None  # needs 100 non-mated searches
    assert result.tpir_at_fpir[1.0] == 0.75  # everything accepted: only the rank condition is left
    d = result.to_dict()
    assert d["open_set"]["tpir_at_fpir"] == {"1e-01": 0.5, "2e-01": 0.75, "1e-02": None, "1e+00": 0.75}
    assert d["open_set"]["fnir_at_fpir"]["1e-01"] == 0.5


def test_distinct_identities_and_thresholds_by_hand():
    # entries 0..5 of identities [7, 7, 8, 9, 8, 9]; rows best first, -1 pads
    ids = np.array([[1, 0, 4, 2, 3], [5, 3, 2, -1, -1]])
    scores = np.array([[0.9, 0.8, 0.7, 0.6, 0.5], [0.9, 0.8, 0.3, -1.0, -1.0]], np.float32)
    ident, best, entry = distinct_identities(ids, scores, np.array([7, 7, 8, 9, 8, 9]), top_k=3)
    assert ident.tolist() == [[7, 8, 9], [9, 8, -1]]
    np.testing.assert_allclose(best[0], [0.9, 0.7, 0.5])
    assert entry.tolist() == [[1, 4, 3], [5, 2, -1]] and np.isnan(best[1, 2])
    top1 = np.array([0.1, 0.5, 0.3, 0.9])
    assert open_set_threshold(top1, 0.25) == 0.5  # 1 of 4 may pass: cut at the 2nd highest
    assert open_set_threshold(top1, 0.2) is None
    assert open_set_threshold(top1, 1.0) == -math.inf


def _emb(vectors, keys, names=None, labels=None):
    n = len(vectors)
    return EmbeddingSet(embeddings=vectors, labels=labels if labels is not None else [-1] * n,
                        names=names or [f"img{i}" for i in range(n)], identities=[k or "" for k in keys])


def test_search_cli_report_cmc_png_and_label_matching(tmp_path, capsys):
    gallery, gkeys, distractors, probes, pkeys = _problem(seed=2)
    pkeys[0] = ""  # one probe of unknown identity
    save_embeddings(tmp_path / "g.npz", _emb(gallery, gkeys))
    save_embeddings(tmp_path / "p.npz", _emb(probes, pkeys))
    save_embeddings(tmp_path / "d.npz", _emb(distractors, [""] * len(distractors), names=[f"d{i}" for i in range(200)]))
    code = main(["search", "--gallery", str(tmp_path / "g.npz"), "--probes", str(tmp_path / "p.npz"),
                 "--distractors", str(tmp_path / "d.npz"), "--top-k", "3", "--output", str(tmp_path / "r.json"),
                 "--cmc", str(tmp_path / "cmc.png"), "--fpir", "0.1"])
    assert code == 0
    report = json.loads((tmp_path / "r.json").read_text())
    keep = [i for i, k in enumerate(pkeys) if k]
    _, ranks, cmc, tpir = _brute_force(gallery, gkeys, distractors, probes[keep], [pkeys[i] for i in keep], 3, (0.1,))
    assert report["match_on"] == "identities" and report["num_unknown"] == 1
    assert report["num_mated"] == 59 and report["num_non_mated"] == 40 and report["num_distractors"] == 200
    assert report["cmc"] == pytest.approx(cmc) and report["rank1"] == pytest.approx(cmc[0])
    assert report["rank3"] == pytest.approx(cmc[2])
    assert report["open_set"]["tpir_at_fpir"]["1e-01"] == pytest.approx(tpir[0.1])
    assert report["index"]["kind"] == "flat" and report["index"]["entries"] == len(gallery) + 200
    first = report["probes"][1]
    assert first["identity"] == pkeys[1] and first["mated"] and len(first["candidates"]) == 3
    assert first["mate_rank"] == (ranks[0] if ranks[0] <= 3 else None)
    assert report["probes"][0]["identity"] is None and not report["probes"][0]["mated"]
    assert (tmp_path / "cmc.png").stat().st_size > 1000
    assert "rank-1" in capsys.readouterr().out

    # labels instead of names (no identity names in the gallery); an unlabelled gallery image is refused
    labels = {k: i for i, k in enumerate(dict.fromkeys(gkeys))}
    save_embeddings(tmp_path / "g2.npz", _emb(gallery, [""] * len(gallery), labels=[labels[k] for k in gkeys]))
    save_embeddings(tmp_path / "p2.npz", _emb(probes, [""] * len(probes),
                                              labels=[labels.get(k, 999) if k else -1 for k in pkeys]))
    from distrib_face.eval.embedset import load_embeddings

    _, by_label = search_embeddings(load_embeddings(tmp_path / "g2.npz"), load_embeddings(tmp_path / "p2.npz"),
                                    top_k=3, per_probe=False)
    _, by_name = search_embeddings(load_embeddings(tmp_path / "g.npz"), load_embeddings(tmp_path / "p.npz"),
                                   top_k=3, per_probe=False)
    assert by_label["match_on"] == "labels" and by_label["cmc"] == by_name["cmc"]
    assert by_label["open_set"] == by_name["open_set"]
    save_embeddings(tmp_path / "g3.npz", _emb(gallery, [""] * len(gallery)))
    assert main(["search", "--gallery", str(tmp_path / "g3.npz"), "--probes", str(tmp_path / "p.npz")]) == 2
    assert "gallery images have no identity" in capsys.readouterr().err
    assert main(["search", "--gallery", str(tmp_path / "nope.npz"), "--probes", str(tmp_path / "p.npz")]) == 2


def test_bench_rows_at_a_small_size():
    data = synthetic_search_set(3000, dim=32, num_gallery=50, num_mated=60, num_non_mated=40, seed=1)
    assert data.distractors.shape == (3000, 32)
    np.testing.assert_allclose(np.linalg.norm(data.gallery, axis=1), 1.0, atol=1e-5)
    mates = np.einsum("pd,pd->p", data.probes[:60], data.gallery[data.probe_identity[:60]])
    assert 0.45 < mates.mean() < 0.75  # mate_cos 0.6
    rows = run_search_bench(data, ("flat", "ivf", "hnsw"), nprobes=(1, 10_000), ef_searches=(64,), nlist=20)
    assert [r["index"] for r in rows] == ["flat", "ivf", "ivf", "hnsw"]
    assert rows[0]["recall@1"] == 1.0 and rows[0]["recall@10"] == 1.0
    assert rows[2]["params"]["nprobe"] == 20 and rows[2]["recall@10"] == 1.0  # every cell probed: exact
    assert rows[1]["recall@10"] < 1.0
    assert recall_at(np.array([[1, 2, 3]]), np.array([[1, 3, 4]]), 3) == pytest.approx(2 / 3)
    assert recall_at(np.array([[2, 1]]), np.array([[1, 2]]), 1) == 0.0
