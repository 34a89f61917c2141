"""1:N identification through faiss: a gallery (plus distractors) searched by probes.

Every gallery embedding is one index entry; an identity's score for a probe is the score of its best
gallery image (as :func:`~distrib_face.eval.metrics.identification_metrics`), and each distractor is an
identity of its own that no probe is mated with. Embeddings are unit norm, so inner product = cosine.

Index kinds (``kind``):

- ``flat``: exact inner product (``IndexFlatIP``);
- ``ivf``: ``IndexIVFFlat`` with ``nlist`` k-means cells (default ``4 sqrt(N)``), ``nprobe`` of them searched;
- ``hnsw``: ``IndexHNSWFlat`` (``M`` links per node, ``efConstruction``), ``efSearch`` candidates searched;
- ``auto``: ``flat`` below :data:`AUTO_EXACT_LIMIT` entries, else ``ivf``.

The GPU build of faiss is used when it is installed and sees a GPU (``gpu="auto"``; flat and IVF only:
faiss has no GPU HNSW).

Metrics (definitions in docs/eval.md):

- closed set, over *mated* probes (identity in the gallery): the CMC curve to rank ``top_k``, rank-1, rank-k;
- open set, when some probes are *non-mated* (their identity has no gallery image): TPIR at FPIR ``f``, after
  NIST FRVT 1:N / IJB-C. FPIR(T) is the fraction of non-mated searches whose best candidate scores ``>= T``;
  TPIR(T, R) the fraction of mated searches whose mate is at rank ``<= R`` with score ``>= T``. For FPIR ``f``
  the threshold accepts at most ``floor(f * N_nonmated)`` non-mated searches (as ``tar_at_far`` does for
  impostor pairs); with fewer than ``1 / f`` non-mated probes the value is ``None``.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

logger = logging.getLogger(__name__)

AUTO_EXACT_LIMIT = 1_000_000
INDEX_KINDS = ("auto", "flat", "ivf", "hnsw")
DEFAULT_FPIR_TARGETS: tuple[float, ...] = (1e-1, 1e-2)
DEFAULT_NPROBE = 64
DEFAULT_HNSW_M = 32
DEFAULT_EF_CONSTRUCTION = 80
DEFAULT_EF_SEARCH = 128


def _faiss() -> Any:
    # faiss's loader logs each SIMD build it tries at INFO; the dynamic-dispatch wheel needs none of them
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)
    try:
        import faiss
    except ImportError as err:  # pragma: no cover - faiss-cpu is a runtime dependency
        raise RuntimeError("search needs faiss: pip install faiss-cpu (or a faiss GPU build)") from err
    return faiss


def faiss_gpus() -> int:
    """GPUs the installed faiss can use (0 for the CPU build)."""
    faiss = _faiss()
    if not hasattr(faiss, "StandardGpuResources"):
        return 0
    return int(faiss.get_num_gpus())


def default_nlist(num_vectors: int) -> int:
    """IVF cells: ``4 sqrt(N)`` (faiss's rule of thumb), at least 1 and at most ``N / 39`` (enough to train)."""
    return max(1, min(int(round(4 * math.sqrt(num_vectors))), num_vectors // 39))


@dataclass
class SearchIndex:
    """A built faiss index over the gallery (+ distractors).

    Attributes:
        index: the faiss index.
        kind: ``flat``, ``ivf`` or ``hnsw``.
        num_vectors: entries.
        on_gpu: whether the index lives on GPUs.
        params: what was built and how it searches (``nlist``, ``nprobe``, ``M``, ``ef_search``, ...).
        build_seconds: wall time to build (train + add).
    """

    index: Any
    kind: str
    num_vectors: int
    on_gpu: bool
    params: dict[str, Any] = field(default_factory=dict)
    build_seconds: float = 0.0

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-``k`` entries per query: ``(scores float32 [Q, k], ids int64 [Q, k])``, best first, ``-1`` ids pad."""
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        k = min(k, self.num_vectors)
        if self.kind == "hnsw":
            # efSearch below k cannot return k candidates
            self.index.hnsw.efSearch = max(int(self.params["ef_search"]), k)
        return self.index.search(queries, k)


def build_index(
    vectors: np.ndarray,
    kind: str = "auto",
    *,
    nlist: int | None = None,
    nprobe: int = DEFAULT_NPROBE,
    hnsw_m: int = DEFAULT_HNSW_M,
    ef_construction: int = DEFAULT_EF_CONSTRUCTION,
    ef_search: int = DEFAULT_EF_SEARCH,
    gpu: str = "auto",
    train_size: int | None = None,
    seed: int = 0,
) -> SearchIndex:
    """Build an inner-product index over unit-norm ``vectors`` (float32 [N, D]).

    Args:
        vectors: the gallery (+ distractor) embeddings.
        kind: one of :data:`INDEX_KINDS`.
        nlist: IVF cells (default :func:`default_nlist`).
        nprobe: IVF cells searched per query.
        hnsw_m: HNSW links per node.
        ef_construction: HNSW build-time candidate list.
        ef_search: HNSW search-time candidate list (raised to ``k`` when smaller).
        gpu: ``auto`` (use faiss GPUs when there are any), ``on`` (require them) or ``off``.
        train_size: vectors sampled to train the IVF quantiser (default ``min(N, 64 nlist)``).
        seed: sampling and k-means seed.

    Raises:
        ValueError: an unknown kind, a bad parameter, or ``gpu="on"`` without a faiss GPU.
    """
    faiss = _faiss()
    if kind not in INDEX_KINDS:
        raise ValueError(f"index kind must be one of {INDEX_KINDS}, got {kind!r}")
    if gpu not in ("auto", "on", "off"):
        raise ValueError(f"gpu must be auto, on or off, got {gpu!r}")
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    if vectors.ndim != 2 or vectors.shape[0] == 0:
        raise ValueError(f"index vectors must be a non-empty [N, D] array, got shape {vectors.shape}")
    num, dim = vectors.shape
    if kind == "auto":
        kind = "flat" if num < AUTO_EXACT_LIMIT else "ivf"
    num_gpus = faiss_gpus() if gpu != "off" else 0
    if gpu == "on" and num_gpus == 0:
        raise ValueError("gpu='on' but the installed faiss has no GPU support or sees no GPU")
    use_gpu = num_gpus > 0 and kind in ("flat", "ivf")
    start = time.perf_counter()
    params: dict[str, Any] = {}
    if kind == "flat":
        index = faiss.IndexFlatIP(dim)
    elif kind == "ivf":
        nlist = nlist or default_nlist(num)
        if not 1 <= nlist <= num:
            raise ValueError(f"nlist must be in [1, {num}] for {num} vectors, got {nlist}")
        if nprobe < 1:
            raise ValueError(f"nprobe must be >= 1, got {nprobe}")
        quantizer = faiss.IndexFlatIP(dim)
        index = faiss.IndexIVFFlat(quantizer, dim, nlist, faiss.METRIC_INNER_PRODUCT)
        index.cp.seed = seed
        train_size = min(num, train_size or 64 * nlist)
        sample = vectors if train_size >= num else vectors[np.random.default_rng(seed).choice(num, train_size,
                                                                                             replace=False)]
        params.update(nlist=nlist, nprobe=min(nprobe, nlist), train_size=int(len(sample)))
        index.train(sample)
        index.nprobe = params["nprobe"]
    else:  # hnsw
        if hnsw_m < 2 or ef_construction < 1 or ef_search < 1:
            raise ValueError(f"need hnsw_m >= 2, ef_construction >= 1, ef_search >= 1: got {hnsw_m}, "
                             f"{ef_construction}, {ef_search}")
        index = faiss.IndexHNSWFlat(dim, hnsw_m, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = ef_construction
        index.hnsw.efSearch = ef_search
        params.update(M=hnsw_m, ef_construction=ef_construction, ef_search=ef_search)
    index.add(vectors)
    if use_gpu:
        # built (and the IVF quantiser trained) on the CPU, searched on the GPUs: one code path to test here
        index = faiss.index_cpu_to_all_gpus(index)
        if kind == "ivf":
            faiss.GpuParameterSpace().set_index_parameter(index, "nprobe", params["nprobe"])
    return SearchIndex(index=index, kind=kind, num_vectors=num, on_gpu=use_gpu, params=params,
                       build_seconds=time.perf_counter() - start)


# ------------------------------------------------------------------------------------------ metrics


@dataclass
class SearchResult:
    """1:N identification of probes against a gallery.

    Attributes:
        top_k: identities returned per probe.
        cmc: ``cmc[r]`` = fraction of mated probes whose mate is among the best ``r + 1`` identities
            (length ``top_k``; ``nan`` without mated probes).
        rank1: ``cmc[0]``.
        rank_k: ``cmc[-1]``.
        tpir_at_fpir: ``{fpir: tpir or None}`` at rank ``open_set_rank``; empty without non-mated probes.
        fpir_thresholds: ``{fpir: the score a candidate must exceed}`` (``None`` when not measurable).
        open_set_rank: the rank R of TPIR(T, R).
        num_mated / num_non_mated / num_unknown: probes of each kind (unknown: no identity, not scored).
        mate_ranks: int64 [P]: each probe's mate rank (1-based), ``0`` when the mate is beyond ``top_k`` or
            the probe is not mated.
        mate_scores: float32 [P]: the mate's score when ranked, else ``nan``.
        top_identities: int64 [P, top_k]: index of each returned identity (``-1`` pads).
        top_scores: float32 [P, top_k].
        top_entries: int64 [P, top_k]: the gallery entry giving each identity its score.
        notes: caveats (an FPIR that cannot be measured, ...).
    """

    top_k: int
    cmc: np.ndarray
    rank1: float
    rank_k: float
    tpir_at_fpir: dict[float, float | None]
    fpir_thresholds: dict[float, float | None]
    open_set_rank: int
    num_mated: int
    num_non_mated: int
    num_unknown: int
    mate_ranks: np.ndarray
    mate_scores: np.ndarray
    top_identities: np.ndarray
    top_scores: np.ndarray
    top_entries: np.ndarray
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able summary (the per-probe arrays are left out)."""
        return {
            "top_k": self.top_k,
            "rank1": _finite_or_none(self.rank1),
            f"rank{self.top_k}": _finite_or_none(self.rank_k),
            "cmc": [_finite_or_none(v) for v in self.cmc.tolist()],
            "num_mated": self.num_mated,
            "num_non_mated": self.num_non_mated,
            "num_unknown": self.num_unknown,
            "open_set": None if not self.num_non_mated else {
                "rank": self.open_set_rank,
                "tpir_at_fpir": {f"{f:.0e}": v for f, v in self.tpir_at_fpir.items()},
                "fnir_at_fpir": {f"{f:.0e}": None if v is None else 1.0 - v for f, v in self.tpir_at_fpir.items()},
                "thresholds": {f"{f:.0e}": v for f, v in self.fpir_thresholds.items()},
            },
            "notes": list(self.notes),
        }


def _finite_or_none(value: float) -> float | None:
    return float(value) if np.isfinite(value) else None


def distinct_identities(entry_ids: np.ndarray, entry_scores: np.ndarray, entry_identity: np.ndarray,
                        top_k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The first ``top_k`` distinct identities of each row of a best-first entry list.

    Args:
        entry_ids: int64 [Q, k] gallery entries, best first (``-1``: none).
        entry_scores: [Q, k] their scores.
        entry_identity: int64 [N] identity index of each gallery entry.
        top_k: identities wanted per row.

    Returns:
        ``(identities [Q, top_k], scores [Q, top_k], entries [Q, top_k])``, ``-1`` / ``nan`` where a row has
        fewer; an identity's score is its first (best) entry's.
    """
    q, k = entry_ids.shape
    valid = entry_ids >= 0
    ident = np.where(valid, entry_identity[np.where(valid, entry_ids, 0)], -1)  # [Q, k]
    # the first occurrence of each identity in a row: sort by identity (stable keeps score order within one)
    order = np.argsort(ident, axis=1, kind="stable")
    sorted_ident = np.take_along_axis(ident, order, axis=1)
    first_sorted = np.ones_like(sorted_ident, dtype=bool)
    first_sorted[:, 1:] = sorted_ident[:, 1:] != sorted_ident[:, :-1]
    first = np.empty_like(first_sorted)
    np.put_along_axis(first, order, first_sorted, axis=1)
    first &= valid
    slot = np.cumsum(first, axis=1) - 1  # distinct rank - 1 at first occurrences
    keep = first & (slot < top_k)
    rows = np.broadcast_to(np.arange(q)[:, None], (q, k))[keep]
    out_ident = np.full((q, top_k), -1, np.int64)
    out_score = np.full((q, top_k), np.nan, np.float32)
    out_entry = np.full((q, top_k), -1, np.int64)
    out_ident[rows, slot[keep]] = ident[keep]
    out_score[rows, slot[keep]] = entry_scores[keep]
    out_entry[rows, slot[keep]] = entry_ids[keep]
    return out_ident, out_score, out_entry


def open_set_threshold(non_mated_top1: np.ndarray, fpir: float) -> float | None:
    """The score a candidate must exceed for FPIR <= ``fpir`` (``-inf``: accept all; ``None``: not measurable).

    At most ``floor(fpir * N)`` of the ``N`` non-mated best scores are accepted: the threshold is the
    ``(floor(fpir * N) + 1)``-th highest one, accepted strictly above (ties are rejected together).
    """
    if not 0.0 < fpir <= 1.0:
        raise ValueError(f"FPIR target must be in (0, 1]: got {fpir}")
    scores = np.sort(np.asarray(non_mated_top1, dtype=np.float64))[::-1]
    allowed = math.floor(fpir * scores.size + 1e-9)
    if allowed < 1:
        return None
    if allowed >= scores.size:
        return -math.inf
    return float(scores[allowed])


def identification_from_candidates(
    top_identities: np.ndarray,
    top_scores: np.ndarray,
    top_entries: np.ndarray,
    probe_identity: np.ndarray,
    probe_mated: np.ndarray,
    probe_known: np.ndarray,
    fpir_targets: Sequence[float] = DEFAULT_FPIR_TARGETS,
    open_set_rank: int = 1,
) -> SearchResult:
    """Closed- and open-set metrics from each probe's ranked candidate identities.

    Args:
        top_identities: int64 [P, K] candidate identity indices, best first (``-1`` pads).
        top_scores: [P, K] their scores.
        top_entries: int64 [P, K] the gallery entry behind each candidate.
        probe_identity: int64 [P] each probe's identity index (its mate's, when mated).
        probe_mated: bool [P] the probe's identity has gallery entries.
        probe_known: bool [P] the probe's identity is known at all (unknown probes are not scored).
        fpir_targets: FPIRs of the open-set TPIR.
        open_set_rank: R of TPIR(T, R).
    """
    top_k = top_identities.shape[1]
    if not 1 <= open_set_rank <= top_k:
        raise ValueError(f"open_set_rank must be in [1, top_k={top_k}], got {open_set_rank}")
    mated = probe_mated & probe_known
    non_mated = ~probe_mated & probe_known
    hit = (top_identities == probe_identity[:, None]) & mated[:, None]  # [P, K]
    has_mate = hit.any(axis=1)
    mate_ranks = np.where(has_mate, hit.argmax(axis=1) + 1, 0).astype(np.int64)
    mate_scores = np.where(has_mate, top_scores[np.arange(len(hit)), hit.argmax(axis=1)], np.nan).astype(np.float32)
    num_mated, num_non_mated = int(mated.sum()), int(non_mated.sum())
    ranks = mate_ranks[mated]
    if num_mated:
        cmc = np.array([np.mean((ranks >= 1) & (ranks <= r)) for r in range(1, top_k + 1)])
    else:
        cmc = np.full(top_k, np.nan)
    notes = []
    tpir: dict[float, float | None] = {}
    thresholds: dict[float, float | None] = {}
    if num_non_mated:
        best = top_scores[non_mated, 0].astype(np.float64)
        unmeasurable = []
        for fpir in fpir_targets:
            cut = open_set_threshold(best, float(fpir))
            thresholds[float(fpir)] = cut
            if cut is None:
                tpir[float(fpir)] = None
                unmeasurable.append(float(fpir))
                continue
            ok = (ranks >= 1) & (ranks <= open_set_rank) & (mate_scores[mated].astype(np.float64) > cut)
            tpir[float(fpir)] = float(ok.mean()) if num_mated else None
        if unmeasurable:
            notes.append(f"TPIR@FPIR={', '.join(f'{f:.0e}' for f in unmeasurable)} not measurable: "
                         f"{num_non_mated} non-mated probes, an FPIR f needs >= 1/f of them")
    if not num_mated:
        notes.append("no probe has a mate in the gallery: no CMC / TPIR")
    return SearchResult(
        top_k=top_k, cmc=cmc, rank1=float(cmc[0]), rank_k=float(cmc[-1]), tpir_at_fpir=tpir,
        fpir_thresholds=thresholds, open_set_rank=open_set_rank, num_mated=num_mated, num_non_mated=num_non_mated,
        num_unknown=int((~probe_known).sum()), mate_ranks=mate_ranks, mate_scores=mate_scores,
        top_identities=top_identities, top_scores=top_scores, top_entries=top_entries, notes=notes,
    )


@dataclass
class Gallery:
    """Index entries and their identities.

    Attributes:
        embeddings: float32 [N, D] (gallery rows first, then distractors).
        identity: int64 [N] identity index per entry (distractor ``j`` has its own index).
        identity_keys: the matching key of each enrolled identity (index < ``num_enrolled``).
        num_enrolled: identities with gallery images; indices ``>=`` it are distractors.
        max_per_identity: most entries of one identity.
    """

    embeddings: np.ndarray
    identity: np.ndarray
    identity_keys: list[Any]
    num_enrolled: int
    max_per_identity: int


def make_gallery(embeddings: np.ndarray, keys: Sequence[Any], distractors: np.ndarray | None = None) -> Gallery:
    """Gallery entries keyed by identity (``keys[i]`` for row ``i``), then one identity per distractor row."""
    embeddings = np.asarray(embeddings, dtype=np.float32)
    if len(keys) != len(embeddings):
        raise ValueError(f"{len(keys)} identity keys for {len(embeddings)} gallery embeddings")
    unique: dict[Any, int] = {}
    identity = np.array([unique.setdefault(k, len(unique)) for k in keys], dtype=np.int64)
    per = np.bincount(identity) if len(identity) else np.zeros(0, np.int64)
    parts, idents = [embeddings], [identity]
    if distractors is not None and len(distractors):
        distractors = np.asarray(distractors, dtype=np.float32)
        if distractors.ndim != 2 or distractors.shape[1] != embeddings.shape[1]:
            raise ValueError(f"distractors are {distractors.shape}, gallery embeddings {embeddings.shape}")
        parts.append(distractors)
        idents.append(len(unique) + np.arange(len(distractors), dtype=np.int64))
    return Gallery(
        embeddings=np.concatenate(parts) if len(parts) > 1 else embeddings,
        identity=np.concatenate(idents),
        identity_keys=list(unique),
        num_enrolled=len(unique),
        max_per_identity=int(per.max()) if per.size else 1,
    )


def identify(
    gallery: Gallery,
    probes: np.ndarray,
    probe_keys: Sequence[Any],
    *,
    top_k: int = 10,
    index: SearchIndex | None = None,
    fpir_targets: Sequence[float] = DEFAULT_FPIR_TARGETS,
    open_set_rank: int = 1,
    chunk_size: int = 4096,
    **index_options: Any,
) -> tuple[SearchResult, SearchIndex, float]:
    """Search every probe in ``gallery`` and score the ranking.

    Args:
        gallery: from :func:`make_gallery`.
        probes: float32 [P, D] unit-norm probe embeddings.
        probe_keys: each probe's identity key (``None``: unknown, not scored).
        top_k: identities per probe (CMC length).
        index: a prebuilt index over ``gallery.embeddings`` (else built with ``index_options``, see
            :func:`build_index`).
        fpir_targets: FPIRs of the open-set TPIR.
        open_set_rank: R of TPIR(T, R).
        chunk_size: probes per faiss call.

    Returns:
        ``(result, index, search_seconds)``.
    """
    if top_k < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}")
    probes = np.ascontiguousarray(probes, dtype=np.float32)
    if len(probe_keys) != len(probes):
        raise ValueError(f"{len(probe_keys)} probe keys for {len(probes)} probes")
    if probes.ndim != 2 or probes.shape[1] != gallery.embeddings.shape[1]:
        raise ValueError(f"probes are {probes.shape}, gallery embeddings {gallery.embeddings.shape}: "
                         "embedded by different models?")
    if index is None:
        index = build_index(gallery.embeddings, **index_options)
    num_identities = int(gallery.identity.max()) + 1  # enrolled identities + distractors
    top_k = min(top_k, num_identities)
    # k entries hold at least k / max_per_identity distinct identities: enough for the first top_k
    k_search = min(top_k * gallery.max_per_identity, index.num_vectors)
    start = time.perf_counter()
    parts = []
    for begin in range(0, len(probes), chunk_size):
        scores, ids = index.search(probes[begin:begin + chunk_size], k_search)
        parts.append(distinct_identities(ids, scores, gallery.identity, top_k))
    seconds = time.perf_counter() - start
    top_identities, top_scores, top_entries = (np.concatenate([p[i] for p in parts]) for i in range(3))
    key_index = {k: i for i, k in enumerate(gallery.identity_keys)}
    known = np.array([k is not None for k in probe_keys], dtype=bool)
    probe_identity = np.array([key_index.get(k, -1) if k is not None else -1 for k in probe_keys], dtype=np.int64)
    result = identification_from_candidates(top_identities, top_scores, top_entries, probe_identity,
                                            probe_identity >= 0, known, fpir_targets, open_set_rank)
    return result, index, seconds


def probe_and_gallery_keys(gallery: Any, probes: Any) -> tuple[str, list[Any], list[Any]]:
    """How gallery and probes are matched, and each row's key (``None``: a probe of unknown identity).

    Identity names when every gallery row has one (folder, list and shard sources do), else labels: two files
    embedded from different folders agree on names, not necessarily on label numbers.

    Args:
        gallery: an :class:`~distrib_face.eval.embedset.EmbeddingSet`.
        probes: an :class:`~distrib_face.eval.embedset.EmbeddingSet`.

    Returns:
        ``("identities" or "labels", gallery keys, probe keys)``.

    Raises:
        ValueError: a gallery row has neither an identity name nor a label.
    """
    if len(gallery) and all(gallery.identities):
        return "identities", list(gallery.identities), [name or None for name in probes.identities]
    unknown = np.nonzero(gallery.labels < 0)[0]
    if unknown.size:
        raise ValueError(
            f"{unknown.size} gallery images have no identity (e.g. {gallery.names[int(unknown[0])]!r}): a gallery "
            "needs identity folders, a list file or shards; pass unlabelled images as --distractors"
        )
    return "labels", [int(v) for v in gallery.labels], [int(v) if v >= 0 else None for v in probes.labels]


def search_embeddings(
    gallery: Any,
    probes: Any,
    distractors: Any | None = None,
    *,
    top_k: int = 10,
    fpir_targets: Sequence[float] = DEFAULT_FPIR_TARGETS,
    open_set_rank: int = 1,
    per_probe: bool = True,
    **index_options: Any,
) -> tuple[SearchResult, dict[str, Any]]:
    """Search embedding files (``distrib-face embed``) and report as ``distrib-face search`` does.

    Args:
        gallery: the enrolled :class:`~distrib_face.eval.embedset.EmbeddingSet`.
        probes: the searched set.
        distractors: extra gallery entries of no probe's identity (their labels and names are not matched).
        top_k: identities returned per probe.
        fpir_targets: FPIRs of the open-set TPIR.
        open_set_rank: R of TPIR(T, R).
        per_probe: put each probe's candidates into the report.
        index_options: see :func:`build_index` (``kind``, ``nprobe``, ``ef_search``, ``gpu``, ...).

    Returns:
        ``(result, JSON-able report)``.
    """
    match_on, gallery_keys, probe_keys = probe_and_gallery_keys(gallery, probes)
    store = make_gallery(gallery.embeddings, gallery_keys, None if distractors is None else distractors.embeddings)
    result, index, seconds = identify(store, probes.embeddings, probe_keys, top_k=top_k, fpir_targets=fpir_targets,
                                      open_set_rank=open_set_rank, **index_options)
    report: dict[str, Any] = {
        "match_on": match_on,
        "num_gallery_images": len(gallery),
        "num_gallery_identities": store.num_enrolled,
        "num_distractors": 0 if distractors is None else len(distractors),
        "num_probes": len(probes),
        "index": {"kind": index.kind, "on_gpu": index.on_gpu, "entries": index.num_vectors, **index.params,
                  "build_seconds": index.build_seconds, "search_seconds": seconds},
        **result.to_dict(),
    }
    if per_probe:
        names = list(gallery.names) + ([] if distractors is None else list(distractors.names))
        enrolled = set(store.identity_keys)
        rows = []
        for p in range(len(probes)):
            candidates = []
            for ident, score, entry in zip(result.top_identities[p], result.top_scores[p], result.top_entries[p]):
                if ident < 0:
                    break
                key = store.identity_keys[ident] if ident < store.num_enrolled else None
                candidates.append({"identity": key, "image": names[entry], "score": float(score)})
            rows.append({"probe": probes.names[p], "identity": probe_keys[p],
                         "mated": probe_keys[p] is not None and probe_keys[p] in enrolled,
                         "mate_rank": int(result.mate_ranks[p]) or None, "candidates": candidates})
        report["probes"] = rows
    return result, report
