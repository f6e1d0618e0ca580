"""Divide-and-Assemble (Hou et al., ICCV 2021) behind the Detector protocol: a U-Net whose skip connections
pass through multi-scale block-wise memories reconstructs the image from memorised normal blocks; anomalies,
which the memory cannot assemble, leave a reconstruction error.

fit: the good images are kept in memory, resized to the working size `image_size` (default 128 px, whatever
data.image_size is; 0: data.image_size), and the generator and a patch discriminator are trained adversarially for `iterations`
steps (components.divide_assemble.trainer). score: per-pixel squared error plus the cosine distance of the
alignment features of image and reconstruction (`align_features`: a frozen ImageNet extractor, or the trained
discriminator's latent features, saved as discriminator.safetensors), each divided by its mean over the training images
and mixed by `score_align_weight`, upsampled to the input size, Gaussian smoothed (sigma in input pixels);
image score = mean of the top `top_ratio` of the map.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from components import maps
from components.backbones import FeatureExtractor, build_extractor, extractor_from_record, extractor_record
from components.checkpoints import cpu_state
from components.config import Config
from components.detector import ArtifactError, ImageInput, ProgressFn, register_detector
from components.divide_assemble import trainer
from components.divide_assemble.losses import MapScales, combine_maps
from components.divide_assemble.networks import DiscriminatorFeatures, Generator, PatchDiscriminator
from components.torch_detector import TorchDetector, seeded
from components.type_aliases import LogStepFn

logger = logging.getLogger(__name__)


@register_detector("divide_assemble")
class DivideAssemble(TorchDetector):
    def __init__(self, cfg: Config) -> None:
        super().__init__(cfg)
        self.generator_: Generator | None = None
        self.extractor_: FeatureExtractor | None = None
        self.discriminator_: PatchDiscriminator | None = None
        self.scales_: MapScales | None = None

    @property
    def is_fitted(self) -> bool:
        return self.generator_ is not None

    # ------------------------------------------------------------------------------------------ fit
    def fit(self, images: ImageInput, progress: ProgressFn | None = None,
            log_step: LogStepFn | None = None,
            checkpoint_dir: str | Path | None = None) -> DivideAssemble:
        """Train on good images (N, 3, H, W) in [0, 1] (a tensor or an iterable of batches).

        log_step(step, {"loss_g", "loss_d", "loss_rec", "loss_adv", "loss_align", "lr"}) after every step;
        progress("train", step, iterations); checkpoint_dir: resume from / write checkpoints there every
        `checkpoint_every` steps.
        """
        self._set_threads()
        t0 = time.perf_counter()
        p = self.params
        work = to_working_size(self.collect_images(images).float(), self.working_size())
        device = self.device()
        extractor, self.weights_ = build_extractor(self.cfg.backbone)
        extractor = extractor.to(device)
        with seeded(p.seed, device):
            gen, disc = Generator(p).to(device), PatchDiscriminator(tuple(p.disc_channels)).to(device)
            aligner = DiscriminatorFeatures(disc) if p.align_features == "discriminator" else extractor
            key = trainer.fingerprint(p, self.weights_.sha256, work)
            stats = trainer.train(gen, disc, aligner, work, p, device, key, progress, log_step, checkpoint_dir)
        self.generator_, self.extractor_ = gen.eval(), extractor.eval()
        self.discriminator_ = disc.eval() if p.align_features == "discriminator" else None
        self.scales_ = trainer.map_scales(gen, self.aligner(), work, self.cfg.data.batch_size, device)
        self.fit_stats_ = {**stats, "n_images": float(work.shape[0]), "fit_s": time.perf_counter() - t0}
        logger.info("divide_assemble fitted on %d images: %d steps (%d resumed) in %.1f s, last loss_g %.4f",
                    work.shape[0], stats["iterations"], stats["resumed_from_step"], stats["train_s"],
                    stats.get("final_loss_g", float("nan")))
        return self

    def working_size(self) -> int:
        """The square side the networks work at (image_size, or data.image_size when it is 0)."""
        return self.params.working_size(tuple(self.cfg.data.image_size))

    def aligner(self) -> torch.nn.Module:
        """What the alignment term compares: the discriminator's features or the frozen ImageNet extractor."""
        return DiscriminatorFeatures(self.discriminator_) if self.discriminator_ is not None else self.extractor_

    # ---------------------------------------------------------------------------------------- score
    def anomaly_maps(self, batch: torch.Tensor) -> torch.Tensor:
        """batch (B, 3, H, W) in [0, 1] -> smoothed maps (B, H, W) on the CPU (image score: their top mean)."""
        device = self.device()
        generator, extractor = self.generator_.to(device).eval(), self.aligner().to(device).eval()
        x = to_working_size(batch.to(device=device, dtype=torch.float32), self.working_size())
        rec, align = trainer.batch_maps(generator, extractor, x)
        combined = combine_maps(rec, align, self.scales_, self.params.score_align_weight).float().cpu()
        return maps.to_input_resolution(combined, tuple(batch.shape[-2:]), self.params.smoothing_sigma)

    # ----------------------------------------------------------------------------------- save/load
    def save(self, directory: str | Path) -> Path:
        self.check_fitted()
        files = {"generator.safetensors": cpu_state(self.generator_),
                 "backbone.safetensors": cpu_state(self.extractor_.body)}
        if self.discriminator_ is not None:
            files["discriminator.safetensors"] = cpu_state(self.discriminator_)
        return self.write_saved_model(directory, files)

    def metadata(self) -> dict:
        return {
            **self.common_metadata(),
            "backbone": extractor_record(self.cfg.backbone, self.weights_, self.extractor_),
            "map_scales": self.scales_.to_dict(),
        }

    @classmethod
    def load(cls, directory: str | Path) -> DivideAssemble:
        det, files, meta = cls.open_saved_model(directory, ("generator.safetensors", "backbone.safetensors"))
        gen = Generator(det.params)
        try:
            extractor, det.weights_ = extractor_from_record(meta["backbone"],
                                                            load_file(str(files["backbone.safetensors"])))
            gen.load_state_dict(load_file(str(files["generator.safetensors"])), strict=True)
            scales = MapScales(float(meta["map_scales"]["reconstruction"]), float(meta["map_scales"]["alignment"]))
            if det.params.align_features == "discriminator":
                disc = PatchDiscriminator(tuple(det.params.disc_channels))
                disc.load_state_dict(load_file(str(files["discriminator.safetensors"])), strict=True)
                det.discriminator_ = disc.eval().requires_grad_(False)
        except (RuntimeError, KeyError, TypeError) as exc:
            raise ArtifactError(f"{directory}: saved model does not fit its configuration ({exc})") from None
        extractor.requires_grad_(False)
        det.generator_, det.extractor_, det.scales_ = gen.eval(), extractor, scales
        return det


def to_working_size(images: torch.Tensor, size: int) -> torch.Tensor:
    """Resize to the square working size (bilinear, antialiased when shrinking). (B, 3, H, W) -> (B, 3, S, S)."""
    if tuple(images.shape[-2:]) == (size, size):
        return images
    return F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False, antialias=True)

