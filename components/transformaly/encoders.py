"""Build Transformaly's frozen teacher with its weights, and rebuild it from a saved model.

ViT (the paper's teacher, e.g. vit_base_patch16_384): weights from `vit_weights_file` (timm key names or ones
timm's checkpoint filter converts; safetensors or a .pth read with weights_only), from the hub only when
`backbone.allow_network`, or seeded random (tests). CNN variant: the whole offline ImageNet classifier of the
`backbone` section (components.backbones: packaged, file or hub weights).
"""

from __future__ import annotations

import logging
from pathlib import Path

import timm
import torch
from torch import nn

from components.backbones import WeightsError, WeightsInfo, build_classifier
from components.checkpoints import cpu_state
from components.config import BackboneConfig
from components.transformaly.config import TransformalyConfig
from components.transformaly.model import Teacher
from components.vit import create_vit, vit_normalisation, vit_with_weights

logger = logging.getLogger(__name__)


def build_teacher(params: TransformalyConfig, backbone: BackboneConfig) -> tuple[Teacher, str, WeightsInfo]:
    """The frozen, eval-mode teacher named by `params.encoder`, its timm name, and where its weights came from."""
    if params.encoder == "cnn-variant":
        model, info, mean, std = build_classifier(backbone)
        name = backbone.name
        logger.info("transformaly teacher: cnn-variant %s blocks %s (NOT the paper's ViT)", name,
                    list(params.cnn_blocks))
    else:
        model, info = _vit_with_weights(params, backbone.allow_network)
        mean, std = vit_normalisation(model)
        name = params.vit_name
        logger.info("transformaly teacher: %s blocks %s from %s (%s…)", name, list(params.vit_blocks), info.source,
                    info.sha256[:12])
    return Teacher(model, mean, std), name, info


def teacher_description(teacher: Teacher, name: str, info: WeightsInfo) -> dict:
    """JSON metadata from which `rebuild_teacher` recreates the architecture (weights come from the state)."""
    return {"kind": teacher.kind, "name": name, **info.as_record(), "mean": teacher.mean.flatten().tolist(),
            "std": teacher.std.flatten().tolist()}


def teacher_state(teacher: Teacher) -> dict[str, torch.Tensor]:
    return cpu_state(teacher.model)


def rebuild_teacher(desc: dict, state: dict[str, torch.Tensor], origin: Path) -> Teacher:
    """Inverse of teacher_description + teacher_state; every tensor must fit (strict load)."""
    try:
        if desc["kind"] == "vit":
            model = create_vit(desc["name"])
        else:
            model = timm.create_model(desc["name"], pretrained=False)
        model.load_state_dict(state, strict=True)
        return Teacher(model.eval(), tuple(desc["mean"]), tuple(desc["std"]))
    except (KeyError, RuntimeError, ValueError) as exc:
        raise WeightsError(f"{origin}: cannot rebuild the transformaly teacher ({type(exc).__name__}: {exc})") \
            from None


def _vit_with_weights(params: TransformalyConfig, allow_network: bool) -> tuple[nn.Module, WeightsInfo]:
    return vit_with_weights(params.vit_name, params.vit_weights, params.vit_weights_file, allow_network,
                            "detector.transformaly", "an ImageNet ViT checkpoint")
