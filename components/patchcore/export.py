"""PatchCore's whole scoring path as one torch module that exports to ONNX (components.export writes it).

    graph = scoring_graph(detector, image_hw=(256, 256))      # a fitted PatchCore
    scores (B,), maps (B, H, W) = graph(images (B, 3, H, W) in [0, 1])

The module holds, as constants: the backbone (normalisation included) and the patch pooling (the same
PatchEmbedder the detector scores with, run eagerly: no frozen TorchScript graph inside an export), the
memory bank, the per-axis upsample-and-blur operators of `maps.to_input_resolution` for the fixed input
size, and for the image score each bank entry's `num_neighbors` nearest bank entries (precomputed with the
same exact faiss search the native detector runs at score time).

The nearest-bank search is EXACT: squared L2 as ||q||^2 - 2 q B^T + ||b||^2 (faiss IndexFlatL2's own
formula) over bank blocks of `block` entries, a running minimum and its index kept across blocks (the
first index wins ties, as in faiss). A native model with an approximate index (HNSW, IVF, IVF-PQ) therefore
scores a little differently from its export: the export equals the native model with a flat index
(`exact_reference`). Fixed input size (the anomaly-map operators depend on it), any batch size.
"""

from __future__ import annotations

import copy

import numpy as np
import torch
from torch import nn

from components import knn, maps
from components.data import Preprocess
from components.patchcore.model import PatchEmbedder
from components.patchcore.tiling import TiledEmbedder

DEFAULT_BLOCK = 2048  # bank entries per search block: (B * h * w, block) float32 distances alive at once
SUPPORT_CHUNK = 16  # bank-to-bank neighbours searched 16 rows at a time, as the native image score searches
# the worst patches' entries of a full batch of 16 (data.batch_size): faiss picks its direct or BLAS kernel
# from queries x bank entries, so the same query count gives bitwise the same distances


class NotExportableError(ValueError):
    """A fitted model whose scoring path this export cannot express; the message says why."""


