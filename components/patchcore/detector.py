"""PatchCore (Roth et al., CVPR 2022) behind the Detector protocol.

fit: locally aware patch embeddings of every good image -> greedy coreset on a random projection
(components.patchcore.bank: ratio, covering radius or shards) -> faiss index over the kept embeddings
(the memory bank; `index: auto` picks exact or HNSW and checks its recall on good patches outside the
bank). score: nearest-bank distance per patch -> anomaly map (bilinear upsampling + Gaussian smoothing);
image score = the paper's reweighted maximum.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

from components import coreset, knn, maps
from components.backbones import FeatureExtractor, build_extractor, extractor_from_record, extractor_record
from components.config import Config
from components.detector import (
    BaseDetector,
    ImageInput,
    ProgressFn,
    ScoreBatch,
    check_input,
    iter_image_batches,
    model_stats,
    register_detector,
)
from components.patchcore import bank as bank_rows
from components.patchcore import streaming
from components.patchcore.features import FeatureStore, FeatureWriter
from components.patchcore.model import PatchEmbedder
from components.patchcore.tiling import TiledEmbedder

logger = logging.getLogger(__name__)


@register_detector("patchcore")
class PatchCore(BaseDetector):
    """Capabilities (components.capabilities): Updatable (`update`), FeatureCached (`feature_key`, `extract`,
    `fit_features`)."""

    def __init__(self, cfg: Config) -> None:
        super().__init__(cfg)  # params: cfg.detector.patchcore
        self.memory_bank_: np.ndarray | None = None
        self.embedder_: PatchEmbedder | TiledEmbedder | None = None
        self.index_ = None
        self.grid_: tuple[int, int] | None = None
        self.image_size_: tuple[int, int] | None = None
        self.index_report_: knn.IndexReport | None = None
        self._selection_stats: dict[str, float] = {}
        self.updates_: list[dict] = []  # one record per `update` (images, patches, entries added, data)

    @property
    def is_fitted(self) -> bool:
        return self.memory_bank_ is not None and self.index_ is not None

    # ------------------------------------------------------------------------------------------ fit
    def fit(self, images: ImageInput, progress: ProgressFn | None = None) -> PatchCore:
        """Extract, select the coreset, index it. Features stay in RAM, or stream to an on-disk store
        (`stream_features`, `stream_threshold_mb`, `feature_dir`); both select the same bank."""
        t0 = time.perf_counter()
        with streaming.Workspace(self.params.feature_dir) as workspace:
            got = self._collect(images, progress, workspace)
            if got.store is None:
                return self.fit_features(got.features, progress, extract_s=time.perf_counter() - t0)
            return self._fit_collected(got, progress, time.perf_counter() - t0)

    def fit_store(self, store: FeatureStore, progress: ProgressFn | None = None, extract_s: float = 0.0,
                  xp: torch.Tensor | None = None, map_fn: Callable = map) -> PatchCore:
        """Fit from an on-disk FeatureStore (N, D) without loading it: the coreset runs on its projection
        xp (N, d) (computed chunk-wise when not given), then the selected rows are read back.
        Same bank as fit_features(store.read()) for the same seed. map_fn runs a sharded coreset's shards
        (coreset_shards > 1; e.g. over a Dask client, flows.sharded)."""
        return self._fit_collected(streaming.Collected(None, store, xp), progress, extract_s, map_fn)

    def _fit_collected(self, got: streaming.Collected, progress: ProgressFn | None, extract_s: float,
                       map_fn: Callable = map) -> PatchCore:
        """fit_store on got.store; takes got.xp (so the projection is freed before the rows are read back)."""
        store = got.store
        self._ensure_embedder()
        if store.shape[1] != self.embedder_.embed_dim:
            raise ValueError(f"{store.path}: features are {store.shape[1]}-dim, the embedder gives "
                             f"{self.embedder_.embed_dim}")
        if store.metadata.get("grid"):
            self.grid_ = tuple(int(v) for v in store.metadata["grid"].split(","))
        t1 = time.perf_counter()
        p = self.params
        xp, got.xp = got.xp, None
        if xp is None:
            xp = streaming.project_store(store, p.projection_dim, p.seed)
        picked = self._select_rows(xp, progress, map_fn)
        del xp
        bank = torch.from_numpy(store.gather(picked)).float().contiguous()
        probes = store.gather(bank_rows.probe_rows(len(store), picked, p.seed)).astype(np.float32)
        return self._set_bank(bank, len(store), extract_s, time.perf_counter() - t1, store=True, probes=probes)

    def update(self, images: ImageInput, progress: ProgressFn | None = None,
               lineage: dict | None = None) -> PatchCore:
        """Add new good images to a fitted model without re-extracting the old ones: the greedy coreset
        continues from the existing bank, adding new patches only where they lie beyond the bank's
        covering radius (at most coreset_ratio * new patches). Old bank rows are kept unchanged, first;
        `updates_` (saved in metadata.json) records the images, patches, entries added and `lineage`."""
        self.check_fitted()
        t0 = time.perf_counter()
        p, before = self.params, len(self.memory_bank_)
        radius = self.fit_stats_.get("coreset_sq_radius")
        if radius is None:
            logger.warning("this model records no coreset radius (fitted before updates existed): the update "
                           "adds coreset_ratio of the new patches")
        with streaming.Workspace(p.feature_dir) as workspace:
            counter: list[int] = [0]
            got = self._collect(images, progress, workspace, counter)
            callback = (lambda done, total: progress("coreset", done, total)) if progress else None
            rows, picked = streaming.extend_bank(self.memory_bank_, got, p.coreset_ratio, p.seed,
                                                 p.projection_dim, radius or 0.0, callback)
            probes = got.gather(torch.from_numpy(bank_rows.probe_rows(got.n_rows, picked.indices, p.seed)))
        self.memory_bank_ = np.concatenate([self.memory_bank_, rows.numpy().astype(np.float32)])
        self.index_ = self._build_index(self.memory_bank_, probes.numpy())
        new_radius = max(radius or 0.0, picked.sq_radius)
        self.fit_stats_ = {**self.fit_stats_, "bank_size": float(len(self.memory_bank_)),
                           "coreset_sq_radius": new_radius, **self._index_stats()}
        self.updates_.append({"n_images": counter[0], "n_patches": got.n_rows, "added": len(rows),
                              "bank_size_before": before, "bank_size_after": len(self.memory_bank_),
                              "seconds": time.perf_counter() - t0, "data": dict(lineage or {})})
        logger.info("patchcore updated: %d new patches -> %d bank entries added", got.n_rows, len(rows))
        return self

    def _collect(self, images: ImageInput, progress: ProgressFn | None, workspace: streaming.Workspace,
                 counter: list[int] | None = None) -> streaming.Collected:
        self._ensure_embedder()
        p = self.params
        return streaming.collect_features(
            self._embed_rows(images, progress, counter), self.embedder_.embed_dim, p.feature_dtype,
            p.stream_features, p.stream_threshold_mb << 20, workspace.path, p.projection_dim, p.seed)

    def fit_features(self, features: torch.Tensor, progress: ProgressFn | None = None,
                     extract_s: float = 0.0) -> PatchCore:
        """Fit from patch embeddings already extracted with `extract` (e.g. from a feature cache).

        features (N, D) float16/float32 -> self with memory_bank_ (M, D) float32 and its index.
        """
        self._ensure_embedder()
        if features.ndim != 2 or features.shape[1] != self.embedder_.embed_dim:
            raise ValueError(f"features must be (N, {self.embedder_.embed_dim}), got {tuple(features.shape)}")
        t1 = time.perf_counter()
        p = self.params
        picked = self._select_rows(coreset.random_projection(features, p.projection_dim, p.seed), progress)
        bank = features[picked].float().contiguous()
        probes = features[torch.from_numpy(bank_rows.probe_rows(len(features), picked, p.seed))].float().numpy()
        return self._set_bank(bank, features.shape[0], extract_s, time.perf_counter() - t1, probes=probes)

    def _set_bank(self, bank: torch.Tensor, n_patches: int, extract_s: float, coreset_s: float,
                  store: bool = False, probes: np.ndarray | None = None) -> PatchCore:
        """bank (M, D) float32 -> memory_bank_ and its index (checked on probes (P, D), good patches
        outside the bank), with the fit's statistics."""
        t2 = time.perf_counter()
        self.memory_bank_ = bank.numpy()
        self.index_ = self._build_index(self.memory_bank_, probes)
        self.updates_ = []
        self.fit_stats_ = {
            "n_patches": float(n_patches),
            "bank_size": float(bank.shape[0]),
            "embed_dim": float(bank.shape[1]),
            "extract_s": extract_s,
            "coreset_s": coreset_s,
            "index_s": time.perf_counter() - t2,
            "coreset_sq_radius": 0.0,
            **self._selection_stats,
            **self._index_stats(),
            "streamed": float(store),
        }
        logger.info("patchcore fitted: %d patches -> bank %s", n_patches, tuple(bank.shape))
        return self

    def _ensure_embedder(self) -> None:
        self._set_threads()
        if self.embedder_ is None:
            extractor, self.weights_ = build_extractor(self.cfg.backbone)
            self.embedder_ = self._embedder(extractor)

    def feature_key(self) -> dict:
        """What the patch embeddings depend on (for a feature cache key), besides the images."""
        self._ensure_embedder()
        p = self.params
        return {"backbone": self.cfg.backbone.name, "layers": list(self.cfg.backbone.layers),
                "weights_sha256": self.weights_.sha256, "data": self.cfg.data.model_dump(
                    mode="json", include={"image_size", "resize", "crop_size"}),
                "patch_size": p.patch_size, "patch_stride": p.patch_stride,
                "pretrain_embed_dim": p.pretrain_embed_dim, "target_embed_dim": p.target_embed_dim,
                "compact_embedding": p.compact_embedding, "inference_graph": self.cfg.backbone.inference_graph,
                "feature_dtype": p.feature_dtype,
                # only when tiling: untiled keys stay as they were, so existing feature caches still hit
                **({"tile_size": list(p.tile_size), "tile_overlap": p.tile_overlap} if p.tile_size else {})}

    def extract(self, images: ImageInput, progress: ProgressFn | None = None) -> torch.Tensor:
        """Patch embeddings of every image. images -> (N_images * h * w, D) in feature_dtype."""
        chunks = list(self._embed_rows(images, progress))
        if not chunks:
            raise ValueError("fit needs at least one training image")
        return torch.cat(chunks)

    def extract_to_store(self, images: ImageInput, path: str | Path, progress: ProgressFn | None = None,
                         metadata: dict[str, str] | None = None) -> FeatureStore:
        """Patch embeddings of every image streamed to a FeatureStore at `path` (feature_dtype rows, the
        grid in its metadata); same rows as `extract`, never all in RAM."""
        self._ensure_embedder()
        counter: list[int] = [0]
        with FeatureWriter(path, self.embedder_.embed_dim, self.params.feature_dtype, metadata) as writer:
            for rows in self._embed_rows(images, progress, counter):
                writer.append(rows)
            writer.metadata.update({"grid": ",".join(map(str, self.grid_ or ())), "n_images": str(counter[0])})
        return FeatureStore(path)

    def _embed_rows(self, images: ImageInput, progress: ProgressFn | None = None,
                    counter: list[int] | None = None):
        """Patch embeddings batch by batch: yields (B * h * w, D) in feature_dtype; counter[0] += B."""
        self._ensure_embedder()
        n_images = 0
        dtype = torch.float16 if self.params.feature_dtype == "float16" else torch.float32
        for batch in iter_image_batches(images, self.cfg.data.batch_size):
            check_input(batch)
            with torch.inference_mode():
                emb = self.embedder_(batch.float())
            self.grid_ = tuple(emb.shape[1:3])
            n_images += batch.shape[0]
            if counter is not None:
                counter[0] += batch.shape[0]
            yield emb.reshape(-1, emb.shape[-1]).to(dtype)
            if progress:
                progress("features", n_images, None)

    def select_bank(self, features: torch.Tensor, progress: ProgressFn | None = None) -> torch.Tensor:
        """Greedy coreset of features (N, D) -> bank (M, D) float32 (the rule of components.patchcore.bank)."""
        p = self.params
        picked = self._select_rows(coreset.random_projection(features, p.projection_dim, p.seed), progress)
        return features[picked].float().contiguous()

    def _select_rows(self, xp: torch.Tensor, progress: ProgressFn | None, map_fn: Callable = map) -> torch.Tensor:
        """Coreset rows of projected features xp (N, d) -> indices (M,); keeps the rule's statistics."""
        callback = (lambda done, total: progress("coreset", done, total)) if progress else None
        rows_per_image = int(np.prod(self.grid_)) if self.grid_ else xp.shape[0]
        chosen = bank_rows.select_bank_rows(xp, self.params, rows_per_image, callback, map_fn)
        self._selection_stats = chosen.stats
        return chosen.coreset.indices

    # ---------------------------------------------------------------------------------------- score
    def _score_batch(self, batch: torch.Tensor) -> ScoreBatch:
        """batch (B, 3, H, W) in [0, 1] -> ScoreBatch with maps at (H, W) (`score` runs it batch by batch)."""
        batch = batch.float()
        with torch.inference_mode():
            emb = self.embedder_(batch)
        b, h, w, d = emb.shape
        flat = emb.reshape(-1, d).numpy()
        dist, nn_idx = knn.knn_distances(self.index_, flat, k=1)
        dist, nn_idx = dist.reshape(b, h * w), nn_idx.reshape(b, h * w)
        if self.params.refine_top and knn.index_kind(self.index_) in ("hnsw", "ivf"):
            # graph / cell search only overestimates: each image's hottest patches are searched again,
            # wider, so that one stuck search cannot make the image score (knn.refine_top)
            knn.refine_top(self.index_, flat.reshape(b, h * w, d), dist, nn_idx, self.params.refine_top)
        if knn.index_kind(self.index_) != "flat":
            # and the image's maximum (s*, and its m*) exactly as exact search gives it (knn.exact_maximum)
            knn.exact_maximum(np.ascontiguousarray(self.memory_bank_, dtype=np.float32), flat.reshape(b, h * w, d), dist, nn_idx)
        patch = torch.from_numpy(dist.reshape(b, h, w).copy())
        image_scores = self._image_scores(flat.reshape(b, h * w, d), dist, nn_idx)
        amap = maps.to_input_resolution(patch, tuple(batch.shape[-2:]), self.params.smoothing_sigma)
        return ScoreBatch(image_scores.astype(np.float32, copy=False),
                          amap.numpy().astype(np.float32, copy=False))

    def _image_scores(self, emb: np.ndarray, dist: np.ndarray, nn_idx: np.ndarray) -> np.ndarray:
        """Paper eq. 7. emb (B, P, D), dist (B, P), nn_idx (B, P) -> (B,).

        s* = max patch distance; its nearest bank feature m*; the b nearest bank features of m*; weight =
        1 - softmax(distances from the test patch to those b features)[m*]; score = weight * s*.
        """
        worst = dist.argmax(1)
        s_star = dist[np.arange(len(dist)), worst]
        if self.params.image_score == "max":
            return s_star
        k = min(self.params.num_neighbors, len(self.memory_bank_))
        m_star = self.memory_bank_[nn_idx[np.arange(len(dist)), worst]]
        # exact, whatever the index: one query per image; an approximate index would return a different
        # support set (or, at an HNSW breadth below k, fewer than k entries) and so a different weight
        support = knn.exact_neighbours(self.memory_bank_, m_star, k)
        test_patch = emb[np.arange(len(dist)), worst]
        support_dist = np.linalg.norm(self.memory_bank_[support] - test_patch[:, None, :], axis=-1)
        weights = 1.0 - torch.softmax(torch.from_numpy(support_dist), dim=1)[:, 0].numpy()
        return weights * s_star

    # ----------------------------------------------------------------------------------- save/load
    def save(self, directory: str | Path) -> Path:
        self.check_fitted()
        bank = torch.from_numpy(np.ascontiguousarray(self.memory_bank_))
        body = {k: v.contiguous() for k, v in self.embedder_.extractor.body.state_dict().items()}
        extra = {}
        if knn.index_kind(self.index_) != "flat":
            extra["index.faiss"] = lambda p: knn.write_index(self.index_, p)
        return self.write_saved_model(directory, {"bank.safetensors": {"memory_bank": bank},
                                                  "backbone.safetensors": body}, extra)

    def metadata(self) -> dict:
        return {
            **self.common_metadata(),
            "backbone": extractor_record(self.cfg.backbone, self.weights_, self.embedder_.extractor),
            "embed_dim": int(self.memory_bank_.shape[1]),
            "bank_size": int(self.memory_bank_.shape[0]),
            "grid": list(self.grid_) if self.grid_ else None,
            "index": model_stats(self.index_report_.as_dict()) if self.index_report_ else None,
            "updates": [{k: v for k, v in u.items() if k != "seconds"} for u in self.updates_],
        }

    @classmethod
    def load(cls, directory: str | Path) -> PatchCore:
        det, files, meta = cls.open_saved_model(directory, ("bank.safetensors", "backbone.safetensors"))
        extractor, det.weights_ = extractor_from_record(meta["backbone"],
                                                        load_file(str(files["backbone.safetensors"])))
        det.embedder_ = det._embedder(extractor)
        det.memory_bank_ = load_file(str(files["bank.safetensors"]))["memory_bank"].numpy()
        report = meta.get("index")
        det.index_report_ = knn.IndexReport(**report) if report else None
        if "index.faiss" in files:
            det.index_ = knn.read_index(files["index.faiss"])
            if det.index_report_ is not None:
                knn.set_breadth(det.index_, det.index_report_.breadth)
        else:
            det.index_ = knn.build_index(det.memory_bank_, "flat")
        det.grid_ = tuple(meta["grid"]) if meta.get("grid") else None
        det.updates_ = list(meta.get("updates", []))
        return det

    # -------------------------------------------------------------------------------------- helpers
    def _embedder(self, extractor: FeatureExtractor) -> torch.nn.Module:
        """The PatchEmbedder; with tile_size, a TiledEmbedder around it (same interface) so that larger images
        are embedded tile by tile."""
        p = self.params
        embedder = PatchEmbedder(extractor, p.patch_size, p.patch_stride, p.pretrain_embed_dim,
                                 p.target_embed_dim, p.compact_embedding, self.cfg.backbone.inference_graph).eval()
        if p.tile_size is None:
            return embedder
        return TiledEmbedder(embedder, p.tile_size, p.tile_overlap, self.cfg.data.batch_size).eval()

    def _build_index(self, bank: np.ndarray, probes: np.ndarray | None):
        """The configured index over bank (M, D), recall-checked on probes (P, D); keeps the report."""
        p = self.params
        index, self.index_report_ = knn.choose_index(bank, p.index, probes, p.index_recall, p.flat_max_bank,
                                                     p.hnsw_m, p.ivf_lists, p.pq_subquantizers, p.seed)
        return index

    def _index_stats(self) -> dict[str, float]:
        r = self.index_report_
        if r is None:
            return {}
        return {"index_exact": float(r.kind == "flat"), "index_breadth": float(r.breadth),
                "index_recall": r.recall, "index_mean_rel_error": r.mean_rel_error}

    def _set_threads(self) -> None:
        """torch's threads (BaseDetector) and faiss's, to `threads`."""
        super()._set_threads()
        if self.params.threads > 0:
            knn.set_threads(self.params.threads)
