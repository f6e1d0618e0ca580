"""timm Vision Transformers with offline weights, for the methods whose paper uses a ViT (Dinomaly's encoder,
Transformaly's teacher).

Weights come from a file (`vit_weights_file`: timm or original key names, e.g. DINOv2's, safetensors or a .pth
read with weights_only, converted by timm's own checkpoint filter), from the hub only when the network is
allowed, or seeded random (tests). No pretrained download ever happens implicitly.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import timm
import torch
from torch import nn

from components.backbones import (
    RANDOM_INIT_SEED,
    WeightsError,
    WeightsInfo,
    read_state_dict,
    sha256_of,
    state_digest,
)

logger = logging.getLogger(__name__)


def create_vit(name: str, pretrained: bool = False) -> nn.Module:
    """The timm ViT `name` without classifier head, accepting any image size (dynamic_img_size)."""
    if not pretrained and not timm.is_model(name):
        raise WeightsError(f"unknown ViT {name!r}: not a timm model name (e.g. vit_base_patch14_reg4_dinov2)")
    return timm.create_model(name, pretrained=pretrained, dynamic_img_size=True, num_classes=0)


def vit_normalisation(vit: nn.Module) -> tuple[tuple, tuple]:
    """(mean, std) the ViT's pretrained config asks for; ImageNet's when it names none."""
    cfg = getattr(vit, "pretrained_cfg", None) or {}
    return tuple(cfg.get("mean", (0.485, 0.456, 0.406))), tuple(cfg.get("std", (0.229, 0.224, 0.225)))


def vit_with_weights(name: str, weights: str, weights_file: Path | None, allow_network: bool, section: str,
                     file_hint: str, prune_to: tuple[int, ...] | None = None) -> tuple[nn.Module, WeightsInfo]:
    """The eval-mode ViT `name` with its weights, and where they came from.

    weights: "auto" (the file if given, else the hub when allow_network), "file", "hub" or "random" (seeded).
    section ("detector.dinomaly") and file_hint (what file to give) make the error when there is none.
    prune_to: layer indices; with a file, the ViT is pruned after the last one before loading (the file then
    needs only those blocks, e.g. a saved encoder).
    """
    source = weights
    if source == "auto":
        source = "file" if weights_file is not None else ("hub" if allow_network else None)
    if source is None:
        raise WeightsError(
            f"no offline weights for {name!r}: give {section}.vit_weights_file ({file_hint}), set "
            f"backbone.allow_network=true to use the hub, or use {section}.encoder=cnn-variant with a packaged CNN")
    if source == "hub":
        if not allow_network:
            raise WeightsError(f"vit_weights: hub for {name!r} needs backbone.allow_network=true")
        os.environ.pop("HF_HUB_OFFLINE", None)
        vit = create_vit(name, pretrained=True)
        return vit.eval(), WeightsInfo("hub", f"timm:{name}", state_digest(vit))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(RANDOM_INIT_SEED)
        vit = create_vit(name)
    if source == "random":
        return vit.eval(), WeightsInfo("random", "random-init", state_digest(vit))
    path = Path(weights_file)
    if prune_to is not None:
        vit.prune_intermediate_layers(indices=list(prune_to), prune_norm=True, prune_head=True)
    load_vit_file(vit, path)
    return vit.eval(), WeightsInfo("file", str(path), sha256_of(path))


def load_vit_file(vit: nn.Module, path: Path) -> None:
    """Load a ViT checkpoint file into `vit` (converted by timm's filter); every tensor of vit must be there
    with its shape (WeightsError naming the file otherwise); extra tensors are logged and ignored."""
    from timm.models.vision_transformer import checkpoint_filter_fn

    state = read_state_dict(path)
    try:
        state = checkpoint_filter_fn(state, vit)
    except Exception as exc:  # timm's converter raises assorted errors on foreign checkpoints
        raise WeightsError(f"{path}: not a ViT checkpoint timm can convert ({type(exc).__name__}: {exc})") from None
    own = vit.state_dict()
    missing = sorted(set(own) - set(state))
    if missing:
        raise WeightsError(f"{path}: lacks {len(missing)} ViT tensors, e.g. {missing[:3]}")
    for key in own:
        if state[key].shape != own[key].shape:
            raise WeightsError(f"{path}: {key} {tuple(state[key].shape)} != {tuple(own[key].shape)}")
    unused = sorted(set(state) - set(own))
    if unused:
        logger.info("%s: %d tensors not used by the encoder (e.g. %s)", path, len(unused), unused[:3])
    vit.load_state_dict({k: state[k] for k in own}, strict=True)