class PatchCoreGraph(nn.Module):
    """forward: images (B, 3, H, W) float32 in [0, 1] -> (image_scores (B,), anomaly_maps (B, H, W)).

    embedder: PatchEmbedder ((B, 3, H, W) -> (B, h, w, D)); bank (M, D); support (M, k) int64 indices of
    each bank entry's k nearest bank entries (itself first), None for image_score "max"; a_h (H, h) and
    a_w (W, w) the map operators; block: bank entries per search block.
    """

    def __init__(self, embedder: PatchEmbedder, bank: torch.Tensor, support: torch.Tensor | None,
                 a_h: torch.Tensor, a_w: torch.Tensor, block: int = DEFAULT_BLOCK) -> None:
        super().__init__()
        self.embedder = embedder
        self.block = max(1, int(block))
        self.register_buffer("bank", bank.float().contiguous())
        self.register_buffer("bank_sq", (bank.double() ** 2).sum(1).float())
        self.register_buffer("support", support)
        self.register_buffer("a_h", a_h.float().contiguous())
        self.register_buffer("a_w_t", a_w.float().T.contiguous())

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        emb = self.embedder.pool(self.embedder.extractor(images))  # (B, h, w, D), eager: traceable
        h, w, d = emb.shape[1], emb.shape[2], emb.shape[3]
        queries = emb.reshape(-1, h * w, d)  # (B, P, D)
        sq, nearest = self.nearest(queries)
        dist = torch.sqrt(torch.clamp(sq, min=0.0))  # (B, P), as knn.knn_distances
        amaps = torch.matmul(torch.matmul(self.a_h, dist.reshape(-1, h, w)), self.a_w_t)
        return self.image_score(queries, dist, nearest), amaps

    def nearest(self, queries: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Exact nearest bank entry per query. queries (B, P, D) -> (squared distance (B, P), index (B, P))."""
        q_sq = (queries * queries).sum(-1, keepdim=True)  # (B, P, 1)
        best_d = best_i = None
        for start in range(0, self.bank.shape[0], self.block):
            rows = self.bank[start:start + self.block]
            d = q_sq - 2.0 * torch.matmul(queries, rows.T) + self.bank_sq[start:start + self.block]
            value, index = torch.min(d, dim=-1)
            if best_d is None:
                best_d, best_i = value, index
                continue
            better = value < best_d  # strict: the earlier block (lower index) keeps ties
            best_d = torch.where(better, value, best_d)
            best_i = torch.where(better, index + start, best_i)
        return best_d, best_i

    def image_score(self, queries: torch.Tensor, dist: torch.Tensor, nearest: torch.Tensor) -> torch.Tensor:
        """Paper eq. 7 (PatchCore._image_scores). queries (B, P, D), dist (B, P), nearest (B, P) -> (B,)."""
        worst = torch.argmax(dist, dim=1, keepdim=True)  # (B, 1), first maximum as numpy's argmax
        s_star = torch.gather(dist, 1, worst)[:, 0]
        if self.support is None:
            return s_star
        m_star = torch.gather(nearest, 1, worst)[:, 0]  # (B,)
        patch = torch.gather(queries, 1, worst.unsqueeze(-1).expand(-1, 1, queries.shape[-1]))  # (B, 1, D)
        neighbours = self.bank[self.support[m_star]]  # (B, k, D)
        support_dist = torch.sqrt(((neighbours - patch) ** 2).sum(-1))  # (B, k)
        weights = 1.0 - torch.softmax(support_dist, dim=1)[:, 0]
        return weights * s_star


def input_size(detector, image_hw: tuple[int, int] | None = None) -> tuple[int, int]:
    """The fixed (H, W) an export takes: image_hw, else the size the model's preprocessing always gives."""
    if image_hw is not None:
        return int(image_hw[0]), int(image_hw[1])
    data = detector.cfg.data
    hw = Preprocess(tuple(data.image_size), data.resize, tuple(data.crop_size) if data.crop_size else None).output_hw
    if hw is None:
        raise NotExportableError(f"data.resize {data.resize!r} without crop_size gives images of varying size; "
                                 "an export has one input size: pass image_hw (export --image-size H W)")
    return hw


def support_table(bank: np.ndarray, k: int) -> np.ndarray:
    """Each bank entry's k nearest bank entries (brute force, `knn.exact_neighbours` as the native score
    uses whatever its index, SUPPORT_CHUNK rows per call, so rounding and tie order are those of the
    native score at batch 16). bank (M, D) -> (M, k) int64."""
    out = np.empty((len(bank), k), dtype=np.int64)
    for start in range(0, len(bank), SUPPORT_CHUNK):
        out[start:start + SUPPORT_CHUNK] = knn.exact_neighbours(bank, bank[start:start + SUPPORT_CHUNK], k)
    return out


def scoring_graph(detector, image_hw: tuple[int, int] | None = None, block: int = DEFAULT_BLOCK) -> PatchCoreGraph:
    """A fitted PatchCore -> its PatchCoreGraph for input size image_hw (default: the model's image size).
    NotExportableError for a tiled model whose input exceeds the tile (the stitching is not exported)."""
    detector.check_fitted()
    hw = input_size(detector, image_hw)
    embedder = detector.embedder_
    if isinstance(embedder, TiledEmbedder):
        if hw[0] > embedder.tile_size[0] or hw[1] > embedder.tile_size[1]:
            raise NotExportableError(f"input {hw} is larger than tile_size {embedder.tile_size}: tiled "
                                     "embedding (cut, batch, stitch) is not exported")
        embedder = embedder.embedder
    embedder = copy.copy(embedder)  # a shallow copy: `graph` off for this module only (eager, traceable)
    embedder.graph = False
    with torch.no_grad():
        grid = embedder(torch.zeros(1, 3, *hw)).shape[1:3]
    bank = detector.memory_bank_
    p = detector.params
    support = None
    if p.image_score != "max":
        support = torch.from_numpy(support_table(bank, min(p.num_neighbors, len(bank))))
    a_h, a_w = maps.resize_blur_operators(grid, hw, float(p.smoothing_sigma))
    return PatchCoreGraph(embedder, torch.from_numpy(bank), support, a_h, a_w, block).eval()


def exact_reference(detector):
    """A shallow copy of a fitted PatchCore that searches its bank exactly (faiss flat index): what its
    export computes. The original keeps its own index."""
    detector.check_fitted()
    ref = copy.copy(detector)
    ref.index_ = knn.build_index(detector.memory_bank_, "flat")
    return ref
