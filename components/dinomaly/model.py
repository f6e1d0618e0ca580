"""Dinomaly's torch modules: token encoders (frozen), noisy bottleneck, linear-attention decoder, the net.

Shapes: B images, N tokens on an (h, w) grid, D channels. Every module returns the same type in train
and eval mode; dropout is the only train/eval difference (the noisy bottleneck).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from components.backbones import FeatureExtractor
from components.dinomaly.config import split_groups

LAYER_NORM_EPS = 1e-8  # the reference decoder's LayerNorm epsilon


# ------------------------------------------------------------------------------------------- encoders
class TokenLayers(NamedTuple):
    """Encoder output: `layers` is a list of L tensors (B, P + N, D), P prefix (CLS/register) tokens first
    (P = 0 unless the ViT encoder keeps them); grid (h, w), h*w = N."""

    layers: list[torch.Tensor]
    grid: tuple[int, int]


class ViTEncoder(nn.Module):
    """Frozen timm ViT (DINOv2 names, register tokens supported) -> its `layers`' patch tokens.

    forward: images (B, 3, H, W) in [0, 1] -> TokenLayers with L = len(layers), D = embed_dim. Images are
    resized (bilinear) to the largest multiple of the patch size not above H, W when they are not one;
    the ViT runs with dynamic_img_size so its position embedding is interpolated to the grid.
    """

    kind = "vit"

    def __init__(self, vit: nn.Module, layers: tuple[int, ...], mean: tuple, std: tuple,
                 keep_prefix: bool = False) -> None:
        super().__init__()
        self.vit = vit
        self.layers = tuple(int(i) for i in layers)
        self.keep_prefix = keep_prefix  # True: CLS/register tokens kept in front (the official ViTill)
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1))
        self.embed_dim = int(vit.embed_dim)
        self.num_heads = int(vit.blocks[0].attn.num_heads)
        self.patch_size = int(vit.patch_embed.patch_size[0])

    def input_size(self, size: tuple[int, int]) -> tuple[int, int]:
        p = self.patch_size
        return max(p, size[0] // p * p), max(p, size[1] // p * p)

    def forward(self, images: torch.Tensor) -> TokenLayers:
        size = self.input_size(tuple(images.shape[-2:]))
        if size != tuple(images.shape[-2:]):
            images = F.interpolate(images, size=size, mode="bilinear", align_corners=False)
        x = (images - self.mean) / self.std
        layers = self.vit.forward_intermediates(x, indices=list(self.layers), output_fmt="NLC",
                                                intermediates_only=True, stop_early=True,
                                                return_prefix_tokens=self.keep_prefix)
        if self.keep_prefix:  # (patch tokens, prefix tokens) per layer -> prefix first, as the ViT holds them
            layers = [torch.cat([prefix, patches], dim=1) for patches, prefix in layers]
        return TokenLayers(list(layers), (size[0] // self.patch_size, size[1] // self.patch_size))


class CNNTokenEncoder(nn.Module):
    """Variant: an ImageNet CNN's intermediate stages flattened into tokens (not the paper's encoder).

    forward: images (B, 3, H, W) in [0, 1] -> TokenLayers with one layer per CNN stage, on the grid of
    stage `token_level` (finer stages area-averaged down, coarser ones bilinearly up). Each stage (C_l
    channels, L2-normalised per token when `normalize`) is embedded in a common space of D channels.
    embedding "blocks" (default): its own channel block of D = sum C_l, zeros elsewhere: a stage's token keeps
    its own cosine geometry, but the mean over stages is their (scaled) concatenation, so a group "mean" loses
    nothing and the loose constraint is not loose on the encoder side. embedding "shared" (the paper's
    overlapping groups, declared equivalent): every stage is mapped into the same D = max C_l channels by a
    fixed, seeded isometry (a D x C_l matrix with orthonormal columns, `projections`): each stage keeps its
    cosine geometry exactly, and a group mean mixes its stages in shared dimensions as a ViT's layers do in its
    residual stream.
    """

    kind = "cnn-variant"

    def __init__(self, extractor: FeatureExtractor, token_level: int, normalize: bool = True,
                 embedding: str = "blocks", projections: list[torch.Tensor] | None = None) -> None:
        super().__init__()
        self.extractor = extractor
        self.token_level = token_level
        self.normalize = normalize
        self.channels = list(extractor.channels)
        self.embedding = embedding
        if embedding == "blocks":
            self.embed_dim = sum(self.channels)
        elif embedding == "shared":
            self.embed_dim = max(self.channels)
            mats = projections if projections is not None else isometries(self.channels, self.embed_dim)
            for i, m in enumerate(mats):
                self.register_buffer(f"projection{i}", m.float())
        else:
            raise ValueError(f"cnn embedding {embedding!r}: expected 'blocks' or 'shared'")
        self.num_heads = None

    def forward(self, images: torch.Tensor) -> TokenLayers:
        stages = self.extractor(images)
        grid = tuple(stages[self.token_level].shape[-2:])
        b, d = images.shape[0], self.embed_dim
        out, start = [], 0
        for f in stages:
            if tuple(f.shape[-2:]) != grid:
                finer = f.shape[-2] >= grid[0] and f.shape[-1] >= grid[1]
                f = F.adaptive_avg_pool2d(f, grid) if finer else \
                    F.interpolate(f, size=grid, mode="bilinear", align_corners=False)
            if self.normalize:
                f = F.normalize(f, dim=1)
            if self.embedding == "shared":  # (B, C_l, h, w) -> (B, N, D) through the stage's isometry
                out.append(f.flatten(2).transpose(1, 2) @ self.projections()[len(out)].T)
                continue
            tokens = f.new_zeros(b, d, *grid)
            tokens[:, start:start + f.shape[1]] = f
            start += f.shape[1]
            out.append(tokens.flatten(2).transpose(1, 2))
        return TokenLayers(out, grid)

    def projections(self) -> list[torch.Tensor]:
        """embedding "shared": the (D, C_l) isometry of each stage ([] for "blocks")."""
        return [getattr(self, f"projection{i}") for i in range(len(self.channels))] \
            if self.embedding == "shared" else []


def isometries(channels: list[int], dim: int, seed: int = 0) -> list[torch.Tensor]:
    """One (dim, C) matrix with orthonormal columns per C in channels (C <= dim), seeded (QR of a Gaussian,
    signs fixed by R's diagonal): x -> M @ x keeps lengths and angles."""
    generator = torch.Generator().manual_seed(seed)
    out = []
    for c in channels:
        q, r = torch.linalg.qr(torch.randn(dim, c, generator=generator, dtype=torch.float64))
        out.append((q * torch.sign(torch.diagonal(r))).float())
    return out


# --------------------------------------------------------------------------------- bottleneck, decoder
class NoisyBottleneck(nn.Module):
    """MLP with dropout on its input, hidden and output, kept active in training (the 'noise').

    forward: (B, N, D) -> (B, N, D).
    """

    def __init__(self, dim: int, hidden: int, dropout: float) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc2(self.drop(self.act(self.fc1(self.drop(x))))))


