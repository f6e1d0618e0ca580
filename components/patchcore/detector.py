"""PatchCore (Roth et al., CVPR 2022) behind the Detector protocol.

fit: locally aware patch embeddings of every good image -> greedy coreset on a random projection ->
faiss index over the kept embeddings (the memory bank). score: nearest-bank distance per patch -> anomaly
map (bilinear upsampling + Gaussian smoothing); image score = the paper's reweighted maximum.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import numpy as np
import timm
import torch
from safetensors.torch import load_file, save_file

from components import coreset, knn, maps
from components.backbones import FeatureExtractor, WeightsInfo, build_extractor
from components.config import Config, validate
from components.detector import (
    BaseDetector,
    ImageInput,
    ProgressFn,
    ScoreBatch,
    iter_image_batches,
    read_saved_model,
    register_detector,
    write_model_dir,
)
from components.patchcore.model import PatchEmbedder

logger = logging.getLogger(__name__)
VERSION = "0.1.0"


@register_detector("patchcore")
class PatchCore(BaseDetector):
    def __init__(self, cfg: Config) -> None:
        super().__init__(cfg)
        self.params = cfg.detector.patchcore
        self.memory_bank_: np.ndarray | None = None
        self.embedder_: PatchEmbedder | None = None
        self.index_ = None
        self.weights_: WeightsInfo | None = None
        self.grid_: tuple[int, int] | None = None
        self.image_size_: tuple[int, int] | None = None
        self.fit_stats_: dict[str, float] = {}

    @property
    def is_fitted(self) -> bool:
        return self.memory_bank_ is not None and self.index_ is not None

    # ------------------------------------------------------------------------------------------ fit
    def fit(self, images: ImageInput, progress: ProgressFn | None = None) -> PatchCore:
        t0 = time.perf_counter()
        features = self.extract(images, progress)
        return self.fit_features(features, progress, extract_s=time.perf_counter() - t0)

    def fit_features(self, features: torch.Tensor, progress: ProgressFn | None = None,
                     extract_s: float = 0.0) -> PatchCore:
        """Fit from patch embeddings already extracted with `extract` (e.g. from a feature cache).

        features (N, D) float16/float32 -> self with memory_bank_ (M, D) float32 and its index.
        """
        self._ensure_embedder()
        if features.ndim != 2 or features.shape[1] != self.embedder_.embed_dim:
            raise ValueError(f"features must be (N, {self.embedder_.embed_dim}), got {tuple(features.shape)}")
        t1 = time.perf_counter()
        bank = self.select_bank(features, progress)
        t2 = time.perf_counter()
        self.memory_bank_ = bank.numpy()
        self.index_ = self._build_index(self.memory_bank_)
        self.fit_stats_ = {
            "n_patches": float(features.shape[0]),
            "bank_size": float(bank.shape[0]),
            "embed_dim": float(bank.shape[1]),
            "extract_s": extract_s,
            "coreset_s": t2 - t1,
            "index_s": time.perf_counter() - t2,
        }
        logger.info("patchcore fitted: %d patches -> bank %s", features.shape[0], tuple(bank.shape))
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
                "compact_embedding": p.compact_embedding,
                "feature_dtype": p.feature_dtype}

    def extract(self, images: ImageInput, progress: ProgressFn | None = None) -> torch.Tensor:
        """Patch embeddings of every image. images -> (N_images * h * w, D) in feature_dtype."""
        self._ensure_embedder()
        chunks, n_images = [], 0
        dtype = torch.float16 if self.params.feature_dtype == "float16" else torch.float32
        for batch in iter_image_batches(images, self.cfg.data.batch_size):
            self._check_input(batch)
            with torch.inference_mode():
                emb = self.embedder_(batch.float())
            self.grid_ = tuple(emb.shape[1:3])
            chunks.append(emb.reshape(-1, emb.shape[-1]).to(dtype))
            n_images += batch.shape[0]
            if progress:
                progress("features", n_images, None)
        if not chunks:
            raise ValueError("fit needs at least one training image")
        return torch.cat(chunks)

    def select_bank(self, features: torch.Tensor, progress: ProgressFn | None = None) -> torch.Tensor:
        """Greedy coreset of features (N, D) -> bank (M, D) float32."""
        callback = (lambda done, total: progress("coreset", done, total)) if progress else None
        idx = coreset.greedy_coreset(
            features, self.params.coreset_ratio, self.params.seed, self.params.projection_dim, callback
        )
        return features[idx].float().contiguous()

    # ---------------------------------------------------------------------------------------- score
    def score(self, images: torch.Tensor, progress: ProgressFn | None = None) -> ScoreBatch:
        """images (B, 3, H, W) in [0, 1] -> ScoreBatch with maps at (H, W)."""
        self.check_fitted()
        self._set_threads()
        out = []
        done = 0
        for batch in iter_image_batches(images, self.cfg.data.batch_size):
            self._check_input(batch)
            out.append(self._score_batch(batch.float()))
            done += batch.shape[0]
            if progress:
                progress("score", done, None)
        return ScoreBatch.concat(out)

    def _score_batch(self, batch: torch.Tensor) -> ScoreBatch:
        with torch.inference_mode():
            emb = self.embedder_(batch)
        b, h, w, d = emb.shape
        flat = emb.reshape(-1, d).numpy()
        dist, nn_idx = knn.knn_distances(self.index_, flat, k=1)
        patch = torch.from_numpy(dist[:, 0].reshape(b, h, w).copy())
        image_scores = self._image_scores(flat.reshape(b, h * w, d), dist[:, 0].reshape(b, -1),
                                          nn_idx[:, 0].reshape(b, -1))
        amap = maps.to_input_resolution(patch, tuple(batch.shape[-2:]), self.params.smoothing_sigma)
        return ScoreBatch(image_scores.astype(np.float32), amap.numpy().astype(np.float32))

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
        _, support = knn.knn_distances(self.index_, m_star, k=k)
        # approximate (IVF) indexes return -1 where the probed lists hold fewer than k entries: the first
        # neighbour of m* is m* itself, so pad with it (a weight of 1 / k for each missing neighbour)
        support = np.where(support < 0, support[:, :1], support)
        test_patch = emb[np.arange(len(dist)), worst]
        support_dist = np.linalg.norm(self.memory_bank_[support] - test_patch[:, None, :], axis=-1)
        weights = 1.0 - torch.softmax(torch.from_numpy(support_dist), dim=1)[:, 0].numpy()
        return weights * s_star

    # ----------------------------------------------------------------------------------- save/load
    def save(self, directory: str | Path) -> Path:
        self.check_fitted()
        bank = torch.from_numpy(np.ascontiguousarray(self.memory_bank_))
        body = {k: v.contiguous() for k, v in self.embedder_.extractor.body.state_dict().items()}
        meta = self.metadata()
        writers = {
            "bank.safetensors": lambda p: save_file({"memory_bank": bank}, str(p)),
            "backbone.safetensors": lambda p: save_file(body, str(p)),
            "metadata.json": lambda p: p.write_text(json.dumps(meta, indent=2, sort_keys=True)),
            **self.threshold_writer(),
        }
        if self.params.index != "flat":
            writers["index.faiss"] = lambda p: knn.write_index(self.index_, p)
        return write_model_dir(directory, self.name, writers)

    def metadata(self) -> dict:
        return {
            "method": self.name,
            "library_version": VERSION,
            "config": self.cfg.to_dict(),
            "backbone": {"name": self.cfg.backbone.name, "layers": list(self.cfg.backbone.layers),
                         "weights_source": self.weights_.source, "weights_location": self.weights_.location,
                         "weights_sha256": self.weights_.sha256,
                         "mean": self.embedder_.extractor.mean.flatten().tolist(),
                         "std": self.embedder_.extractor.std.flatten().tolist()},
            "embed_dim": int(self.memory_bank_.shape[1]),
            "bank_size": int(self.memory_bank_.shape[0]),
            "grid": list(self.grid_) if self.grid_ else None,
            "fit_stats": self.fit_stats_,
        }

    @classmethod
    def load(cls, directory: str | Path) -> PatchCore:
        files, meta = read_saved_model(directory, "patchcore", ("bank.safetensors", "backbone.safetensors"))
        det = cls(validate(meta["config"], source=str(files["metadata.json"])))
        bb = meta["backbone"]
        body = timm.create_model(bb["name"], pretrained=False, features_only=True, out_indices=tuple(bb["layers"]))
        body.load_state_dict(load_file(str(files["backbone.safetensors"])), strict=True)
        extractor = FeatureExtractor(body, tuple(bb["mean"]), tuple(bb["std"])).eval()
        det.embedder_ = det._embedder(extractor)
        det.weights_ = WeightsInfo(bb["weights_source"], bb["weights_location"], bb["weights_sha256"])
        det.memory_bank_ = load_file(str(files["bank.safetensors"]))["memory_bank"].numpy()
        det.index_ = knn.read_index(files["index.faiss"]) if "index.faiss" in files else \
            det._build_index(det.memory_bank_)
        det.grid_ = tuple(meta["grid"]) if meta.get("grid") else None
        det.fit_stats_ = meta.get("fit_stats", {})
        det.read_threshold(files)
        return det

    # -------------------------------------------------------------------------------------- helpers
    def _embedder(self, extractor: FeatureExtractor) -> PatchEmbedder:
        p = self.params
        return PatchEmbedder(extractor, p.patch_size, p.patch_stride, p.pretrain_embed_dim,
                             p.target_embed_dim, p.compact_embedding).eval()

    def _build_index(self, bank: np.ndarray):
        p = self.params
        return knn.build_index(bank, p.index, p.ivf_lists, p.pq_subquantizers, p.seed)

    def _set_threads(self) -> None:
        if self.params.threads > 0:
            torch.set_num_threads(self.params.threads)
            knn.set_threads(self.params.threads)

    @staticmethod
    def _check_input(batch: torch.Tensor) -> None:
        if batch.ndim != 4 or batch.shape[1] != 3:
            raise ValueError(f"expected images (B, 3, H, W), got {tuple(batch.shape)}")
