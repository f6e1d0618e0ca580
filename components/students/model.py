"""The student-teacher ensemble as one nn.Module: dense teacher and student descriptors per patch size,
the normalisation statistics as buffers, and the anomaly map (always one return type).

Per scale p: t = (T_p(x) - mu_p) / sigma_p (teacher descriptors normalised per channel over the training
images), s_m = S_{m,p}(x); e = |mean_m s_m - t|^2, v = mean_m |s_m - mean s|^2; score_p = (e - e_mean) /
e_std + (v - v_mean) / v_std (e, v statistics from good training images). The map is the mean over scales.
"""

from __future__ import annotations

import torch
from torch import nn

from components.students.losses import predictive_variance, regression_error, standardise
from components.students.networks import build_nets, dense_descriptors, pad_for_dense


class StudentsNet(nn.Module):
    """teacher: ModuleDict "p<size>" -> PatchNet (frozen); students: M ModuleDicts of the same shape.

    Buffers per scale: t_mean_p<size>, t_std_p<size> (D,), e_stats_p<size>, v_stats_p<size> (2,) = (mean, std).
    """

    def __init__(self, teacher: nn.ModuleDict, patch_sizes: tuple[int, ...], num_students: int, channels: int,
                 descriptor_dim: int, leaky_slope: float, seed: int, stride: int = 1) -> None:
        super().__init__()
        self.patch_sizes = tuple(patch_sizes)
        self.teacher = teacher
        for param in self.teacher.parameters():
            param.requires_grad_(False)
        self.students = nn.ModuleList(
            build_nets(self.patch_sizes, channels, descriptor_dim, leaky_slope, seed * 1000 + m + 1, stride)
            for m in range(num_students))
        for p in self.patch_sizes:
            self.register_buffer(f"t_mean_p{p}", torch.zeros(descriptor_dim))
            self.register_buffer(f"t_std_p{p}", torch.ones(descriptor_dim))
            self.register_buffer(f"e_stats_p{p}", torch.tensor([0.0, 1.0]))
            self.register_buffer(f"v_stats_p{p}", torch.tensor([0.0, 1.0]))

    def stat(self, name: str, p: int) -> torch.Tensor:
        return getattr(self, f"{name}_p{p}")

    def student_state(self) -> dict[str, torch.Tensor]:
        """Everything but the teacher: student weights and normalisation buffers."""
        return {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items() if not k.startswith("teacher.")}

    def teacher_target(self, x: torch.Tensor, p: int) -> torch.Tensor:
        """Normalised teacher descriptors of an (already padded or cropped) input. (B, 3, h + p - 1, w + p - 1)
        -> (B, D, h, w)."""
        t = self.teacher[f"p{p}"](x)
        return standardise(t, self.stat("t_mean", p).view(1, -1, 1, 1), self.stat("t_std", p).view(1, -1, 1, 1))

    def raw_scores(self, images: torch.Tensor, p: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Unnormalised (e, v) at scale p. images (B, 3, H, W) in [0, 1] -> two (B, H', W') (H' = ceil(H / s)
        for the networks' dense stride s)."""
        x = pad_for_dense(images, p)
        target = self.teacher_target(x, p)
        students = torch.stack([s[f"p{p}"](x) for s in self.students])
        return regression_error(students, target), predictive_variance(students)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Anomaly map, mean over scales of normalised e + normalised v. (B, 3, H, W) -> (B, H', W') (the
        networks' dense stride s: H' = ceil(H / s))."""
        total = None
        for p in self.patch_sizes:
            e, v = self.raw_scores(images, p)
            es, vs = self.stat("e_stats", p), self.stat("v_stats", p)
            score = standardise(e, es[0], es[1]) + standardise(v, vs[0], vs[1])
            total = score if total is None else total + score
        return total / len(self.patch_sizes)

    def teacher_dense(self, images: torch.Tensor, p: int) -> torch.Tensor:
        """Raw (unnormalised) dense teacher descriptors. (B, 3, H, W) -> (B, D, H', W')."""
        return dense_descriptors(self.teacher[f"p{p}"], images)
