"""The teacher: one patch descriptor network per patch size, distilled from a pretrained backbone.

Data (offline stand-in for the paper's 500 000 ImageNet patches): the natural photographs bundled inside
scikit-image (`NATURAL_IMAGES`, read from the installed package, never downloaded). Each patch is a random
square region (side log-uniform between the patch size and 4x it, capped by the image), randomly flipped,
resized to (p + 2 shift) px; the anchor is its centre p x p, the triplet positive the same region shifted
by up to `positive_shift` px plus Gaussian noise (`positive_noise`), the negative another patch of the batch.
Distillation target: the backbone's pooled last feature (timm `forward_head(pre_logits=True)`) of the
anchor resized to `distill_size` px, standardised per dimension over the pool; the decoder is one linear
layer from the descriptor to that feature (as the paper's fully connected decoder).

Image source (`teacher_source`): "skimage" (the default, above), "line" (the fit's own good images, as
given to fit), "folder" (every image in `teacher_folder`, read with PIL, longer side at most MAX_SIDE) or
"mix" (skimage + line, + the folder when given; patches are drawn from a uniformly chosen image, so each
source weighs by its image count). Compactness: `compactness` "sum" (the paper's, default) or "squared".

The teacher is trained once per (teacher hyperparameters, backbone name, backbone weights sha256, image
source and a sha256 of its images when not the default) and cached under `<cache_root>/<digest>/`
(safetensors + JSON, written atomically, sha256-checked on load). A "line" teacher is keyed by the line's
images, so every line (and every change of its images) trains its own.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from components.backbones import WeightsInfo, build_classifier
from components.config import BackboneConfig
from components.detector import (
    ArtifactError,
    ProgressFn,
    model_stats,
    read_manifest,
    verified_files,
    write_model_dir,
)
from components.students.config import StudentsConfig
from components.students.losses import compactness_loss, distillation_loss, triplet_loss
from components.students.networks import build_nets

logger = logging.getLogger(__name__)

TEACHER_METHOD = "students-teacher"
DATA_VERSION = "skimage-natural-v1"
MAX_SIDE = 512
NATURAL_IMAGES = ("astronaut", "camera", "coffee", "chelsea", "rocket", "coins", "brick", "grass", "gravel",
                  "immunohistochemistry", "hubble_deep_field", "retina", "moon", "clock", "cell", "text",
                  "page", "colorwheel")


@dataclass
class Teacher:
    """The trained teacher networks (keyed "p<size>") and where they came from."""

    nets: nn.ModuleDict
    digest: str
    backbone: str
    weights: WeightsInfo
    stats: dict[str, float] = field(default_factory=dict)
    source: str = "skimage"

    def state(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().cpu().contiguous() for k, v in self.nets.state_dict().items()}

    def description(self) -> dict:
        return {"digest": self.digest, "backbone": self.backbone, **self.weights.as_record(),
                "data": DATA_VERSION if self.source == "skimage" else f"teacher_source:{self.source}",
                "source": self.source, "stats": model_stats(self.stats)}  # no timings: models stay content-equal


def teacher_digest(params: StudentsConfig, backbone: str, weights_sha256: str, images_key: str | None = None) -> str:
    """Cache key: sha256 of the teacher hyperparameters, the backbone's name and weights, the data version,
    and `images_key` (see `source_key`; None for the default skimage source: the key from before it)."""
    payload = {"teacher": params.teacher_fields(), "backbone": backbone, "weights": weights_sha256,
               "data": DATA_VERSION, "images": list(NATURAL_IMAGES)}
    if images_key is not None:
        payload["source_images"] = images_key
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


FOLDER_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")


def folder_files(folder: Path) -> list[Path]:
    """The image files directly inside `folder`, sorted (ValueError when there are none)."""
    files = sorted(f for f in Path(folder).iterdir() if f.suffix.lower() in FOLDER_SUFFIXES and f.is_file())
    if not files:
        raise ValueError(f"teacher_folder {folder}: no images ({', '.join(FOLDER_SUFFIXES)})")
    return files


def folder_images(folder: Path) -> list[torch.Tensor]:
    """The images of `folder` as (3, H, W) float tensors in [0, 1], longer side at most MAX_SIDE px."""
    from PIL import Image

    out = []
    for f in folder_files(folder):
        with Image.open(f) as im:
            array = np.array(im.convert("RGB"))
        out.append(_limited(torch.from_numpy(np.ascontiguousarray(array)).permute(2, 0, 1).float() / 255.0))
    return out


def source_key(params: StudentsConfig, line_images: torch.Tensor | None) -> str | None:
    """What the teacher's images add to its cache key: None for "skimage"; else a sha256 of the line's image
    tensor and/or the folder's file names and bytes."""
    if params.teacher_source == "skimage":
        return None
    digest = hashlib.sha256(params.teacher_source.encode())
    if params.teacher_source in ("line", "mix"):
        if line_images is None:
            raise ValueError(f"teacher_source {params.teacher_source!r} needs the line's good images")
        digest.update(line_images.detach().to(torch.float32).cpu().contiguous().numpy().tobytes())
    if params.teacher_folder is not None and params.teacher_source in ("folder", "mix"):
        for f in folder_files(params.teacher_folder):
            digest.update(f.name.encode() + hashlib.sha256(f.read_bytes()).digest())
    return digest.hexdigest()


