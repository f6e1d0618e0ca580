"""Dinomaly (Guo et al.) behind the Detector protocol: a frozen encoder's middle layers are reconstructed by
a noisy bottleneck and a linear-attention decoder trained on good images; the anomaly map is the cosine
distance between encoder and decoder group features.

fit: the good images are kept in memory (float16) and sampled in seeded batches for `iterations` steps
(see components.dinomaly.trainer). score: per-group cosine distance maps, averaged, upsampled to the input
size, Gaussian smoothed; image score = mean of the top `top_ratio` of the map. A unified model (one model
for several lines, components.dinomaly.unified) also stores one calibrated threshold per line.
"""

from __future__ import annotations

import copy
import json
import logging
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

from components import maps
from components.backbones import WeightsInfo
from components.checkpoints import cpu_state
from components.config import Config
from components.detector import ArtifactError, ImageInput, ProgressFn, register_detector
from components.dinomaly import trainer
from components.dinomaly.encoders import (
    Encoder,
    build_encoder,
    encoder_description,
    encoder_state,
    rebuild_encoder,
)
from components.dinomaly.loss import anomaly_map
from components.dinomaly.model import DinomalyNet
from components.torch_detector import TorchDetector, seeded
from components.type_aliases import LogStepFn

logger = logging.getLogger(__name__)
LINE_THRESHOLDS = "line_thresholds.json"


@register_detector("dinomaly")
class Dinomaly(TorchDetector):
    """Capabilities (components.capabilities): StepTrained, MultiLine (`for_line`, unified models)."""

    def __init__(self, cfg: Config) -> None:
        super().__init__(cfg)
        self.net_: DinomalyNet | None = None
        self.encoder_desc_: dict | None = None
        self.line_thresholds_: dict = {}  # line -> components.thresholds.Threshold (unified models)

    @property
    def is_fitted(self) -> bool:
        return self.net_ is not None

    @property
    def label(self) -> str:
        """'dinomaly' for the paper's ViT encoder, 'dinomaly (cnn-variant)' for the CNN adapter."""
        return "dinomaly (cnn-variant)" if self.params.is_variant else "dinomaly"

    # ------------------------------------------------------------------------------------------ fit
    def fit(self, images: ImageInput, progress: ProgressFn | None = None,
            log_step: LogStepFn | None = None, checkpoint_dir: str | Path | None = None) -> Dinomaly:
        """Train on good images (N, 3, H, W) in [0, 1] (a tensor or an iterable of batches).

        log_step(step, {"loss", "lr", "mining_quantile", "grad_norm", "loss_group<g>"}) after every step;
        progress("train", step, iterations); checkpoint_dir: resume from / write checkpoints there every
        `checkpoint_every` steps.
        """
        self._set_threads()
        t0 = time.perf_counter()
        self.line_thresholds_ = {}  # calibrated for a previous model, if any
        data = self.collect_images(images)
        device = self.device()
        encoder, self.weights_ = build_encoder(self.params, self.cfg.backbone)
        with seeded(self.params.seed, device):
            net = self._net(encoder).to(device)
            key = trainer.fingerprint(self.params, self.weights_.sha256, data)
            stats = trainer.train(net, data, self.params, device, key, progress, log_step, checkpoint_dir)
        self.net_ = net.eval()
        self.encoder_desc_ = encoder_description(encoder, self.params, self.cfg.backbone, self.weights_)
        self.fit_stats_ = {**stats, "n_images": float(data.shape[0]), "fit_s": time.perf_counter() - t0}
        logger.info("%s fitted on %d images: %d steps (%d resumed) in %.1f s, last loss %.4f", self.label,
                    data.shape[0], stats["iterations"], stats["resumed_from_step"], stats["train_s"],
                    stats["final_loss"])
        return self

    def _net(self, encoder: Encoder) -> DinomalyNet:
        p = self.params
        num_layers = len(p.target_layers if p.encoder == "vit" else p.cnn_layers)
        return DinomalyNet(encoder, num_layers, p.num_groups, p.decoder_depth, p.num_heads, p.mlp_ratio,
                           p.bottleneck_ratio, p.bottleneck_dropout)

    # ---------------------------------------------------------------------------------------- score
    def anomaly_maps(self, batch: torch.Tensor) -> torch.Tensor:
        """batch (B, 3, H, W) in [0, 1] -> smoothed maps (B, H, W) on the CPU (image score: their top mean)."""
        device = self.device()
        with torch.inference_mode():
            features = self.net_.to(device).eval()(batch.to(device=device, dtype=torch.float32))
            patch = anomaly_map(features.encoder, features.decoder).float().cpu()  # (B, h, w)
        return maps.to_input_resolution(patch, tuple(batch.shape[-2:]), self.params.smoothing_sigma)

    def for_line(self, line: str) -> Dinomaly:
        """A view of a unified model carrying `line`'s calibrated threshold (shares the network)."""
        self.check_fitted()
        if line not in self.line_thresholds_:
            raise ValueError(f"unified model has no threshold for line {line!r}; "
                             f"it was trained on {sorted(self.line_thresholds_)}")
        view = copy.copy(self)
        view.threshold_ = self.line_thresholds_[line]
        return view

    # ----------------------------------------------------------------------------------- save/load
    def save(self, directory: str | Path) -> Path:
        self.check_fitted()
        extra = {}
        if self.line_thresholds_:
            payload = json.dumps({k: v.to_dict() for k, v in self.line_thresholds_.items()}, indent=2,
                                 sort_keys=True)
            extra[LINE_THRESHOLDS] = lambda p: p.write_text(payload)
        return self.write_saved_model(directory, {"decoder.safetensors": cpu_state(self.net_.trainable_modules()),
                                                  "encoder.safetensors": encoder_state(self.net_.encoder)}, extra)

    def metadata(self) -> dict:
        return {
            **self.common_metadata(),
            "label": self.label,
            "encoder_kind": self.params.encoder,
            "paper_encoder": not self.params.is_variant,
            "encoder": self.encoder_desc_,
            "groups": {"encoder": self.net_.encoder_groups, "decoder": self.net_.decoder_groups},
            "lines": sorted(self.line_thresholds_),
        }

    @classmethod
    def load(cls, directory: str | Path) -> Dinomaly:
        det, files, meta = cls.open_saved_model(directory, ("decoder.safetensors", "encoder.safetensors"))
        desc = meta["encoder"]
        encoder = rebuild_encoder(desc, load_file(str(files["encoder.safetensors"])), files["encoder.safetensors"])
        net = det._net(encoder)
        try:
            net.trainable_modules().load_state_dict(load_file(str(files["decoder.safetensors"])), strict=True)
        except RuntimeError as exc:
            raise ArtifactError(f"{files['decoder.safetensors']}: does not fit the configured decoder ({exc})") \
                from None
        det.net_ = net.eval()
        det.encoder_desc_ = desc
        det.weights_ = WeightsInfo.from_record(desc)
        if LINE_THRESHOLDS in files:
            from components.thresholds import Threshold

            raw = json.loads(files[LINE_THRESHOLDS].read_text())
            det.line_thresholds_ = {k: Threshold.from_dict(v, source=str(files[LINE_THRESHOLDS]))
                                    for k, v in raw.items()}
        return det
