"""Nearest-neighbour search over a memory bank with faiss: exact L2 (flat), HNSW, IVF and IVF-PQ.

`choose_index` picks the index for a bank (`auto`: exact for small banks, HNSW above `flat_max_bank`
entries) and runs a recall check: probe queries (the good patches outside the bank that lie farthest from
it) are searched exactly and with the approximate index, whose search breadth (HNSW efSearch, IVF nprobe)
is raised until the probes' recall@1 reaches the target. The check's figures (`IndexReport`) go into the
model metadata. HNSW and IVF only ever overestimate a distance (they return a real bank entry at its
exact distance), so `refine_top` searches each image's hottest patches again, 16x wider, until the
image's maximum can no longer change.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import faiss
import numpy as np

logger = logging.getLogger(__name__)

KINDS = ("flat", "hnsw", "ivf", "ivfpq")
EF_SEARCH = (4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 256, 512)  # HNSW search breadths tried, in order
HNSW_EF_CONSTRUCTION = 40
TIE_RTOL = 1e-4  # an approximate neighbour this close to the exact distance counts as found (ties)
REFINE_FACTOR = 16  # refine_top searches each image's hottest patches this much wider
HARD_FRACTION = 0.25  # choose_index checks recall on this fraction of the probes farthest from the bank


@dataclass(frozen=True)
class IndexReport:
    """What `choose_index` built and how well it searches. kind: the built index; breadth: efSearch
    (hnsw) or nprobe (ivf, ivfpq), 0 for flat; recall: recall@1 of the probes (1.0 for flat);
    mean_rel_error / p99_rel_error: relative excess of the returned distance over the exact one."""

    kind: str
    breadth: int
    recall: float
    mean_rel_error: float
    p99_rel_error: float
    probes: int
    target_recall: float
    build_s: float = 0.0  # timings: not in a saved model's metadata (components.detector.model_stats)
    check_s: float = 0.0
    fallback: str = ""  # why an approximate index was replaced by flat ("" if not)

    def as_dict(self) -> dict:
        return asdict(self)


def build_index(bank: np.ndarray, kind: str = "flat", nlist: int = 256, pq_m: int = 16, seed: int = 0,
                hnsw_m: int = 16):
    """A faiss index over bank (M, D) float32. kind: flat (exact L2), hnsw, ivf (IVF-Flat) or ivfpq.

    HNSW is built on one thread, so the same bank always gives the same graph. IVF variants need at least
    `nlist` training points; nlist is reduced to fit smaller banks. IVF-PQ codes have 8 bits (256
    centroids per sub-quantizer), fewer for a bank of under 256 entries, which faiss could not otherwise
    train. Search breadths start at a default (efSearch 16, nprobe nlist / 8): `choose_index` tunes them.
    """
    bank = np.ascontiguousarray(bank, dtype=np.float32)
    m, d = bank.shape
    if kind == "flat":
        index = faiss.IndexFlatL2(d)
    elif kind == "hnsw":
        index = faiss.IndexHNSWFlat(d, hnsw_m)
        index.hnsw.efConstruction = HNSW_EF_CONSTRUCTION
        index.hnsw.efSearch = 16
        threads = faiss.omp_get_max_threads()
        faiss.omp_set_num_threads(1)
        try:
            index.add(bank)
        finally:
            faiss.omp_set_num_threads(threads)
        return index
    elif kind in ("ivf", "ivfpq"):
        nlist = max(1, min(nlist, m // 39))
        quantizer = faiss.IndexFlatL2(d)
        if kind == "ivf":
            index = faiss.IndexIVFFlat(quantizer, d, nlist)
        else:
            if d % pq_m:
                raise ValueError(f"ivfpq: embedding dim {d} is not divisible by pq_subquantizers {pq_m}")
            if m < 2:
                raise ValueError(f"ivfpq: a bank of {m} entries is too small to train product quantizers")
            index = faiss.IndexIVFPQ(quantizer, d, nlist, pq_m, min(8, int(np.log2(m))))
        index.cp.seed = seed
        index.train(bank)
        index.nprobe = max(1, nlist // 8)
    else:
        raise ValueError(f"unknown index kind {kind!r} ({', '.join(KINDS)})")
    index.add(bank)
    return index


def index_kind(index) -> str:
    """The KINDS name of a built (or read) index."""
    if isinstance(index, faiss.IndexHNSW):
        return "hnsw"
    if isinstance(index, faiss.IndexIVFPQ):
        return "ivfpq"
    if isinstance(index, faiss.IndexIVF):
        return "ivf"
    return "flat"


def get_breadth(index) -> int:
    kind = index_kind(index)
    if kind == "hnsw":
        return int(index.hnsw.efSearch)
    if kind in ("ivf", "ivfpq"):
        return int(index.nprobe)
    return 0


def set_breadth(index, breadth: int) -> None:
    """efSearch (hnsw) or nprobe (ivf, ivfpq); ignored for flat."""
    kind = index_kind(index)
    if kind == "hnsw":
        index.hnsw.efSearch = int(breadth)
    elif kind in ("ivf", "ivfpq"):
        index.nprobe = int(min(breadth, index.nlist))


def _breadths(index) -> list[int]:
    kind = index_kind(index)
    if kind == "hnsw":
        return list(EF_SEARCH)
    if kind in ("ivf", "ivfpq"):
        return sorted({min(index.nlist, 2**i) for i in range(int(np.log2(max(index.nlist, 1))) + 1)})
    return [0]


def search_quality(index, probes: np.ndarray, exact: np.ndarray) -> dict[str, float]:
    """Recall@1 and relative distance error of the index at its current breadth. probes (P, D), exact (P,)
    their exact nearest-bank distances -> {recall, mean_rel_error, p99_rel_error}."""
    got_sq, _ = index.search(np.ascontiguousarray(probes, dtype=np.float32), 1)
    got = np.sqrt(np.maximum(got_sq[:, 0], 0.0))
    rel = (got - exact) / np.maximum(exact, 1e-12)
    rel = np.clip(np.where(np.isfinite(rel), rel, 1e3), 0.0, 1e3)  # nothing found (-1 labels): a miss
    return {"recall": float(np.mean(rel <= TIE_RTOL)), "mean_rel_error": float(np.mean(rel)),
            "p99_rel_error": float(np.quantile(rel, 0.99))}


def exact_distances(bank: np.ndarray, queries: np.ndarray) -> np.ndarray:
    """Exact L2 distance from each query (Q, D) to its nearest bank (M, D) entry -> (Q,)."""
    sq, _ = faiss.knn(np.ascontiguousarray(queries, dtype=np.float32), np.ascontiguousarray(bank, dtype=np.float32), 1)
    return np.sqrt(np.maximum(sq[:, 0], 0.0))


def exact_neighbours(bank: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k nearest bank (M, D) entries of each query (Q, D), by brute force -> (Q, k) int64,
    nearest first. For a few queries (one per image) whatever the index: an approximate index may miss
    some of k neighbours or return fewer than k (an HNSW breadth below k, IVF lists shorter than k)."""
    _, idx = faiss.knn(np.ascontiguousarray(queries, dtype=np.float32), np.ascontiguousarray(bank, dtype=np.float32),
                       min(k, len(bank)))
    return idx.astype(np.int64, copy=False)