def teacher_images(params: StudentsConfig, line_images: torch.Tensor | None) -> list[torch.Tensor]:
    """The images the teacher's patches come from, per `teacher_source` (see module docstring)."""
    source, out = params.teacher_source, []
    if source in ("skimage", "mix"):
        out += natural_images()
    if source in ("line", "mix"):
        if line_images is None:
            raise ValueError(f"teacher_source {source!r} needs the line's good images")
        out += [_limited(x.detach().to(torch.float32).cpu()) for x in line_images]
    if params.teacher_folder is not None and source in ("folder", "mix"):
        out += folder_images(params.teacher_folder)
    return out


def _limited(tensor: torch.Tensor) -> torch.Tensor:
    """(3, H, W) -> the same, longer side at most MAX_SIDE px, clamped to [0, 1]."""
    scale = MAX_SIDE / max(tensor.shape[-2:])
    if scale < 1:
        tensor = F.interpolate(tensor[None], scale_factor=scale, mode="bilinear", antialias=True)[0]
    return tensor.clamp(0, 1)


def natural_images() -> list[torch.Tensor]:
    """The bundled scikit-image photographs as (3, H, W) float tensors in [0, 1] (grey replicated, longer
    side at most MAX_SIDE px)."""
    from skimage import data

    out = []
    for name in NATURAL_IMAGES:
        image = np.asarray(getattr(data, name)())
        if image.ndim == 2:
            image = np.repeat(image[..., None], 3, axis=2)
        tensor = torch.from_numpy(np.ascontiguousarray(image[..., :3])).permute(2, 0, 1).float() / 255.0
        out.append(_limited(tensor))  # the few large photographs: industrial inputs are ~256 px
    return out


