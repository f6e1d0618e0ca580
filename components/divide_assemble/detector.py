"""Divide-and-Assemble (Hou et al., ICCV 2021) behind the Detector protocol: a U-Net whose skip connections
pass through multi-scale block-wise memories reconstructs the image from memorised normal blocks; anomalies,
which the memory cannot assemble, leave a reconstruction error.

fit: the good images are kept in memory, resized to the working size `image_size` (default 128 px, whatever
data.image_size is), and the generator and a patch discriminator are trained adversarially for `iterations`
steps (components.divide_assemble.trainer). score: per-pixel squared error plus the cosine distance of a frozen
ImageNet extractor's features of image and reconstruction, each divided by its mean over the training images
and mixed by `score_align_weight`, upsampled to the input size, Gaussian smoothed (sigma in input pixels);
image score = mean of the top `top_ratio` of the map.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import timm
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from components import maps
from components.backbones import FeatureExtractor, WeightsInfo, build_extractor
from components.checkpoints import cpu_state
from components.config import Config
from components.detector import ArtifactError, ImageInput, ProgressFn, register_detector
from components.divide_assemble import trainer
from components.divide_assemble.losses import MapScales, combine_maps
from components.divide_assemble.networks import Generator, PatchDiscriminator
from components.torch_detector import TorchDetector, seeded

logger = logging.getLogger(__name__)


@register_detector("divide_assemble")
class DivideAssemble(TorchDetector):
    def __init__(self, cfg: Config) -> None:
        super().__init__(cfg)
        self.generator_: Generator | None = None
        self.extractor_: FeatureExtractor | None = None
        self.scales_: MapScales | None = None

    @property
    def is_fitted(self) -> bool:
        return self.generator_ is not None

    # ------------------------------------------------------------------------------------------ fit
    def fit(self, images: ImageInput, progress: ProgressFn | None = None,
            log_step: trainer.LogStepFn | None = None,
            checkpoint_dir: str | Path | None = None) -> DivideAssemble:
        """Train on good images (N, 3, H, W) in [0, 1] (a tensor or an iterable of batches).

        log_step(step, {"loss_g", "loss_d", "loss_rec", "loss_adv", "loss_align", "lr"}) after every step;
        progress("train", step, iterations); checkpoint_dir: resume from / write checkpoints there every
        `checkpoint_every` steps.
        """
        self._set_threads()
        t0 = time.perf_counter()
        p = self.params
        work = to_working_size(self.collect_images(images).float(), p.image_size)
        device = self.device()
        extractor, self.weights_ = build_extractor(self.cfg.backbone)
        extractor = extractor.to(device)
        with seeded(p.seed, device):
            gen, disc = Generator(p).to(device), PatchDiscriminator(tuple(p.disc_channels)).to(device)
            key = trainer.fingerprint(p, self.weights_.sha256, work)
            stats = trainer.train(gen, disc, extractor, work, p, device, key, progress, log_step, checkpoint_dir)
        self.generator_, self.extractor_ = gen.eval(), extractor.eval()
        self.scales_ = trainer.map_scales(gen, extractor, work, self.cfg.data.batch_size, device)
        self.fit_stats_ = {**stats, "n_images": float(work.shape[0]), "fit_s": time.perf_counter() - t0}
        logger.info("divide_assemble fitted on %d images: %d steps (%d resumed) in %.1f s, last loss_g %.4f",
                    work.shape[0], stats["iterations"], stats["resumed_from_step"], stats["train_s"],
                    stats.get("final_loss_g", float("nan")))
        return self

    # ---------------------------------------------------------------------------------------- score
    def anomaly_maps(self, batch: torch.Tensor) -> torch.Tensor:
        """batch (B, 3, H, W) in [0, 1] -> smoothed maps (B, H, W) on the CPU (image score: their top mean)."""
        device = self.device()
        generator, extractor = self.generator_.to(device).eval(), self.extractor_.to(device).eval()
        x = to_working_size(batch.to(device=device, dtype=torch.float32), self.params.image_size)
        rec, align = trainer.batch_maps(generator, extractor, x)
        combined = combine_maps(rec, align, self.scales_, self.params.score_align_weight).float().cpu()
        return maps.to_input_resolution(combined, tuple(batch.shape[-2:]), self.params.smoothing_sigma)

    # ----------------------------------------------------------------------------------- save/load
    def save(self, directory: str | Path) -> Path:
        self.check_fitted()
        return self.write_saved_model(directory, {"generator.safetensors": cpu_state(self.generator_),
                                                  "backbone.safetensors": cpu_state(self.extractor_.body)})

    def metadata(self) -> dict:
        return {
            **self.common_metadata(),
            "backbone": {"name": self.cfg.backbone.name, "layers": list(self.cfg.backbone.layers),
                         "weights_source": self.weights_.source, "weights_location": self.weights_.location,
                         "weights_sha256": self.weights_.sha256,
                         "mean": self.extractor_.mean.flatten().tolist(),
                         "std": self.extractor_.std.flatten().tolist()},
            "map_scales": self.scales_.to_dict(),
        }

    @classmethod
    def load(cls, directory: str | Path) -> DivideAssemble:
        det, files, meta = cls.open_saved_model(directory, ("generator.safetensors", "backbone.safetensors"))
        bb = meta["backbone"]
        body = timm.create_model(bb["name"], pretrained=False, features_only=True, out_indices=tuple(bb["layers"]))
        gen = Generator(det.params)
        try:
            body.load_state_dict(load_file(str(files["backbone.safetensors"])), strict=True)
            gen.load_state_dict(load_file(str(files["generator.safetensors"])), strict=True)
            scales = MapScales(float(meta["map_scales"]["reconstruction"]), float(meta["map_scales"]["alignment"]))
        except (RuntimeError, KeyError, TypeError) as exc:
            raise ArtifactError(f"{directory}: saved model does not fit its configuration ({exc})") from None
        extractor = FeatureExtractor(body, tuple(bb["mean"]), tuple(bb["std"])).eval()
        extractor.requires_grad_(False)
        det.generator_, det.extractor_, det.scales_ = gen.eval(), extractor, scales
        det.weights_ = WeightsInfo(bb["weights_source"], bb["weights_location"], bb["weights_sha256"])
        return det


def to_working_size(images: torch.Tensor, size: int) -> torch.Tensor:
    """Resize to the square working size (bilinear, antialiased when shrinking). (B, 3, H, W) -> (B, 3, S, S)."""
    if tuple(images.shape[-2:]) == (size, size):
        return images
    return F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False, antialias=True)