def hardest(bank: np.ndarray, candidates: np.ndarray, fraction: float = HARD_FRACTION) -> tuple[np.ndarray, np.ndarray]:
    """The `fraction` of candidate queries (P, D) farthest from the bank (M, D), with their exact
    distances -> ((P', D), (P',)). Good patches far from the bank are where graph and cell searches miss
    most: test patches of unseen parts (and defects) lie there or farther."""
    exact = exact_distances(bank, candidates)
    keep = np.argsort(-exact, kind="stable")[: max(1, int(round(len(candidates) * fraction)))]
    return np.ascontiguousarray(candidates[keep], dtype=np.float32), exact[keep]


def recall_check(index, bank: np.ndarray, probes: np.ndarray, target: float,
                 exact: np.ndarray | None = None) -> tuple[int, dict[str, float]]:
    """Raise the index's search breadth until recall@1 of `probes` (P, D) against exact search over bank
    (M, D) reaches `target`. -> (breadth set on the index, figures at that breadth: recall,
    mean_rel_error, p99_rel_error). Leaves the widest breadth tried when none reaches the target.
    exact (P,): the probes' exact distances when already known."""
    exact = exact_distances(bank, probes) if exact is None else exact
    figures: dict[str, float] = {}
    breadth = get_breadth(index)
    for breadth in _breadths(index):
        set_breadth(index, breadth)
        figures = search_quality(index, probes, exact)
        if figures["recall"] >= target:
            break
    return breadth, figures