def sample_patch_pool(images: list[torch.Tensor], patch_size: int, count: int, shift: int, noise: float,
                      generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """`count` (anchor, positive) patch pairs from `images`. -> two (count, 3, p, p) float tensors."""
    side = patch_size + 2 * shift
    anchors, positives = [], []
    for _ in range(count):
        image = images[int(torch.randint(len(images), (1,), generator=generator))]
        h, w = image.shape[-2:]
        hi = min(4 * side, h, w)
        region = int(round(side * (hi / side) ** float(torch.rand(1, generator=generator)))) if hi > side else hi
        top = int(torch.randint(h - region + 1, (1,), generator=generator))
        left = int(torch.randint(w - region + 1, (1,), generator=generator))
        crop = image[:, top:top + region, left:left + region].unsqueeze(0)
        crop = F.interpolate(crop, size=(side, side), mode="bilinear", antialias=True, align_corners=False)[0]
        if float(torch.rand(1, generator=generator)) < 0.5:
            crop = crop.flip(-1)
        dy, dx = (torch.randint(2 * shift + 1, (2,), generator=generator) - shift).tolist() if shift else (0, 0)
        anchors.append(crop[:, shift:shift + patch_size, shift:shift + patch_size])
        pos = crop[:, shift + dy:shift + dy + patch_size, shift + dx:shift + dx + patch_size]
        positives.append(pos + noise * torch.randn(pos.shape, generator=generator))
    return torch.stack(anchors), torch.stack(positives).clamp(0, 1)


@torch.no_grad()
def backbone_targets(classifier: nn.Module, mean: tuple, std: tuple, patches: torch.Tensor, size: int,
                     device: torch.device, chunk: int = 128) -> torch.Tensor:
    """Pooled pre-logit features of each patch resized to size x size, standardised per dimension over the
    pool. patches (N, 3, p, p) -> (N, F)."""
    m = torch.tensor(mean, device=device).view(1, 3, 1, 1)
    s = torch.tensor(std, device=device).view(1, 3, 1, 1)
    feats = []
    for start in range(0, patches.shape[0], chunk):
        x = patches[start:start + chunk].to(device)
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
        feats.append(classifier.forward_head(classifier.forward_features((x - m) / s), pre_logits=True).flatten(1))
    out = torch.cat(feats)
    return (out - out.mean(dim=0)) / out.std(dim=0).clamp_min(1e-6)


def train_scale(net: nn.Module, anchors: torch.Tensor, positives: torch.Tensor, targets: torch.Tensor,
                params: StudentsConfig, device: torch.device, generator: torch.Generator,
                on_step=None) -> dict[str, float]:
    """Train one teacher net (and a throw-away linear decoder) with L = wk L_k + wm L_m + wc L_c.

    anchors, positives (N, 3, p, p), targets (N, F). Returns the last step's losses."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(params.teacher_seed + net.patch_size)
        decoder = nn.Linear(params.descriptor_dim, targets.shape[1]).to(device)
    opt = torch.optim.Adam([*net.parameters(), *decoder.parameters()], lr=params.teacher_lr,
                           weight_decay=params.teacher_weight_decay)
    batch = min(params.teacher_batch_size, anchors.shape[0])
    net.train()
    for step in range(params.teacher_iterations):
        idx = torch.randperm(anchors.shape[0], generator=generator)[:batch]
        x = torch.cat([anchors[idx], positives[idx]]).to(device)
        desc = net(x).flatten(1)
        a, p = desc[:batch], desc[batch:]
        losses = {"distill": distillation_loss(decoder(a), targets[idx].to(device)),
                  "triplet": triplet_loss(a, p, a.roll(1, dims=0), params.triplet_margin),
                  "compact": compactness_loss(a, params.compactness)}
        loss = (params.weight_distill * losses["distill"] + params.weight_triplet * losses["triplet"]
                + params.weight_compact * losses["compact"])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if on_step is not None:
            on_step(step + 1)
    net.eval()
    return {"loss": float(loss.detach()), **{k: float(v.detach()) for k, v in losses.items()}}


def train_teacher(params: StudentsConfig, backbone: BackboneConfig, device: torch.device,
                  progress: ProgressFn | None = None, line_images: torch.Tensor | None = None) -> Teacher:
    """Distil one PatchNet per patch size from the backbone (deterministic for a given teacher_seed) on the
    images of `teacher_source` (line_images (N, 3, H, W): the fit's good images, for "line" / "mix")."""
    t0 = time.perf_counter()
    classifier, info, mean, std = build_classifier(backbone)
    classifier = classifier.to(device).eval()
    images = teacher_images(params, line_images)
    nets = build_nets(params.patch_sizes, params.channels, params.descriptor_dim, params.leaky_slope,
                      params.teacher_seed, params.dense_stride).to(device)
    generator = torch.Generator().manual_seed(params.teacher_seed)
    stats: dict[str, float] = {}
    total = params.teacher_iterations * len(params.patch_sizes)
    for s, p in enumerate(params.patch_sizes):
        anchors, positives = sample_patch_pool(images, p, params.teacher_patches, params.positive_shift,
                                               params.positive_noise, generator)
        targets = backbone_targets(classifier, mean, std, anchors, params.distill_size, device)
        on_step = (lambda done, s=s: progress("teacher", s * params.teacher_iterations + done, total)) \
            if progress else None
        last = train_scale(nets[f"p{p}"], anchors, positives, targets, params, device, generator, on_step)
        stats.update({f"p{p}_{k}": v for k, v in last.items()})
        logger.info("students teacher p=%d: final loss %.4f (%s)", p, last["loss"],
                    ", ".join(f"{k} {v:.4f}" for k, v in last.items() if k != "loss"))
    for param in nets.parameters():
        param.requires_grad_(False)
    stats["train_s"] = time.perf_counter() - t0
    digest = teacher_digest(params, backbone.name, info.sha256, source_key(params, line_images))
    return Teacher(nets.eval(), digest, backbone.name, info, stats, params.teacher_source)


# -------------------------------------------------------------------------------------------- cache
def save_teacher(teacher: Teacher, directory: Path) -> Path:
    """Write the teacher (atomically, sha256 manifest) to `directory`."""
    state, desc = teacher.state(), teacher.description()
    return write_model_dir(directory, TEACHER_METHOD, {
        "teacher.safetensors": lambda p: save_file(state, str(p)),
        "teacher.json": lambda p: p.write_text(json.dumps(desc, indent=2, sort_keys=True))})


def teacher_from_state(params: StudentsConfig, state: dict[str, torch.Tensor], desc: dict, origin: Path) -> Teacher:
    """Rebuild a Teacher from saved tensors and its description; ArtifactError names `origin` on mismatch."""
    nets = build_nets(params.patch_sizes, params.channels, params.descriptor_dim, params.leaky_slope, 0,
                      params.dense_stride)
    try:
        nets.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise ArtifactError(f"{origin}: does not fit the configured teacher ({exc})") from None
    for param in nets.parameters():
        param.requires_grad_(False)
    weights = WeightsInfo.from_record(desc)
    return Teacher(nets.eval(), desc["digest"], desc["backbone"], weights, desc.get("stats", {}),
                   desc.get("source", "skimage"))


def load_teacher(params: StudentsConfig, directory: Path) -> Teacher:
    files = verified_files(directory, TEACHER_METHOD)
    for name in ("teacher.safetensors", "teacher.json"):
        if name not in files:
            raise ArtifactError(f"{directory / name}: missing from the cached teacher")
    desc = json.loads(files["teacher.json"].read_text())
    return teacher_from_state(params, load_file(str(files["teacher.safetensors"])), desc,
                              files["teacher.safetensors"])


def cached_or_trained_teacher(params: StudentsConfig, backbone: BackboneConfig, cache_root: Path | None,
                              device: torch.device, progress: ProgressFn | None = None,
                              line_images: torch.Tensor | None = None) -> tuple[Teacher, bool]:
    """The teacher for these settings (and, for teacher_source line / mix, these good images (N, 3, H, W)):
    from `cache_root/<digest>` when cached there, else trained (and then cached when cache_root is given; a
    damaged cache entry is retrained and replaced). -> (teacher, reused)."""
    if cache_root is not None:
        _classifier, info, _m, _s = build_classifier(backbone)  # cheap: resolves the weights' sha256
        directory = Path(cache_root) / teacher_digest(params, backbone.name, info.sha256,
                                                      source_key(params, line_images))
        if (directory / "manifest.json").is_file():
            try:
                if read_manifest(directory).get("method") != TEACHER_METHOD:
                    raise ArtifactError(f"{directory}: not a cached students teacher")
                teacher = load_teacher(params, directory)
                logger.info("students: reusing the cached teacher %s", directory)
                return teacher, True
            except ArtifactError as exc:  # a damaged cache entry is rebuilt, not fatal
                logger.warning("students: cached teacher unusable (%s); training it again", exc)
    teacher = train_teacher(params, backbone, device, progress, line_images)
    if cache_root is not None:
        save_teacher(teacher, Path(cache_root) / teacher.digest)
        logger.info("students: teacher cached in %s", Path(cache_root) / teacher.digest)
    return teacher, False
