"""``distrib-face bench search``: faiss index build / search time and recall against exact search.

The data are synthetic unit vectors with planted mates. Identity centres are drawn from a Gaussian whose
variance falls off as ``(i + 1) ** -decay`` over the dimensions (``decay=0``: isotropic, the hardest case
for approximate search; real face embeddings have structure, ``decay > 0`` imitates some) and normalised.
Each enrolled identity has one gallery vector ``normalize(c + noise)``; each mated probe is another draw
around the same centre, each non-mated probe a draw around a centre that is not enrolled, each distractor a
centre of its own. The noise is scaled so that a mate scores about ``mate_cos`` on average.

For each index the table gives the build time (train + add), the search time of all probes, and recall
against the exact (flat) index on the same entries: recall@1 is the fraction of probes whose best entry is
the exact best entry, recall@10 the mean overlap of the top 10 entries with the exact top 10. Rank-1 and
TPIR@FPIR=1e-2 are the identification numbers each index gives.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from distrib_face.eval.search import build_index, identification_from_candidates

logger = logging.getLogger(__name__)


@dataclass
class SyntheticSearchSet:
    """Gallery, distractors and probes of one synthetic benchmark.

    Attributes:
        gallery: float32 [G, D], one vector per enrolled identity (identity ``i`` is row ``i``).
        distractors: float32 [M, D].
        probes: float32 [P, D]: the mated probes first, then the non-mated ones.
        probe_identity: int64 [P]: the mated probe's gallery row, ``-1`` for non-mated probes.
    """

    gallery: np.ndarray
    distractors: np.ndarray
    probes: np.ndarray
    probe_identity: np.ndarray


def _normalize(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def synthetic_search_set(num_distractors: int, dim: int = 512, num_gallery: int = 1000, num_mated: int = 1000,
                         num_non_mated: int = 1000, decay: float = 1.0, mate_cos: float = 0.6, seed: int = 0,
                         chunk: int = 100_000) -> SyntheticSearchSet:
    """Draw a benchmark set (see the module docstring); distractors are made ``chunk`` rows at a time."""
    if not 0.0 < mate_cos < 1.0:
        raise ValueError(f"mate_cos must be in (0, 1), got {mate_cos}")
    rng = np.random.default_rng(seed)
    scale = (np.arange(1, dim + 1, dtype=np.float64) ** (-decay / 2)).astype(np.float32)  # std per dimension

    def centres(n: int) -> np.ndarray:
        return _normalize(rng.standard_normal((n, dim), dtype=np.float32) * scale)

    # ||c|| = 1 and noise of norm ~sigma: cos(c + n1, c + n2) ~ 1 / (1 + sigma^2)
    sigma = float(np.sqrt(1.0 / mate_cos - 1.0))

    def around(c: np.ndarray) -> np.ndarray:
        return _normalize(c + rng.standard_normal(c.shape, dtype=np.float32) * (sigma / np.sqrt(dim)))

    enrolled = centres(num_gallery)
    gallery = around(enrolled)
    mate_of = rng.integers(0, num_gallery, num_mated)
    probes = np.concatenate([around(enrolled[mate_of]), around(centres(num_non_mated))])
    distractors = np.empty((num_distractors, dim), np.float32)
    for start in range(0, num_distractors, chunk):
        stop = min(start + chunk, num_distractors)
        distractors[start:stop] = centres(stop - start)
    return SyntheticSearchSet(gallery, distractors, probes,
                              np.r_[mate_of, np.full(num_non_mated, -1)].astype(np.int64))


def recall_at(approx_ids: np.ndarray, exact_ids: np.ndarray, k: int) -> float:
    """Mean over queries of ``|approx top-k  &  exact top-k| / k`` (``k = 1``: the best entry found)."""
    k = min(k, exact_ids.shape[1], approx_ids.shape[1])
    hits = [np.intersect1d(a[:k], e[:k]).size for a, e in zip(approx_ids, exact_ids)]
    return float(np.mean(hits)) / k


def _search_settings(index: Any, kind: str, nprobes: Sequence[int], ef_searches: Sequence[int]) -> list[dict[str, int]]:
    """The search-time settings to time for ``kind`` (IVF nprobe values capped at nlist, HNSW efSearch values)."""
    if kind == "ivf":
        return [{"nprobe": min(n, index.params["nlist"])} for n in nprobes]
    if kind == "hnsw":
        return [{"ef_search": e} for e in ef_searches]
    return [{}]


def _apply(index: Any, setting: dict[str, int]) -> None:
    if "nprobe" in setting:
        if index.on_gpu:
            import faiss

            faiss.GpuParameterSpace().set_index_parameter(index.index, "nprobe", setting["nprobe"])
        else:
            index.index.nprobe = setting["nprobe"]
    if "ef_search" in setting:
        index.params["ef_search"] = setting["ef_search"]  # SearchIndex.search applies it
    index.params.update(setting)


def run_search_bench(
    data: SyntheticSearchSet,
    kinds: Sequence[str] = ("flat", "ivf", "hnsw"),
    top_k: int = 10,
    nprobes: Sequence[int] = (16, 64, 256),
    ef_searches: Sequence[int] = (64, 128, 256),
    **index_options: Any,
) -> list[dict[str, Any]]:
    """Build each index kind on ``data`` once and search it at each setting; one row per (kind, setting).

    The exact flat index always runs first (it is the reference of the recall). ``nprobes`` / ``ef_searches``
    are the IVF / HNSW search settings; ``index_options`` go to :func:`~distrib_face.eval.search.build_index`
    (``nlist``, ``hnsw_m``, ``ef_construction``, ``gpu``, ...).
    """
    entries = np.concatenate([data.gallery, data.distractors]) if len(data.distractors) else data.gallery
    num_gallery = len(data.gallery)
    mated = data.probe_identity >= 0
    rows = []
    exact_ids: np.ndarray | None = None
    for kind in ("flat", *[k for k in kinds if k != "flat"]):
        index = build_index(entries, kind, **index_options)
        logger.info("built %s over %d entries in %.1f s", kind, index.num_vectors, index.build_seconds)
        for setting in _search_settings(index, kind, nprobes, ef_searches):
            _apply(index, setting)
            start = time.perf_counter()
            scores, ids = index.search(data.probes, top_k)
            search_s = time.perf_counter() - start
            if exact_ids is None:
                exact_ids = ids
            # one entry per identity here: the entry id is the identity
            result = identification_from_candidates(ids, scores, ids, data.probe_identity, mated,
                                                    np.ones(len(mated), bool), fpir_targets=(1e-2,))
            if kind not in kinds:
                continue
            rows.append({
                "index": kind, "params": dict(index.params), "on_gpu": index.on_gpu,
                "entries": int(index.num_vectors), "gallery": num_gallery, "probes": int(len(data.probes)),
                "build_s": index.build_seconds, "search_s": search_s,
                "ms_per_query": 1000 * search_s / max(1, len(data.probes)),
                "recall@1": recall_at(ids, exact_ids, 1), f"recall@{top_k}": recall_at(ids, exact_ids, top_k),
                "rank1": result.rank1, "tpir@fpir=1e-2": result.tpir_at_fpir.get(1e-2),
            })
            logger.info("%s %s: %.2f s, recall@1 %.4f", kind, setting, search_s, rows[-1]["recall@1"])
        del index
    return rows


def format_rows(rows: list[dict[str, Any]], top_k: int = 10) -> str:
    """The benchmark rows as a markdown table."""
    header = ["index", "params", "entries", "build s", "search s", "ms/query", "recall@1", f"recall@{top_k}",
              "rank-1", "TPIR@FPIR=1e-2"]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for r in rows:
        params = ", ".join(f"{k}={v}" for k, v in r["params"].items()) or "-"
        tpir = r["tpir@fpir=1e-2"]
        cells = [r["index"] + (" (GPU)" if r["on_gpu"] else ""), params, f"{r['entries']:,}", f"{r['build_s']:.1f}",
                 f"{r['search_s']:.2f}", f"{r['ms_per_query']:.2f}", f"{r['recall@1']:.4f}",
                 f"{r[f'recall@{top_k}']:.4f}", f"{r['rank1']:.4f}", "-" if tpir is None else f"{tpir:.4f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
