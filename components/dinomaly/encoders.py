"""Build Dinomaly's frozen encoder with its weights, and rebuild it from a saved model.

ViT (the paper's encoder, e.g. vit_base_patch14_reg4_dinov2): weights from `vit_weights_file` (timm or
original DINOv2 key names, safetensors or a .pth read with weights_only; converted by timm's own
checkpoint filter, position embedding resampled), from the hub only when `backbone.allow_network`, or
seeded random (tests). CNN variant: the offline ImageNet CNN of the `backbone` section
(components.backbones), its `cnn_layers` stages as token layers.
"""

from __future__ import annotations

import logging
from pathlib import Path

import timm
import torch
from torch import nn

from components.backbones import FeatureExtractor, WeightsError, WeightsInfo, build_extractor
from components.checkpoints import cpu_state
from components.config import BackboneConfig
from components.dinomaly.config import DinomalyConfig
from components.dinomaly.model import CNNTokenEncoder, ViTEncoder
from components.vit import create_vit, vit_normalisation, vit_with_weights

logger = logging.getLogger(__name__)
Encoder = ViTEncoder | CNNTokenEncoder
PROJECTION = "embedding.projection"  # saved state keys of the cnn-variant's "shared" embedding


def build_encoder(params: DinomalyConfig, backbone: BackboneConfig) -> tuple[Encoder, WeightsInfo]:
    """The frozen, eval-mode encoder named by `params.encoder`, and where its weights came from."""
    if params.encoder == "cnn-variant":
        extractor, info = build_extractor(backbone.model_copy(update={"layers": tuple(params.cnn_layers)}))
        encoder = CNNTokenEncoder(extractor, params.cnn_token_level, params.cnn_normalize_levels,
                                  params.cnn_embedding)
        logger.info("dinomaly encoder: cnn-variant (%s stages %s, NOT the paper's ViT encoder)",
                    backbone.name, list(params.cnn_layers))
    else:
        vit, info = _vit_with_weights(params, backbone.allow_network)
        encoder = _wrap_vit(vit, params.target_layers, params.vit_prefix_tokens == "decode")
        logger.info("dinomaly encoder: %s layers %s from %s (%s…)", params.vit_name, list(params.target_layers),
                    info.source, info.sha256[:12])
    return encoder.eval(), info


def encoder_description(encoder: Encoder, params: DinomalyConfig, backbone: BackboneConfig,
                        info: WeightsInfo) -> dict:
    """JSON metadata from which `rebuild_encoder` recreates the architecture (weights come from the state)."""
    common = {"kind": encoder.kind, **info.as_record(), "embed_dim": encoder.embed_dim}
    if isinstance(encoder, ViTEncoder):
        return {**common, "name": params.vit_name, "layers": list(encoder.layers),
                "mean": encoder.mean.flatten().tolist(), "std": encoder.std.flatten().tolist(),
                "keep_prefix": encoder.keep_prefix}
    return {**common, "name": backbone.name, "layers": list(params.cnn_layers),
            "token_level": encoder.token_level, "normalize": encoder.normalize, "embedding": encoder.embedding,
            "mean": encoder.extractor.mean.flatten().tolist(), "std": encoder.extractor.std.flatten().tolist()}


def encoder_state(encoder: Encoder) -> dict[str, torch.Tensor]:
    """The frozen weights to save (the ViT pruned after its last target layer, or the CNN body and, for the
    "shared" embedding, its projections as `embedding.projection<i>`)."""
    if isinstance(encoder, ViTEncoder):
        return cpu_state(encoder.vit)
    state = cpu_state(encoder.extractor.body)
    state.update({f"{PROJECTION}{i}": m.detach().cpu().contiguous() for i, m in enumerate(encoder.projections())})
    return state


def rebuild_encoder(desc: dict, state: dict[str, torch.Tensor], origin: Path) -> Encoder:
    """Inverse of encoder_description + encoder_state; every tensor must fit (strict load)."""
    try:
        if desc["kind"] == "vit":
            vit = create_vit(desc["name"])
            vit.prune_intermediate_layers(indices=list(desc["layers"]), prune_norm=True, prune_head=True)
            vit.load_state_dict(state, strict=True)
            encoder = ViTEncoder(vit, tuple(desc["layers"]), tuple(desc["mean"]), tuple(desc["std"]),
                                 bool(desc.get("keep_prefix", False)))
        else:
            body = timm.create_model(desc["name"], pretrained=False, features_only=True,
                                     out_indices=tuple(desc["layers"]))
            projections = [state[k] for k in sorted((k for k in state if k.startswith(PROJECTION)),
                                                    key=lambda k: int(k[len(PROJECTION):]))]
            body.load_state_dict({k: v for k, v in state.items() if not k.startswith(PROJECTION)}, strict=True)
            extractor = FeatureExtractor(body, tuple(desc["mean"]), tuple(desc["std"]))
            embedding = desc.get("embedding", "blocks")  # models saved before the option: blocks
            encoder = CNNTokenEncoder(extractor, int(desc["token_level"]), bool(desc["normalize"]), embedding,
                                      projections if embedding == "shared" else None)
    except (KeyError, RuntimeError, ValueError) as exc:
        raise WeightsError(f"{origin}: cannot rebuild the dinomaly encoder ({type(exc).__name__}: {exc})") from None
    for param in encoder.parameters():
        param.requires_grad_(False)
    return encoder.eval()


# -------------------------------------------------------------------------------------------- ViT
def _wrap_vit(vit: nn.Module, layers: tuple[int, ...], keep_prefix: bool = False) -> ViTEncoder:
    if not hasattr(vit, "forward_intermediates") or not hasattr(vit, "blocks"):
        raise WeightsError(f"{type(vit).__name__} is not a timm VisionTransformer")
    if max(layers) >= len(vit.blocks):
        raise WeightsError(f"target_layers {list(layers)} exceed the ViT's {len(vit.blocks)} blocks")
    vit.prune_intermediate_layers(indices=list(layers), prune_norm=True, prune_head=True)
    mean, std = vit_normalisation(vit)
    encoder = ViTEncoder(vit, tuple(layers), mean, std, keep_prefix)
    for param in encoder.parameters():
        param.requires_grad_(False)
    return encoder


def _vit_with_weights(params: DinomalyConfig, allow_network: bool) -> tuple[nn.Module, WeightsInfo]:
    return vit_with_weights(params.vit_name, params.vit_weights, params.vit_weights_file, allow_network,
                            "detector.dinomaly", "DINOv2 checkpoint, timm or original key names",
                            prune_to=tuple(params.target_layers))
