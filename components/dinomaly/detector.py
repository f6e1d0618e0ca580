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

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from components import maps
from components.backbones import WeightsInfo
from components.config import Config, validate
from components.detector import (
    ArtifactError,
    BaseDetector,
    ImageInput,
    ProgressFn,
    ScoreBatch,
    iter_image_batches,
    read_saved_model,
    register_detector,
    write_model_dir,
)
from components.dinomaly import trainer
from components.dinomaly.encoders import (
    Encoder,
    build_encoder,
    encoder_description,
    encoder_state,
    rebuild_encoder,
)
from components.dinomaly.loss import anomaly_map, top_mean
from components.dinomaly.model import DinomalyNet

logger = logging.getLogger(__name__)
VERSION = "0.1.0"
LINE_THRESHOLDS = "line_thresholds.json"


@register_detector("dinomaly")
class Dinomaly(BaseDetector):
    def __init__(self, cfg: Config) -> None:
        super().__init__(cfg)
        self.params = cfg.detector.dinomaly
        self.net_: DinomalyNet | None = None
        self.weights_: WeightsInfo | None = None
        self.encoder_desc_: dict | None = None
        self.line_thresholds_: dict = {}  # line -> components.thresholds.Threshold (unified models)
        self.fit_stats_: dict[str, float] = {}

    @property
    def is_fitted(self) -> bool:
        return self.net_ is not None

    @property
    def label(self) -> str:
        """'dinomaly' for the paper's ViT encoder, 'dinomaly (cnn-variant)' for the CNN adapter."""
        return "dinomaly (cnn-variant)" if self.params.is_variant else "dinomaly"

    # ------------------------------------------------------------------------------------------ fit
    def fit(self, images: ImageInput, progress: ProgressFn | None = None,
            log_step: trainer.LogStepFn | None = None, checkpoint_dir: str | Path | None = None) -> Dinomaly:
        """Train on good images (N, 3, H, W) in [0, 1] (a tensor or an iterable of batches).

        log_step(step, {"loss", "lr", "mining_quantile", "grad_norm", "loss_group<g>"}) after every step;
        progress("train", step, iterations); checkpoint_dir: resume from / write checkpoints there every
        `checkpoint_every` steps.
        """
        self._set_threads()
        t0 = time.perf_counter()
        self.line_thresholds_ = {}  # calibrated for a previous model, if any
        data = collect_images(images, self.cfg.data.batch_size)
        device = self.device()
        encoder, self.weights_ = build_encoder(self.params, self.cfg.backbone)
        with torch.random.fork_rng(devices=[torch.cuda.current_device()] if device.type == "cuda" else []):
            torch.manual_seed(self.params.seed)
            if device.type == "cuda":
                torch.cuda.manual_seed(self.params.seed)
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
    def score(self, images: ImageInput, progress: ProgressFn | None = None) -> ScoreBatch:
        """images (B, 3, H, W) in [0, 1] -> ScoreBatch with maps at (H, W)."""
        self.check_fitted()
        self._set_threads()
        device = self.device()
        self.net_.to(device).eval()
        out, done = [], 0
        for batch in iter_image_batches(images, self.cfg.data.batch_size):
            _check_input(batch)
            with torch.inference_mode():
                features = self.net_(batch.to(device=device, dtype=torch.float32))
                patch = anomaly_map(features.encoder, features.decoder).float().cpu()  # (B, h, w)
            amap = maps.to_input_resolution(patch, tuple(batch.shape[-2:]), self.params.smoothing_sigma)
            scores = top_mean(amap, self.params.top_ratio)
            out.append(ScoreBatch(scores.numpy().astype(np.float32), amap.numpy().astype(np.float32)))
            done += batch.shape[0]
            if progress:
                progress("score", done, None)
        return ScoreBatch.concat(out)

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
        trainable = {k: v.detach().cpu().contiguous()
                     for k, v in self.net_.trainable_modules().state_dict().items()}
        frozen = encoder_state(self.net_.encoder)
        meta = self.metadata()
        writers = {
            "decoder.safetensors": lambda p: save_file(trainable, str(p)),
            "encoder.safetensors": lambda p: save_file(frozen, str(p)),
            "metadata.json": lambda p: p.write_text(json.dumps(meta, indent=2, sort_keys=True)),
            **self.threshold_writer(),
        }
        if self.line_thresholds_:
            payload = json.dumps({k: v.to_dict() for k, v in self.line_thresholds_.items()}, indent=2,
                                 sort_keys=True)
            writers[LINE_THRESHOLDS] = lambda p: p.write_text(payload)
        return write_model_dir(directory, self.name, writers)

    def metadata(self) -> dict:
        return {
            "method": self.name,
            "label": self.label,
            "encoder_kind": self.params.encoder,
            "paper_encoder": not self.params.is_variant,
            "library_version": VERSION,
            "config": self.cfg.to_dict(),
            "encoder": self.encoder_desc_,
            "groups": {"encoder": self.net_.encoder_groups, "decoder": self.net_.decoder_groups},
            "lines": sorted(self.line_thresholds_),
            "fit_stats": self.fit_stats_,
        }

    @classmethod
    def load(cls, directory: str | Path) -> Dinomaly:
        files, meta = read_saved_model(directory, "dinomaly", ("decoder.safetensors", "encoder.safetensors"))
        det = cls(validate(meta["config"], source=str(files["metadata.json"])))
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
        det.weights_ = WeightsInfo(desc["weights_source"], desc["weights_location"], desc["weights_sha256"])
        det.fit_stats_ = meta.get("fit_stats", {})
        det.read_threshold(files)
        if LINE_THRESHOLDS in files:
            from components.thresholds import Threshold

            raw = json.loads(files[LINE_THRESHOLDS].read_text())
            det.line_thresholds_ = {k: Threshold.from_dict(v, source=str(files[LINE_THRESHOLDS]))
                                    for k, v in raw.items()}
        return det

    # -------------------------------------------------------------------------------------- helpers
    def device(self) -> torch.device:
        if self.params.device == "cuda" or (self.params.device == "auto" and torch.cuda.is_available()):
            return torch.device("cuda")
        return torch.device("cpu")

    def _set_threads(self) -> None:
        if self.params.threads > 0:
            torch.set_num_threads(self.params.threads)


def collect_images(images: ImageInput, batch_size: int) -> torch.Tensor:
    """Every training image, in memory as float16 on the CPU. -> (N, 3, H, W); all must share H, W."""
    chunks = []
    for batch in iter_image_batches(images, batch_size):
        _check_input(batch)
        if chunks and batch.shape[-2:] != chunks[0].shape[-2:]:
            raise ValueError(f"training images must share one size: got {tuple(chunks[0].shape[-2:])} and "
                             f"{tuple(batch.shape[-2:])} (set data.image_size)")
        chunks.append(batch.detach().to("cpu", torch.float16).contiguous())  # one layout: same numerics
    if not chunks:
        raise ValueError("fit needs at least one training image")
    return torch.cat(chunks)


def _check_input(batch: torch.Tensor) -> None:
    if batch.ndim != 4 or batch.shape[1] != 3:
        raise ValueError(f"expected images (B, 3, H, W), got {tuple(batch.shape)}")