def elu_feature_map(x: torch.Tensor) -> torch.Tensor:
    """phi(x) = elu(x) + 1 > 0."""
    return F.elu(x) + 1.0


def linear_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Linear attention: row n = phi(q_n) (sum_m phi(k_m)^T v_m) / (phi(q_n) . sum_m phi(k_m)).

    q, k, v (..., N, d) -> (..., N, d). Cost O(N d^2), never forming the (N, N) attention matrix.
    """
    q, k = elu_feature_map(q), elu_feature_map(k)
    kv = k.transpose(-2, -1) @ v  # (..., d, d)
    normaliser = q @ k.sum(dim=-2).unsqueeze(-1)  # (..., N, 1)
    return (q @ kv) / normaliser


class LinearAttention(nn.Module):
    """Multi-head linear attention. forward: (B, N, D) -> (B, N, D)."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"decoder dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=True)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, d // self.num_heads).permute(2, 0, 3, 1, 4)
        out = linear_attention(qkv[0], qkv[1], qkv[2])  # (B, heads, N, d_head)
        return self.proj(out.transpose(1, 2).reshape(b, n, d))


class DecoderBlock(nn.Module):
    """Pre-norm transformer block with linear attention. forward: (B, N, D) -> (B, N, D)."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float) -> None:
        super().__init__()
        hidden = int(dim * mlp_ratio)
        self.norm1 = nn.LayerNorm(dim, eps=LAYER_NORM_EPS)
        self.attn = LinearAttention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=LAYER_NORM_EPS)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


def auto_heads(dim: int) -> int:
    """dim // 64 heads (ViT-S 6, ViT-B 12, ViT-L 16), lowered until it divides dim; at least 1."""
    heads = max(1, dim // 64)
    while dim % heads:
        heads -= 1
    return heads


# -------------------------------------------------------------------------------------------------- net
class GroupFeatures(NamedTuple):
    """Per group g: encoder[g] and decoder[g] are (B, D, h, w) group means (the loose constraint)."""

    encoder: list[torch.Tensor]
    decoder: list[torch.Tensor]


class Encoded(NamedTuple):
    """What the frozen encoder gives training: fused (B, N, D), the mean of all target layers (the
    bottleneck's input); targets, one (B, D, h, w) group mean per group; grid (h, w)."""

    fused: torch.Tensor
    targets: list[torch.Tensor]
    grid: tuple[int, int]


class DinomalyNet(nn.Module):
    """Frozen encoder -> mean of its layers -> noisy bottleneck -> decoder blocks; returns group features.

    forward: images (B, 3, H, W) in [0, 1] -> GroupFeatures with `num_groups` pairs of (B, D, h, w). Encoder
    layers and the decoder outputs (reversed, so the last block pairs with the shallowest layers) are split
    into contiguous groups and averaged within each group. forward = decode(encode(images)): training may
    cache `encode` (the encoder is frozen and the images are not augmented, so it never changes).
    """

    def __init__(self, encoder: ViTEncoder | CNNTokenEncoder, num_layers: int, num_groups: int = 2,
                 decoder_depth: int = 8, num_heads: int | str = "auto", mlp_ratio: float = 4.0,
                 bottleneck_ratio: float = 4.0, dropout: float = 0.2) -> None:
        super().__init__()
        self.encoder = encoder
        for param in encoder.parameters():
            param.requires_grad_(False)
        dim = encoder.embed_dim
        heads = num_heads if num_heads != "auto" else (encoder.num_heads or auto_heads(dim))
        self.bottleneck = NoisyBottleneck(dim, int(dim * bottleneck_ratio), dropout)
        self.decoder = nn.ModuleList(DecoderBlock(dim, int(heads), mlp_ratio) for _ in range(decoder_depth))
        self.encoder_groups = split_groups(num_layers, num_groups)
        self.decoder_groups = split_groups(decoder_depth, num_groups)
        self.reset_trainable()

    def reset_trainable(self) -> None:
        """The reference initialisation: Linear weights trunc-normal(std 0.01, +-0.03), biases 0, LayerNorm 1/0."""
        for m in self.trainable_modules().modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.01, a=-0.03, b=0.03)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def trainable_modules(self) -> nn.ModuleDict:
        return nn.ModuleDict({"bottleneck": self.bottleneck, "decoder": self.decoder})

    def train(self, mode: bool = True) -> DinomalyNet:
        super().train(mode)
        self.encoder.eval()  # frozen: never in training mode
        return self

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> Encoded:
        """images (B, 3, H, W) in [0, 1] -> Encoded (no gradient: the encoder is frozen)."""
        tokens = self.encoder(images)
        fused = torch.stack(tokens.layers, dim=1).mean(dim=1)
        targets = [_group_map(tokens.layers, g, tokens.grid) for g in self.encoder_groups]
        return Encoded(fused, targets, tokens.grid)

    def decode(self, fused: torch.Tensor, grid: tuple[int, int]) -> list[torch.Tensor]:
        """fused (B, N, D) -> one (B, D, h, w) decoder group mean per group."""
        x = self.bottleneck(fused)
        outputs = []
        for block in self.decoder:
            x = block(x)
            outputs.append(x)
        outputs.reverse()
        return [_group_map(outputs, g, grid) for g in self.decoder_groups]

    def forward(self, images: torch.Tensor) -> GroupFeatures:
        encoded = self.encode(images)
        return GroupFeatures(encoded.targets, self.decode(encoded.fused, encoded.grid))


def _group_map(layers: list[torch.Tensor], group: list[int], grid: tuple[int, int]) -> torch.Tensor:
    """Mean of layers[i] (B, P + N, D) for i in group, its P = (tokens - h*w) leading prefix tokens stripped
    (as the official ViTill strips CLS/register tokens at the output) -> (B, D, h, w)."""
    mean = torch.stack([layers[i] for i in group], dim=1).mean(dim=1)
    b, n, d = mean.shape
    cells = math.prod(grid)
    if n < cells:
        raise ValueError(f"{n} tokens do not fill a {grid} grid")
    return mean[:, n - cells:].transpose(1, 2).reshape(b, d, *grid)
