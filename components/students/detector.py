"""Uninformed Students (Bergmann et al., CVPR 2020) behind the Detector protocol.

fit: the teacher (one patch network per patch size, distilled from the `backbone` section's pretrained
network on natural-image patches; components.students.teacher) is taken from the teacher cache
`<services.root>/teachers/<digest>/` or trained once and cached there; the teacher's per-channel
descriptor mean/std is measured on the training images; M students per scale regress the normalised
teacher descriptors on random crops (components.students.trainer); the mean/std of the regression error
and the predictive variance are measured on (at most `stats_max_images` of) the training images (the paper
uses a held-out validation set of good images; here the pipeline's held-out images calibrate the threshold).
score: dense maps (one pass per network, a descriptor every `dense_stride` pixels, upsampled to the input
resolution; components.students.networks), per scale
normalised e + normalised v, averaged over scales, Gaussian smoothed (`smoothing_sigma`); image score =
mean of the top `top_ratio` of the map's pixels (0.01: the top 1 %, steadier than the single maximum).
A saved model holds the teacher too (teacher.safetensors), so it is self-contained.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from components import maps
from components.backbones import state_digest
from components.checkpoints import cpu_state
from components.config import Config
from components.detector import ArtifactError, ImageInput, ProgressFn, register_detector
from components.students import trainer
from components.students.model import StudentsNet
from components.students.teacher import Teacher, cached_or_trained_teacher, teacher_from_state
from components.torch_detector import TorchDetector
from components.type_aliases import LogStepFn

logger = logging.getLogger(__name__)
TEACHER_DIR = "teachers"


@register_detector("students")
class Students(TorchDetector):
    SAVED_BEFORE_DEFAULTS = {"dense_stride": 1, "compactness": "squared", "teacher_source": "skimage"}
    def __init__(self, cfg: Config) -> None:
        super().__init__(cfg)  # weights_: the backbone the teacher was distilled from (lineage)
        self.net_: StudentsNet | None = None
        self.teacher_desc_: dict | None = None

    @property
    def is_fitted(self) -> bool:
        return self.net_ is not None

    def teacher_cache_root(self) -> Path | None:
        """Where teachers are cached (`<services.root>/teachers`), or None when `teacher_cache` is off."""
        return Path(self.cfg.services.root) / TEACHER_DIR if self.params.teacher_cache else None

    # ------------------------------------------------------------------------------------------ fit
    def fit(self, images: ImageInput, progress: ProgressFn | None = None,
            log_step: LogStepFn | None = None, checkpoint_dir: str | Path | None = None) -> Students:
        """Train on good images (N, 3, H, W) in [0, 1] (a tensor or an iterable of batches).

        progress("teacher", step, total) while a teacher is trained, then ("train", step, iterations);
        log_step(step, {"loss", "loss_p<size>"}) after every student step; checkpoint_dir: resume from /
        write student checkpoints there every `checkpoint_every` steps.
        """
        self._set_threads()
        t0 = time.perf_counter()
        data = self.working(self.collect_images(images, torch.float32))
        device = self.device()
        teacher, reused = cached_or_trained_teacher(self.params, self.cfg.backbone, self.teacher_cache_root(),
                                                    device, progress, data)
        t1 = time.perf_counter()
        p = self.params
        net = StudentsNet(teacher.nets, p.patch_sizes, p.num_students, p.channels, p.descriptor_dim,
                          p.leaky_slope, p.seed, p.dense_stride).to(device)
        subset = trainer.stats_subset(data, p.stats_max_images)
        trainer.fit_teacher_stats(net, subset, device)
        key = trainer.fingerprint(p, f"{teacher.digest}:{state_digest(teacher.nets)}", data)
        stats = trainer.train_students(net, data, p, device, key, progress, log_step, checkpoint_dir)
        trainer.fit_score_stats(net, subset, device)
        self.net_ = net.eval()
        self.teacher_desc_ = teacher.description()
        self.weights_ = teacher.weights
        self.fit_stats_ = {**stats, "n_images": float(data.shape[0]), "teacher_reused": float(reused),
                           "teacher_s": t1 - t0, "fit_s": time.perf_counter() - t0}
        logger.info("students fitted on %d images: teacher %s (%.1f s), %d student steps (%d resumed) in %.1f s, "
                    "last loss %.4f", data.shape[0], "reused" if reused else "trained", t1 - t0,
                    stats["iterations"], stats["resumed_from_step"], stats["train_s"], stats["final_loss"])
        return self

    def working(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> the same at the working side `image_size` (bilinear, antialiased; 0: unchanged)."""
        size = self.params.image_size
        if not size or tuple(images.shape[-2:]) == (size, size):
            return images
        return F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False, antialias=True)

    # ---------------------------------------------------------------------------------------- score
    def anomaly_maps(self, batch: torch.Tensor) -> torch.Tensor:
        """batch (B, 3, H, W) in [0, 1] -> smoothed maps (B, H, W) on the CPU (one image at a time: bounded
        memory; image score: their top mean). With `image_size`, computed at that side and upsampled."""
        device = self.device()
        net = self.net_.to(device).eval()
        with torch.inference_mode():
            dense = torch.cat([net(self.working(x.to(device=device, dtype=torch.float32))).float().cpu()
                               for x in batch.split(1)])
        if tuple(dense.shape[-2:]) != tuple(batch.shape[-2:]):
            return maps.to_input_resolution(dense, tuple(batch.shape[-2:]), self.params.smoothing_sigma)
        return maps.gaussian_blur(dense, self.params.smoothing_sigma)

    # ----------------------------------------------------------------------------------- save/load
    def save(self, directory: str | Path) -> Path:
        self.check_fitted()
        return self.write_saved_model(directory, {"teacher.safetensors": cpu_state(self.net_.teacher),
                                                  "students.safetensors": self.net_.student_state()})

    def metadata(self) -> dict:
        return {**self.common_metadata(), "teacher": self.teacher_desc_}

    @classmethod
    def load(cls, directory: str | Path) -> Students:
        det, files, meta = cls.open_saved_model(directory, ("teacher.safetensors", "students.safetensors"))
        p = det.params
        if not isinstance(meta.get("teacher"), dict):
            raise ArtifactError(f"{files['metadata.json']}: no teacher description")
        teacher: Teacher = teacher_from_state(p, load_file(str(files["teacher.safetensors"])), meta["teacher"],
                                              files["teacher.safetensors"])
        net = StudentsNet(teacher.nets, p.patch_sizes, p.num_students, p.channels, p.descriptor_dim,
                          p.leaky_slope, p.seed, p.dense_stride)
        state = load_file(str(files["students.safetensors"]))
        try:
            missing, unexpected = net.load_state_dict(state, strict=False)
        except RuntimeError as exc:
            raise ArtifactError(f"{files['students.safetensors']}: does not fit the configured students ({exc})") \
                from None
        if unexpected or any(not k.startswith("teacher.") for k in missing):
            raise ArtifactError(f"{files['students.safetensors']}: does not fit the configured students "
                                f"(missing {[k for k in missing if not k.startswith('teacher.')][:3]}, "
                                f"unexpected {unexpected[:3]})")
        det.net_ = net.eval()
        det.teacher_desc_ = meta["teacher"]
        det.weights_ = teacher.weights
        return det