def wide_search(index, queries: np.ndarray, factor: int = REFINE_FACTOR) -> tuple[np.ndarray, np.ndarray]:
    """Nearest bank entry of a few queries (Q, D), searched `factor` times wider than the index's breadth
    (HNSW efSearch, IVF nprobe) -> (distances (Q,), indices (Q,)). At the widths tried by `recall_check`
    a 16x wider HNSW search misses nearly never, and it reads a few thousand bank rows, not the bank."""
    kind = index_kind(index)
    breadth = get_breadth(index)
    if kind == "hnsw":
        params = faiss.SearchParametersHNSW(efSearch=max(64, factor * breadth))
    elif kind in ("ivf", "ivfpq"):
        params = faiss.SearchParametersIVF(nprobe=min(index.nlist, max(8, factor * breadth)))
    else:
        params = None
    sq, nn = index.search(np.ascontiguousarray(queries, dtype=np.float32), 1, params=params)
    return np.sqrt(np.maximum(sq[:, 0], 0.0)), nn[:, 0]


def refine_top(index, queries: np.ndarray, dist: np.ndarray, idx: np.ndarray, top: int) -> int:
    """Search each image's largest distances again, wider (`wide_search`), in place.

    queries (B, P, D), dist / idx (B, P): an HNSW or IVF index's distances (each at least the exact one,
    since it returns a real bank entry at its exact distance) and entries. The `top` largest distances of
    each image are searched again; where an image's largest refined value is still below its largest
    unrefined one, twice as many, and so on. Afterwards every image's maximum (the image score's s*) is
    the maximum of the wide search over all its patches: a graph search stuck far from a patch's true
    neighbour can no longer make a good image's score. -> the number of patches searched again."""
    return _settle_maxima(queries, dist, idx, top, lambda q: wide_search(index, q))


def exact_maximum(bank: np.ndarray, queries: np.ndarray, dist: np.ndarray, idx: np.ndarray) -> int:
    """Make each image's largest distance exact, in place, whatever the index found.

    queries (B, P, D), dist / idx (B, P) from an approximate index (each distance at least the exact
    one). Each image's largest not yet verified distance is searched by brute force over bank (M, D);
    again while a verified value fell below the image's largest unverified one (2, 4, ... at a time).
    Then every image's maximum, and its patch's nearest entry, equal exact search's (up to ties): a
    graph that stalls on some patches (HNSW on features it navigates badly: cookie with
    tf_efficientnet_lite1 had 0.07 % of patches >10 % too far even at efSearch 64) cannot make an
    image score. -> the number of patches searched."""
    def brute_force(q: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        sq, nn = faiss.knn(np.ascontiguousarray(q, dtype=np.float32), bank, 1)
        return np.sqrt(np.maximum(sq[:, 0], 0.0)), nn[:, 0]

    return _settle_maxima(queries, dist, idx, 1, brute_force)


def _settle_maxima(queries: np.ndarray, dist: np.ndarray, idx: np.ndarray, top: int,
                   search: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]) -> int:
    """Search each image's `top` largest distances again with `search` (queries (Q, D) -> distances (Q,),
    entries (Q,)), keeping the smaller; twice as many while an image's largest searched value is below
    its largest unsearched one. In place; -> the number of patches searched."""
    b, p = dist.shape
    todo = np.arange(b)
    done = np.zeros((b, p), dtype=bool)
    searched = 0
    while len(todo) and top > 0:
        top = min(top, p)
        masked = np.where(done[todo], -np.inf, dist[todo])
        pick = np.argpartition(-masked, top - 1, axis=1)[:, :top] if top < p else np.tile(np.arange(p), (len(todo), 1))
        rows, cols = np.repeat(todo, pick.shape[1]), pick.reshape(-1)
        fresh = ~done[rows, cols]
        rows, cols = rows[fresh], cols[fresh]
        found, nn = search(queries[rows, cols])
        better = found < dist[rows, cols]
        dist[rows[better], cols[better]] = found[better]
        idx[rows[better], cols[better]] = nn[better]
        done[rows, cols] = True
        searched += len(rows)
        best = np.where(done[todo], dist[todo], -np.inf).max(1)
        rest = np.where(done[todo], -np.inf, dist[todo]).max(1)
        todo = todo[best < rest]
        top *= 2
    return searched


