"""Transformaly's network: a frozen teacher (timm ViT or CNN) seen as stem -> blocks -> pooled features, and
one trainable student block per fine-tuned teacher block, fed the teacher's input to that block.

The teacher runs once per image (no gradient); each student block k sees the teacher's input to block k, so
the blocks before the first fine-tuned one are shared and frozen, and students never feed one another (as
the paper's cloned blocks). The module returns one type in train and eval: `Features`. The teacher is in
eval mode throughout. student_mode "eval": so are the students (BatchNorm statistics and dropout fixed; only
their weights are trained). student_mode "train" (the official code's training mode): `train()` puts the
student blocks in train mode (their Dropout at `dropout`, BatchNorm on batch statistics); `eval()` for scoring.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn

from components.backbones import WeightsError

KINDS = ("vit", "efficientnet", "resnet")


def teacher_kind(model: nn.Module) -> str:
    """'vit' (timm VisionTransformer), 'efficientnet' (EfficientNet/MobileNetV2 family) or 'resnet'."""
    if all(hasattr(model, a) for a in ("patch_embed", "_pos_embed", "blocks", "norm")):
        return "vit"
    if all(hasattr(model, a) for a in ("conv_stem", "bn1", "blocks", "conv_head", "bn2")):
        return "efficientnet"
    if all(hasattr(model, f"layer{i}") for i in range(1, 5)) and hasattr(model, "conv1"):
        return "resnet"
    raise WeightsError(f"{type(model).__name__}: unsupported teacher (expected a timm ViT, an EfficientNet/"
                       "MobileNet or a ResNet)")


class Teacher(nn.Module):
    """A frozen timm network. blocks(): its stages in order; stem(images in [0, 1]) -> input of block 0;
    pooled(output of the last block) -> (B, D) pre-logits features (the ViT's final CLS token)."""

    def __init__(self, model: nn.Module, mean: tuple, std: tuple) -> None:
        super().__init__()
        self.kind = teacher_kind(model)
        self.model = model
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1))
        for param in self.parameters():
            param.requires_grad_(False)
        self.eval()

    def blocks(self) -> list[nn.Module]:
        m = self.model
        if self.kind == "resnet":
            return [m.layer1, m.layer2, m.layer3, m.layer4]
        return list(m.blocks)

    @property
    def prefix_tokens(self) -> int:
        return int(getattr(self.model, "num_prefix_tokens", 0)) if self.kind == "vit" else 0

    def grid(self, size: tuple[int, int]) -> tuple[int, int]:
        """ViT patch grid (h, w) for an input of `size` (H, W)."""
        return tuple(self.model.patch_embed.dynamic_feat_size(size))

    def stem(self, images: torch.Tensor) -> torch.Tensor:
        m, x = self.model, (images - self.mean) / self.std
        if self.kind == "vit":
            return m.norm_pre(m.patch_drop(m._pos_embed(m.patch_embed(x))))
        if self.kind == "efficientnet":
            return m.bn1(m.conv_stem(x))
        return m.maxpool(m.act1(m.bn1(m.conv1(x))))

    def pooled(self, x: torch.Tensor) -> torch.Tensor:
        m = self.model
        if self.kind == "vit":
            x = m.norm(x)
        elif self.kind == "efficientnet":
            x = m.bn2(m.conv_head(x))
        return m.forward_head(x, pre_logits=True).flatten(1)


@dataclass(frozen=True)
class Features:
    """pooled (B, D) teacher features; teacher/student: one output per fine-tuned block, (B, C, h, w) for a CNN
    or (B, T, C) tokens for a ViT."""

    pooled: torch.Tensor
    teacher: list[torch.Tensor]
    student: list[torch.Tensor]


@dataclass(frozen=True)
class TeacherPass:
    """first_input: the teacher's input to the first fine-tuned block; outputs: its fine-tuned blocks'
    outputs; pooled (B, D). Student block k's input is [first_input, *outputs][k]."""

    first_input: torch.Tensor
    outputs: list[torch.Tensor]
    pooled: torch.Tensor

    def student_inputs(self) -> list[torch.Tensor]:
        return [self.first_input, *self.outputs[:-1]]


def init_student(block: nn.Module, mode: str, noise: float, seed: int) -> nn.Module:
    """A trainable copy of a teacher block: 'copy' = the teacher's weights plus Gaussian noise of `noise` times
    each tensor's std (noise 0: exactly the teacher); 'random' = every submodule's own reset_parameters.

    Seeded without touching the global RNG."""
    student = copy.deepcopy(block)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        with torch.no_grad():
            if mode == "random":
                for module in student.modules():
                    if hasattr(module, "reset_parameters"):
                        module.reset_parameters()
            elif mode == "copy":
                for param in student.parameters():
                    scale = param.std() if param.numel() > 1 else param.abs().reshape(())
                    if noise > 0 and float(scale) > 0:
                        param.add_(torch.randn_like(param) * (noise * scale))
            else:
                raise ValueError(f"student_init {mode!r}: expected 'copy' or 'random'")
    for param in student.parameters():
        param.requires_grad_(True)
    return student.eval()


def set_dropout(module: nn.Module, p: float) -> int:
    """Set the probability of every nn.Dropout inside `module` to p. -> how many there were."""
    drops = [m for m in module.modules() if isinstance(m, nn.Dropout)]
    for m in drops:
        m.p = p
    return len(drops)


class TransformalyNet(nn.Module):
    """Frozen teacher and one student per fine-tuned block (`blocks`: consecutive teacher block indices)."""

    def __init__(self, teacher: Teacher, blocks: tuple[int, ...], student_init: str = "random",
                 init_noise: float = 0.0, seed: int = 0, student_mode: str = "eval", dropout: float = 0.0) -> None:
        super().__init__()
        available = len(teacher.blocks())
        if not blocks or max(blocks) >= available:
            raise WeightsError(f"fine-tuned blocks {list(blocks)} do not exist: the {teacher.kind} teacher has "
                               f"{available} blocks (0..{available - 1})")
        self.teacher = teacher
        self.block_ids = tuple(blocks)
        source = teacher.blocks()
        self.student = nn.ModuleList(init_student(source[b], student_init, init_noise, seed * 1009 + b)
                                     for b in self.block_ids)
        if student_mode not in ("eval", "train"):
            raise ValueError(f"student_mode {student_mode!r}: expected 'eval' or 'train'")
        self.student_mode = student_mode
        if student_mode == "train":
            set_dropout(self.student, dropout)
        self.eval()

    def train(self, mode: bool = True) -> TransformalyNet:
        """The teacher always in eval mode; the students in train mode only when `mode` and student_mode is
        "train" (see module docstring)."""
        super().train(False)
        if mode and self.student_mode == "train":
            self.student.train(True)
        return self

    @torch.no_grad()
    def teacher_pass(self, images: torch.Tensor) -> TeacherPass:
        """images (B, 3, H, W) in [0, 1] -> TeacherPass (no gradient)."""
        x = self.teacher.stem(images)
        first, outputs = None, []
        for index, block in enumerate(self.teacher.blocks()):
            if index == self.block_ids[0]:
                first = x
            x = block(x)
            if index in self.block_ids:
                outputs.append(x)
        return TeacherPass(first, outputs, self.teacher.pooled(x))

    def student_pass(self, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
        """One input per student (the teacher's input to that block) -> one output per student."""
        return [block(x) for block, x in zip(self.student, inputs, strict=True)]

    def forward(self, images: torch.Tensor) -> Features:
        passed = self.teacher_pass(images)
        return Features(passed.pooled, passed.outputs, self.student_pass(passed.student_inputs()))
