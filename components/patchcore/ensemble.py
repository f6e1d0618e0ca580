"""A PatchCore backbone ensemble behind the Detector protocol (Roth et al. 2022 report their best results
with an ensemble of backbones).

Every member is a PatchCore with the `detector.patchcore` settings and its own backbone
(`detector.patchcore_ensemble.backbones`, members built by `member_config`). fit fits every member on the
same good images; score scores every member, divides each member's anomaly map (already at the input size)
and image score by that member's scale, and combines them (`combine`: mean, or max) into one ScoreBatch.

Why the scales make members comparable. A member's map is a Euclidean distance in that member's embedding
space, and the unit of that space is the backbone's: channel counts, activation magnitudes and input
normalisation (ImageNet statistics for mobilenetv2, [-1, 1] for the efficientnet-lite weights) differ from
one backbone to the next, so raw distances of two members can differ by an order of magnitude. A mean of raw
maps would be the map of whichever member has the largest features, the others adding little. Each
member's scale is measured on good images only: the `normalise_quantile` quantile (default the median) of
its good-to-good neighbour distances (`components.coreset.neighbour_distances` on its patch embeddings of
the training images: for probe patches of a few images, the distance to the nearest patch of any *other*
training image, i.e. what a good test patch sees against a bank built from other images). Divided by it,
every member's map reads in one unit: "multiples of this backbone's typical good-to-good variation". A value
near 1 is as unusual as a typical good patch, and a member that sees a defect at 5 times its normal variation
says 5 whatever the size of its features. The scale is equivariant: multiplying a member's embeddings by c
multiplies its distances and its scale by c, so its normalised map does not change (checked in
tests/unit/components/test_ensemble.py). No anomalies, labels or calibration images are needed, and a quantile rather
than the maximum keeps a few outlying good patches from setting it. The spread above 1 is not equalised: a
member whose features separate a defect better still contributes the larger excess, as an average should.

Costs: `fit` buffers the training batches once (ImageInput may be a one-shot iterator, and every member
needs the same images): all training images are held in RAM as float tensors (N * 3 * H * W * 4 bytes).
Each member extracts the training images' patch embeddings once (held in RAM, N * h * w * D values), takes
its scale from them and fits its bank from the same embeddings (`PatchCore.fit_features`), then frees
them. Scoring costs the sum of the members' costs.

Saved as one model directory: the members' files under `member<i>.` prefixes (each member's own
manifest.json among them, so its loader re-checks them too), metadata.json recording each member's backbone,
layers, weights source and sha256, scale and bank size. Every file is sha256-checked on load.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import shutil
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from components import coreset
from components.backbones import WeightsInfo
from components.config import Config, validate
from components.detector import (
    MANIFEST,
    ArtifactError,
    BaseDetector,
    ImageInput,
    ProgressFn,
    ScoreBatch,
    iter_image_batches,
    read_manifest,
    register_detector,
)
from components.patchcore.detector import PatchCore

logger = logging.getLogger(__name__)


def member_config(cfg: Config, backbone: str) -> Config:
    """The config of the member with timm backbone `backbone`: `cfg` with that backbone name, the ensemble's
    layers (when set) and method patchcore. backbone.weights_file belongs to backbone.name: dropped for
    every other member (their weights resolve as backbone.weights says: packaged, hub or random)."""
    raw = cfg.to_dict()
    params = cfg.detector.patchcore_ensemble
    raw["backbone"]["name"] = backbone
    if params.layers is not None:
        raw["backbone"]["layers"] = list(params.layers)
    if backbone != cfg.backbone.name:
        raw["backbone"]["weights_file"] = None
    raw["detector"]["method"] = "patchcore"
    return validate(raw, source=f"detector.patchcore_ensemble.backbones ({backbone})")


def normalising_scale(features: torch.Tensor | np.ndarray, rows_per_image: int, quantile: float,
                      seed: int = 0) -> float:
    """The `quantile` of good-to-good neighbour distances of patch embeddings features (N, D), image-major
    with rows_per_image rows per image -> one positive float (ValueError when it cannot be measured)."""
    distances = coreset.neighbour_distances(features, rows_per_image, seed=seed)
    if distances.size == 0:
        raise ValueError("patchcore_ensemble needs at least two training images to normalise its members "
                         "(good-to-good neighbour distances)")
    scale = float(np.quantile(distances, quantile))
    if not np.isfinite(scale) or scale <= 0.0:
        raise ValueError(f"good-to-good neighbour distance quantile {quantile} is {scale}: are the training "
                         "images identical? (detector.patchcore_ensemble.normalise_quantile)")
    return scale


def combine_normalised(values: Sequence[np.ndarray], scales: Sequence[float], how: str) -> np.ndarray:
    """Members' scores divided by their scales, then combined. values: K arrays of one shape ((B,) image
    scores or (B, H, W) maps), scales (K,) -> one float32 array of that shape (mean or max over members)."""
    if len(values) != len(scales) or not values:
        raise ValueError(f"{len(values)} members' scores but {len(scales)} scales")
    if how not in ("mean", "max"):
        raise ValueError(f"combine must be mean or max, got {how!r}")
    out = None
    for value, scale in zip(values, scales, strict=True):
        part = np.asarray(value, dtype=np.float32) / np.float32(scale)
        if out is None:
            out = part
        elif how == "mean":
            out += part
        else:
            np.maximum(out, part, out=out)
    return out / np.float32(len(values)) if how == "mean" else out


@register_detector("patchcore_ensemble")
class PatchCoreEnsemble(BaseDetector):
    def __init__(self, cfg: Config) -> None:
        super().__init__(cfg)  # params: cfg.detector.patchcore_ensemble; weights_: all members' weights together
        self.members_: list[PatchCore] = []
        self.scales_: np.ndarray | None = None  # (K,) float64, one per member, in backbones order

    @property
    def is_fitted(self) -> bool:
        return bool(self.members_) and self.scales_ is not None

    # ------------------------------------------------------------------------------------------ fit
    def fit(self, images: ImageInput, progress: ProgressFn | None = None) -> PatchCoreEnsemble:
        """Fit every member on the same images (buffered once: `images` may be a one-shot iterator) and
        measure each member's scale. Learned state is set only when every member has fitted."""
        t0 = time.perf_counter()
        if self.cfg.backbone.weights_file is not None and self.cfg.backbone.name not in self.params.backbones:
            logger.warning("backbone.weights_file (for %s) is unused: no ensemble member is %s",
                           self.cfg.backbone.name, self.cfg.backbone.name)
        batches = list(iter_image_batches(images, self.cfg.data.batch_size))
        if not batches:
            raise ValueError("fit needs at least one training image")
        members, scales, stats = [], [], {}
        for backbone in self.params.backbones:
            member, scale, member_stats = self._fit_member(backbone, batches, progress)
            members.append(member)
            scales.append(scale)
            stats.update({f"{backbone}.{key}": value for key, value in member_stats.items()})
        self.members_, self.scales_ = members, np.asarray(scales, dtype=np.float64)
        self.weights_ = combined_weights([(b, m.weights_) for b, m in zip(self.params.backbones, members,
                                                                            strict=True)])
        self.fit_stats_ = {"members": float(len(members)),
                           "bank_size": float(sum(len(m.memory_bank_) for m in members)),
                           "fit_s": time.perf_counter() - t0, **stats}
        return self

    def _new_member(self, backbone: str) -> PatchCore:
        return PatchCore(member_config(self.cfg, backbone))

    def _fit_member(self, backbone: str, batches: list[torch.Tensor],
                    progress: ProgressFn | None) -> tuple[PatchCore, float, dict[str, float]]:
        """One member fitted on batches, its scale, and its timings."""
        member = self._new_member(backbone)
        t0 = time.perf_counter()
        features = member.extract(batches, progress)  # (N * h * w, D): the member's patch embeddings
        extract_s = time.perf_counter() - t0
        rows_per_image = int(np.prod(member.grid_))
        scale = normalising_scale(features, rows_per_image, self.params.normalise_quantile,
                                  seed=self.cfg.detector.patchcore.seed)
        t1 = time.perf_counter()
        member.fit_features(features, progress, extract_s=extract_s)  # the same embeddings: extracted once
        del features
        logger.info("ensemble member %s: scale %.4g (quantile %.2f of good-to-good distances), bank %d",
                    backbone, scale, self.params.normalise_quantile, len(member.memory_bank_))
        return member, scale, {"scale": scale, "scale_s": t1 - t0 - extract_s, "fit_s": time.perf_counter() - t0,
                               "bank_size": float(len(member.memory_bank_))}

    # ---------------------------------------------------------------------------------------- score
    def _score_batch(self, batch: torch.Tensor) -> ScoreBatch:
        """batch (B, 3, H, W) in [0, 1] -> the members' normalised scores combined, maps at (H, W)."""
        parts = [member.score(batch) for member in self.members_]
        return ScoreBatch(combine_normalised([p.image_scores for p in parts], self.scales_, self.params.combine),
                          combine_normalised([p.anomaly_maps for p in parts], self.scales_, self.params.combine))

    def _set_threads(self) -> None:
        """Nothing here: every member sets its own (detector.patchcore.threads)."""

    # ----------------------------------------------------------------------------------- save/load
    def save(self, directory: str | Path) -> Path:
        """One model directory: each member saved (by its own save) to a scratch folder, its files copied in
        under `member<i>.`, plus metadata.json and threshold.json."""
        self.check_fitted()
        with tempfile.TemporaryDirectory(prefix="defectops-ensemble-") as scratch:
            writers, records = {}, []
            for i, member in enumerate(self.members_):
                saved = member.save(Path(scratch) / f"member{i}")
                names = sorted(read_manifest(saved)["files"]) + [MANIFEST]
                for name in names:
                    writers[f"{member_prefix(i)}{name}"] = functools.partial(shutil.copyfile, saved / name)
                records.append(self._member_record(i, member, names))
            return self.write_saved_model(directory, {}, writers, self.metadata(records))

    def _member_record(self, i: int, member: PatchCore, files: list[str]) -> dict:
        return {"backbone": self.params.backbones[i], "layers": list(member.cfg.backbone.layers),
                **member.weights_.as_record(), "scale": float(self.scales_[i]),
                "bank_size": len(member.memory_bank_), "grid": list(member.grid_ or ()),
                "prefix": member_prefix(i), "files": files}

    def metadata(self, members: list[dict] | None = None) -> dict:
        """members: one record per member (`_member_record`, written by `save`)."""
        return {**self.common_metadata(), "combine": self.params.combine,
                "normalise_quantile": self.params.normalise_quantile, "members": members or []}

    @classmethod
    def load(cls, directory: str | Path) -> PatchCoreEnsemble:
        det, files, meta = cls.open_saved_model(directory, ())
        records = meta.get("members")
        if not isinstance(records, list) or len(records) != len(det.params.backbones):
            raise ArtifactError(f"{files['metadata.json']}: expected {len(det.params.backbones)} members")
        with tempfile.TemporaryDirectory(prefix="defectops-ensemble-") as scratch:
            det.members_ = [_load_member(files, i, record, Path(scratch)) for i, record in enumerate(records)]
        det.scales_ = np.asarray([float(r["scale"]) for r in records], dtype=np.float64)
        det.weights_ = combined_weights([(r["backbone"], WeightsInfo.from_record(r)) for r in records])
        return det


