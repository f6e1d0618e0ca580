"""Transformaly (Cohen and Avidan) behind the Detector protocol.

fit: the teacher's pooled (agnostic) features of the good images -> PCA keeping `pca_variance` of the
variance -> one Gaussian; students trained to reproduce the fine-tuned teacher blocks (components.transformaly.
trainer); their per-block discrepancy vectors on the good images -> a second Gaussian. score: image score =
agnostic NLL + fine-tuned NLL (image level, as the paper).

The anomaly map is NOT part of the paper: it is the student-teacher squared error per location of each
fine-tuned block, divided by that block's mean on the training images, averaged over blocks, upsampled and
smoothed (`smoothing_sigma`). Metadata says so (`anomaly_map`), and its pixel metrics must be labelled as
this optional map's.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

from components import maps
from components.backbones import WeightsInfo
from components.checkpoints import cpu_state
from components.config import Config
from components.detector import ArtifactError, ImageInput, ProgressFn, check_input, register_detector
from components.torch_detector import TorchDetector
from components.transformaly import trainer
from components.transformaly.encoders import (
    build_teacher,
    rebuild_teacher,
    teacher_description,
    teacher_state,
)
from components.transformaly.gaussian import PCA, Gaussian, fit_gaussian, fit_pca, gaussian_nll
from components.transformaly.loss import block_discrepancy, location_errors
from components.transformaly.model import Teacher, TeacherPass, TransformalyNet
from components.type_aliases import LogStepFn

logger = logging.getLogger(__name__)
MAP_DESCRIPTION = ("optional, not the paper's (which scores images only): student-teacher squared error per "
                   "location of each fine-tuned block / that block's training mean, averaged, smoothed")


@register_detector("transformaly")
class Transformaly(TorchDetector):
    SAVED_BEFORE_DEFAULTS = {"student_mode": "eval"}  # models saved before the field existed trained in eval mode

    def __init__(self, cfg: Config) -> None:
        super().__init__(cfg)
        self.net_: TransformalyNet | None = None
        self.teacher_desc_: dict | None = None
        self.pca_: PCA | None = None
        self.agnostic_: Gaussian | None = None
        self.finetuned_: Gaussian | None = None

    @property
    def is_fitted(self) -> bool:
        return self.net_ is not None and self.finetuned_ is not None

    @property
    def label(self) -> str:
        """'transformaly' for the paper's ViT teacher, 'transformaly (cnn-variant)' for the CNN adapter."""
        return "transformaly (cnn-variant)" if self.params.is_variant else "transformaly"

    # ------------------------------------------------------------------------------------------ fit
    def fit(self, images: ImageInput, progress: ProgressFn | None = None,
            log_step: LogStepFn | None = None, checkpoint_dir: str | Path | None = None) -> Transformaly:
        """Fit on good images (N, 3, H, W) in [0, 1] (a tensor or an iterable of batches), N >= 2.

        log_step(step, {"loss", "epoch", "loss_block<b>"}) after every step; progress("train", step, total);
        checkpoint_dir: resume from / write checkpoints there every `checkpoint_every` steps.
        """
        self._set_threads()
        t0 = time.perf_counter()
        data = self.collect_images(images)
        if data.shape[0] < 2:
            raise ValueError(f"transformaly needs at least 2 training images (a covariance), got {data.shape[0]}")
        device = self.device()
        teacher, name, self.weights_ = build_teacher(self.params, self.cfg.backbone)
        net = self._net(teacher).to(device)
        cache, pooled = self._teacher_features(net, data, device)
        key = trainer.fingerprint(self.params, self.weights_.sha256, data)
        stats = trainer.train(net, data, self.params, device, key, cache, progress, log_step, checkpoint_dir)
        discrepancy = self._discrepancy(net, cache, data, device)
        self.net_ = net.eval()
        self.pca_ = fit_pca(pooled, self.params.pca_variance)
        self.agnostic_ = fit_gaussian(self.pca_.transform(pooled), self.params.ridge)
        self.finetuned_ = fit_gaussian(discrepancy, self.params.ridge)
        self.teacher_desc_ = teacher_description(teacher, name, self.weights_)
        self.fit_stats_ = {**stats, "n_images": float(data.shape[0]), "pca_components": float(len(self.pca_.explained)),
                           "pca_variance_kept": float(self.pca_.explained.sum()),
                           "agnostic_dim": float(pooled.shape[1]), "fit_s": time.perf_counter() - t0}
        logger.info("%s fitted on %d images: %d steps (%d resumed) in %.1f s, last loss %.3g, PCA %d of %d dims",
                    self.label, data.shape[0], stats["steps"], stats["resumed_from_step"], stats["train_s"],
                    stats["final_loss"], len(self.pca_.explained), pooled.shape[1])
        return self

    def _net(self, teacher: Teacher) -> TransformalyNet:
        p = self.params
        return TransformalyNet(teacher, p.blocks, p.student_init, p.init_noise, p.seed, p.student_mode,
                               p.student_dropout)

    def _teacher_features(self, net: TransformalyNet, data: torch.Tensor,
                          device: torch.device) -> tuple[TeacherPass | None, np.ndarray]:
        """(the teacher's pass over every image when `cache_features`, else None; pooled (N, D) float64)."""
        size = self.cfg.data.batch_size
        if self.params.cache_features:  # every block input/output of the frozen teacher, computed once
            cache = trainer.teacher_passes(net, data, size, device)
            return cache, cache.pooled.double().cpu().numpy()
        pooled = [net.teacher_pass(data[i:i + size].to(device=device, dtype=torch.float32)).pooled
                  for i in range(0, data.shape[0], size)]
        return None, torch.cat(pooled).double().cpu().numpy()

    def _discrepancy(self, net: TransformalyNet, cache, data: torch.Tensor, device: torch.device) -> np.ndarray:
        """Per-block discrepancy vectors of the training images after training -> (N, n_blocks) float64."""
        rows, size = [], self.cfg.data.batch_size
        with torch.inference_mode():
            for start in range(0, data.shape[0], size):
                if cache is not None:
                    rows_idx = torch.arange(start, min(start + size, data.shape[0]), device=cache.pooled.device)
                    passed = trainer.select_rows(cache, rows_idx)
                else:
                    passed = net.teacher_pass(data[start:start + size].to(device=device, dtype=torch.float32))
                rows.append(block_discrepancy(passed.outputs, net.student_pass(passed.student_inputs())).cpu())
        return torch.cat(rows).double().numpy()

    # ---------------------------------------------------------------------------------------- score
    def score_parts(self, images: torch.Tensor) -> tuple[np.ndarray, np.ndarray, torch.Tensor]:
        """images (B, 3, H, W) in [0, 1] -> (agnostic NLL (B,), fine-tuned NLL (B,) float64, map (B, H, W))."""
        self.check_fitted()
        check_input(images)
        device = self.device()
        with torch.inference_mode():
            features = self.net_.to(device)(images.to(device=device, dtype=torch.float32))
            disc = block_discrepancy(features.teacher, features.student).cpu().double().numpy()
            amap = self._map(features.teacher, features.student, tuple(images.shape[-2:]))
        pooled = features.pooled.cpu().double().numpy()
        return (gaussian_nll(self.agnostic_, self.pca_.transform(pooled)), gaussian_nll(self.finetuned_, disc),
                amap)

    def score_batch(self, batch: torch.Tensor) -> tuple[np.ndarray, torch.Tensor]:
        """batch (B, 3, H, W) in [0, 1] -> (image score = agnostic NLL + fine-tuned NLL (B,), the optional
        student-teacher discrepancy map (B, H, W); see the module docstring). `score` runs it batch by batch."""
        agnostic, finetuned, amap = self.score_parts(batch)
        return agnostic + finetuned, amap

    def _map(self, teacher: list[torch.Tensor], student: list[torch.Tensor], size: tuple[int, int]) -> torch.Tensor:
        """Per-block location errors / training mean, upsampled to `size`, averaged, smoothed -> (B, H, W) cpu."""
        scale = torch.as_tensor(self.finetuned_.mean, dtype=torch.float32)
        total = None
        for b, (t, s) in enumerate(zip(teacher, student, strict=True)):
            errors = location_errors(t, s).float().cpu()
            if errors.ndim == 2:  # ViT tokens (B, T): drop prefix tokens, back onto the patch grid
                grid = self.net_.teacher.grid(size)
                errors = errors[:, self.net_.teacher.prefix_tokens:].reshape(errors.shape[0], *grid)
            up = maps.upsample(errors / scale[b].clamp_min(1e-12), size)
            total = up if total is None else total + up
        return maps.gaussian_blur(total / len(teacher), self.params.smoothing_sigma)

    # ----------------------------------------------------------------------------------- save/load
    def save(self, directory: str | Path) -> Path:
        self.check_fitted()
        stats = {"pca_mean": self.pca_.mean, "pca_components": self.pca_.components,
                 "pca_explained": self.pca_.explained, "agnostic_mean": self.agnostic_.mean,
                 "agnostic_cov": self.agnostic_.cov, "finetuned_mean": self.finetuned_.mean,
                 "finetuned_cov": self.finetuned_.cov}
        stats = {k: torch.from_numpy(np.ascontiguousarray(v, dtype=np.float64)) for k, v in stats.items()}
        return self.write_saved_model(directory, {"student.safetensors": cpu_state(self.net_.student),
                                                  "teacher.safetensors": teacher_state(self.net_.teacher),
                                                  "gaussians.safetensors": stats})

    def metadata(self) -> dict:
        return {**self.common_metadata(), "label": self.label, "encoder_kind": self.params.encoder,
                "paper_encoder": not self.params.is_variant, "image_level_method": True,
                "anomaly_map": MAP_DESCRIPTION, "teacher": self.teacher_desc_, "blocks": list(self.net_.block_ids)}

    @classmethod
    def load(cls, directory: str | Path) -> Transformaly:
        det, files, meta = cls.open_saved_model(
            directory, ("student.safetensors", "teacher.safetensors", "gaussians.safetensors"))
        desc = meta["teacher"]
        teacher = rebuild_teacher(desc, load_file(str(files["teacher.safetensors"])), files["teacher.safetensors"])
        net = det._net(teacher)
        try:
            net.student.load_state_dict(load_file(str(files["student.safetensors"])), strict=True)
            g = {k: v.numpy() for k, v in load_file(str(files["gaussians.safetensors"])).items()}
            det.pca_ = PCA(g["pca_mean"], g["pca_components"], g["pca_explained"])
            det.agnostic_ = Gaussian.from_moments(g["agnostic_mean"], g["agnostic_cov"])
            det.finetuned_ = Gaussian.from_moments(g["finetuned_mean"], g["finetuned_cov"])
        except (RuntimeError, KeyError, ValueError) as exc:
            raise ArtifactError(f"{directory}: student or Gaussians do not fit the configured model "
                                f"({type(exc).__name__}: {exc})") from None
        det.net_ = net.eval()
        det.teacher_desc_ = desc
        det.weights_ = WeightsInfo.from_record(desc)
        return det
