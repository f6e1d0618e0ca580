"""components.checkpoints: seeded batches per epoch (drop-last or not), the run fingerprint, and a checkpoint
of several modules and optimisers that restores them exactly (and is ignored when it is of another run).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from components.checkpoints import (
    CHECKPOINT_FORMAT,
    batch_indices,
    checkpoint_due,
    restore_checkpoint,
    run_fingerprint,
    save_checkpoint,
    steps_per_epoch,
)
from components.detector import ArtifactError, write_model_dir
from components.divide_assemble.config import DivideAssembleConfig


def test_batches_are_a_seeded_drop_last_permutation_per_epoch() -> None:
    first_epoch = torch.cat([batch_indices(s, 10, 4, seed=3) for s in range(2)])
    assert steps_per_epoch(10, 4) == 2 and len(set(first_epoch.tolist())) == 8  # 2 full batches, 2 dropped
    assert torch.equal(batch_indices(5, 10, 4, 3), batch_indices(5, 10, 4, 3))
    assert not torch.equal(batch_indices(0, 10, 4, 3), batch_indices(2, 10, 4, 3))
    assert batch_indices(7, 3, 4, 0).sort().values.tolist() == [0, 1, 2]  # fewer images than the batch


def test_batches_without_drop_last_cover_every_image_once_per_epoch() -> None:
    assert steps_per_epoch(10, 4, drop_last=False) == 3
    epoch = [batch_indices(s, 10, 4, 0, drop_last=False) for s in range(3)]
    assert [len(b) for b in epoch] == [4, 4, 2] and sorted(torch.cat(epoch).tolist()) == list(range(10))
    assert torch.equal(epoch[0], batch_indices(0, 10, 4, 0))  # the same permutation as with drop_last


def test_checkpoint_due_and_fingerprint() -> None:
    assert [d for d in range(1, 8) if checkpoint_due(d, 3, 7)] == [3, 6, 7]
    assert not any(checkpoint_due(d, 0, 7) for d in range(1, 8))
    images = torch.rand(2, 3, 4, 4)
    key = run_fingerprint(DivideAssembleConfig(), {"threads"}, "w", images)
    assert key == run_fingerprint(DivideAssembleConfig(threads=3), {"threads"}, "w", images)
    assert key != run_fingerprint(DivideAssembleConfig(lr=0.5), {"threads"}, "w", images)
    assert key != run_fingerprint(DivideAssembleConfig(), {"threads"}, "v", images)
    assert key != run_fingerprint(DivideAssembleConfig(), {"threads"}, "w", images + 1)


def _trained(seed: int) -> tuple[dict[str, nn.Module], dict[str, torch.optim.Optimizer]]:
    torch.manual_seed(seed)
    modules = {"a": nn.Linear(3, 2), "b": nn.Sequential(nn.Linear(2, 2), nn.Dropout(0.5))}
    optimizers = {"g": torch.optim.Adam(modules["a"].parameters(), lr=0.1),
                  "d": torch.optim.SGD(modules["b"].parameters(), lr=0.2, momentum=0.9)}
    return modules, optimizers


def _step(modules, optimizers) -> None:
    loss = modules["b"](modules["a"](torch.rand(4, 3))).pow(2).sum()
    for opt in optimizers.values():
        opt.zero_grad()
    loss.backward()
    for opt in optimizers.values():
        opt.step()


def test_checkpoint_restores_modules_optimisers_and_rng(tmp_path: Path) -> None:
    cpu = torch.device("cpu")
    modules, optimizers = _trained(0)
    for _ in range(2):
        _step(modules, optimizers)
    save_checkpoint(tmp_path / "ckpt", "toy", 2, "key", modules, optimizers, rng_device=cpu)
    _step(modules, optimizers)  # the uninterrupted run's third step
    other, other_opt = _trained(1)
    assert restore_checkpoint(tmp_path / "ckpt", "toy", "key", other, other_opt, cpu) == 2
    _step(other, other_opt)  # the resumed run's third step: same batch (RNG restored), same moments
    for name in modules:
        for x, y in zip(modules[name].state_dict().values(), other[name].state_dict().values(), strict=True):
            assert torch.equal(x, y), name
    meta = json.loads((tmp_path / "ckpt" / "checkpoint.json").read_text())
    assert meta["format"] == CHECKPOINT_FORMAT and set(meta["param_groups"]) == {"g", "d"}


def test_checkpoint_of_another_run_or_format_is_ignored_and_a_model_refused(tmp_path: Path) -> None:
    cpu = torch.device("cpu")
    modules, optimizers = _trained(0)
    save_checkpoint(tmp_path / "ckpt", "toy", 5, "key", modules, optimizers)
    assert restore_checkpoint(tmp_path / "ckpt", "toy", "other key", modules, optimizers, cpu) == 0
    assert restore_checkpoint(tmp_path / "none", "toy", "key", modules, optimizers, cpu) == 0
    old = tmp_path / "old"  # the per-method layout before components.checkpoints
    write_model_dir(old, "toy-checkpoint", {
        "state.safetensors": lambda p: (tmp_path / "ckpt" / "state.safetensors").replace(p),
        "checkpoint.json": lambda p: p.write_text(json.dumps({"step": 5, "fingerprint": "key", "param_groups": []}))})
    assert restore_checkpoint(old, "toy", "key", modules, optimizers, cpu) == 0
    model = write_model_dir(tmp_path / "model", "toy", {"metadata.json": lambda p: p.write_text("{}")})
    with pytest.raises(ArtifactError, match="not a toy checkpoint"):
        restore_checkpoint(model, "toy", "key", modules, optimizers, cpu)
    with pytest.raises(ValueError, match="module name 'optim'"):
        save_checkpoint(tmp_path / "bad", "toy", 1, "key", {"optim": modules["a"]}, {})