def member_prefix(i: int) -> str:
    return f"member{i}."


def _load_member(files: dict[str, Path], i: int, record: dict, scratch: Path) -> PatchCore:
    """Member i from the (already verified) ensemble files: its files copied to scratch under their own
    names, loaded by PatchCore.load (which checks them against the member's manifest again)."""
    prefix = member_prefix(i)
    own = {name[len(prefix):]: path for name, path in files.items() if name.startswith(prefix)}
    if MANIFEST not in own:
        raise ArtifactError(f"{files['metadata.json'].parent / (prefix + MANIFEST)}: missing from the saved model")
    folder = scratch / f"member{i}"
    folder.mkdir()
    for name, path in own.items():
        shutil.copyfile(path, folder / name)
    member = PatchCore.load(folder)
    if member.cfg.backbone.name != record.get("backbone"):
        raise ArtifactError(f"{files['metadata.json']}: member {i} is {member.cfg.backbone.name!r}, "
                            f"metadata says {record.get('backbone')!r}")
    return member


def combined_weights(members: list[tuple[str, WeightsInfo]]) -> WeightsInfo:
    """One lineage record for all members' weights: sha256 over (backbone, weights sha256) in order."""
    digest = hashlib.sha256("\n".join(f"{name} {info.sha256}" for name, info in members).encode()).hexdigest()
    return WeightsInfo("ensemble", ",".join(f"{name}:{info.source}" for name, info in members), digest)