def choose_index(bank: np.ndarray, kind: str, probes: np.ndarray | None, target_recall: float = 0.95,
                 flat_max_bank: int = 1024, hnsw_m: int = 16, nlist: int = 256, pq_m: int = 16,
                 seed: int = 0):
    """Build the index for bank (M, D) and check it. kind "auto": flat up to flat_max_bank entries, else
    HNSW, falling back to flat when no efSearch reaches target_recall on the probes. probes (P, D): good
    patches not in the bank, of which the quarter farthest from it is searched (`hardest`; None or empty:
    no check, the report then gives recall nan).
    -> (index, IndexReport)."""
    t0 = time.perf_counter()
    auto = kind == "auto"
    if auto:
        kind = "flat" if len(bank) <= flat_max_bank else "hnsw"
    index = build_index(bank, kind, nlist, pq_m, seed, hnsw_m)
    build_s = time.perf_counter() - t0
    if kind == "flat":
        return index, IndexReport("flat", 0, 1.0, 0.0, 0.0, 0, target_recall, build_s, 0.0)
    if probes is None or len(probes) == 0:
        logger.warning("%s index over %d entries: no probe patches, recall not checked", kind, len(bank))
        nan = float("nan")
        return index, IndexReport(kind, get_breadth(index), nan, nan, nan, 0, target_recall, build_s, 0.0)
    t1 = time.perf_counter()
    probes, exact = hardest(bank, probes)
    breadth, figures = recall_check(index, bank, probes, target_recall, exact)
    check_s = time.perf_counter() - t1
    report = IndexReport(kind, breadth, figures["recall"], figures["mean_rel_error"], figures["p99_rel_error"],
                         len(probes), target_recall, build_s, check_s)
    if figures["recall"] < target_recall:
        reason = (f"{kind} reached recall {figures['recall']:.3f} < {target_recall} at breadth {breadth}")
        if auto:
            logger.warning("%s: searching the bank exactly instead", reason)
            t2 = time.perf_counter()
            flat = build_index(bank, "flat")
            return flat, IndexReport("flat", 0, 1.0, 0.0, 0.0, len(probes), target_recall,
                                     build_s + time.perf_counter() - t2, check_s, fallback=reason)
        logger.warning("%s (index: %s was asked for explicitly, so it is kept)", reason, kind)
    logger.info("%s index over %d entries: breadth %d, recall@1 %.3f on %d probes", kind, len(bank), breadth,
                figures["recall"], len(probes))
    return index, report


def knn_distances(index, queries: np.ndarray, k: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """L2 distances and indices of the k nearest bank entries. queries (Q, D) -> ((Q, k), (Q, k))."""
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    sq, idx = index.search(queries, k)
    return np.sqrt(np.maximum(sq, 0.0)), idx


def nearest_sq_distances(bank: np.ndarray, queries: np.ndarray, block: int = 65536) -> np.ndarray:
    """Exact squared L2 distance from each query to its nearest bank entry. bank (M, D), queries (Q, D)
    -> (Q,) float32, searched in blocks of `block` queries (flat index, so memory stays Q + block * k)."""
    index = build_index(bank, "flat")
    out = np.empty(len(queries), dtype=np.float32)
    for start in range(0, len(queries), block):
        part = np.ascontiguousarray(queries[start:start + block], dtype=np.float32)
        out[start:start + len(part)] = np.maximum(index.search(part, 1)[0][:, 0], 0.0)
    return out


def index_nbytes(index) -> int:
    """Size of the index as faiss serialises it (what `write_index` stores)."""
    return int(faiss.serialize_index(index).nbytes)


def write_index(index, path: Path) -> None:
    faiss.write_index(index, str(path))


def read_index(path: Path):
    return faiss.read_index(str(path))


def set_threads(threads: int) -> None:
    if threads > 0:
        faiss.omp_set_num_threads(threads)
