"""What makes a training run resumable: batches that are a pure function of (seed, step), a fingerprint of
the run, and checkpoints holding the trained modules, the optimisers' state and (optionally) the RNG.

Used by every trained detector (dinomaly, students, transformaly, divide_assemble): a run resumed from a
checkpoint continues exactly as the uninterrupted run would have.

Checkpoint folder (written atomically by components.detector.write_model_dir, sha256 manifest as every
model; manifest method `<name>-checkpoint`):
- `state.safetensors`: `<module>.<key>` for every module's state dict, `optim.<optimizer>.<param id>.<moment>`
  for every optimiser's state, `rng.cpu` (and `rng.cuda`) when the RNG is saved;
- `checkpoint.json`: format, step, fingerprint and every optimiser's param_groups (by optimiser name).
A checkpoint with another fingerprint or format is ignored (logged): training starts from step 0.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from pathlib import Path

import torch
from pydantic import BaseModel
from safetensors.torch import load_file, save_file
from torch import nn

from components.detector import MANIFEST, ArtifactError, read_manifest, verified_files, write_model_dir

logger = logging.getLogger(__name__)

CHECKPOINT_FORMAT = 2
"""checkpoint.json `format`: 2 = the layout above (1: the per-method layouts before components.checkpoints)."""
_RESERVED = ("optim", "rng")


# ------------------------------------------------------------------------------------------ batches
def steps_per_epoch(n_images: int, batch_size: int, drop_last: bool = True) -> int:
    """Batches per epoch of min(batch_size, n_images) images; drop_last drops the last partial batch."""
    size = min(batch_size, n_images)
    return n_images // size if drop_last else math.ceil(n_images / size)


def batch_indices(step: int, n_images: int, batch_size: int, seed: int, drop_last: bool = True) -> torch.Tensor:
    """Indices of the images in 0-based `step`'s batch: a seeded permutation per epoch cut into batches.

    -> (min(batch_size, n_images),) int64 (the last batch of an epoch is shorter when not drop_last).
    With fewer images than batch_size every batch is all images.
    """
    size = min(batch_size, n_images)
    epoch, position = divmod(step, steps_per_epoch(n_images, batch_size, drop_last))
    perm = torch.randperm(n_images, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
    return perm[position * size:(position + 1) * size]


def checkpoint_due(done: int, every: int, total: int) -> bool:
    """True after step `done` (1-based) when `every` > 0 and it is a multiple of `every` or the last step."""
    return bool(every) and (done % every == 0 or done == total)


# ---------------------------------------------------------------------------------------- fingerprint
def run_fingerprint(params: BaseModel, exclude: set[str], weights_key: str, images: torch.Tensor) -> str:
    """What a checkpoint must match to be resumed: the hyperparameters of `params` but `exclude` (those that
    do not change training: runtime, scoring), the frozen weights (`weights_key`, e.g. their sha256) and the
    training images (N, 3, H, W). -> sha256 hex digest."""
    digest = hashlib.sha256()
    digest.update(json.dumps(params.model_dump(mode="json", exclude=exclude), sort_keys=True).encode())
    digest.update(weights_key.encode())
    digest.update(str(tuple(images.shape)).encode())
    digest.update(images.contiguous().cpu().numpy().tobytes())
    return digest.hexdigest()


# ---------------------------------------------------------------------------------------- checkpoints
def cpu_state(module: nn.Module) -> dict[str, torch.Tensor]:
    """module's state dict as contiguous CPU tensors (what safetensors writes)."""
    return {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}


def save_checkpoint(directory: str | Path, name: str, step: int, run_key: str, modules: dict[str, nn.Module],
                    optimizers: dict[str, torch.optim.Optimizer], rng_device: torch.device | None = None) -> Path:
    """Write (atomically, with sha256 manifest) everything needed to continue after `step` steps of the
    `name` method's run `run_key`: every module's state, every optimiser's state, and the global RNG state
    (CPU, and CUDA when rng_device is a CUDA device) unless rng_device is None."""
    _check_names(modules)
    tensors = {f"{m}.{k}": v for m, module in modules.items() for k, v in cpu_state(module).items()}
    groups = {}
    for opt_name, optimizer in optimizers.items():
        state = optimizer.state_dict()
        groups[opt_name] = state["param_groups"]
        for pid, moments in state["state"].items():
            for key, value in moments.items():
                tensors[f"optim.{opt_name}.{pid}.{key}"] = torch.as_tensor(value).detach().cpu().contiguous()
    if rng_device is not None:
        tensors["rng.cpu"] = torch.get_rng_state()
        if rng_device.type == "cuda":
            tensors["rng.cuda"] = torch.cuda.get_rng_state(rng_device)
    meta = {"format": CHECKPOINT_FORMAT, "step": step, "fingerprint": run_key, "param_groups": groups}
    path = write_model_dir(directory, f"{name}-checkpoint", {
        "state.safetensors": lambda p: save_file(tensors, str(p)),
        "checkpoint.json": lambda p: p.write_text(json.dumps(meta, indent=2, sort_keys=True))})
    logger.info("%s checkpoint at step %d -> %s", name, step, directory)
    return path


def restore_checkpoint(directory: str | Path, name: str, run_key: str, modules: dict[str, nn.Module],
                       optimizers: dict[str, torch.optim.Optimizer], device: torch.device) -> int:
    """Load a matching checkpoint of the `name` method into the modules and optimisers (moments onto `device`)
    and the RNG if it was saved; return its step (0 when there is none or it belongs to another run).

    ArtifactError when `directory` holds something else than a `name` checkpoint (e.g. a saved model)."""
    directory = Path(directory)
    method = f"{name}-checkpoint"
    if not (directory / MANIFEST).is_file():
        return 0
    if read_manifest(directory).get("method") != method:
        raise ArtifactError(f"{directory}: holds a saved model, not a {name} checkpoint; choose another folder")
    files = verified_files(directory, method)
    meta = json.loads(files["checkpoint.json"].read_text())
    if meta.get("fingerprint") != run_key or meta.get("format") != CHECKPOINT_FORMAT:
        logger.warning("%s: checkpoint is from a different config, weights or image set (or an older checkpoint "
                       "format); training from step 0", directory)
        return 0
    tensors = load_file(str(files["state.safetensors"]))
    for m, module in modules.items():
        module.load_state_dict(_strip(tensors, f"{m}."), strict=True)
    for opt_name, optimizer in optimizers.items():
        moments: dict[int, dict[str, torch.Tensor]] = {}
        for key, value in _strip(tensors, f"optim.{opt_name}.").items():
            pid, moment = key.split(".", 1)
            moments.setdefault(int(pid), {})[moment] = value.to(device) if moment != "step" else value
        optimizer.load_state_dict({"state": moments, "param_groups": meta["param_groups"][opt_name]})
    if "rng.cpu" in tensors:
        torch.set_rng_state(tensors["rng.cpu"])
    if device.type == "cuda" and "rng.cuda" in tensors:
        torch.cuda.set_rng_state(tensors["rng.cuda"], device)
    logger.info("%s: resumed from %s at step %d", name, directory, meta["step"])
    return int(meta["step"])


def _strip(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}


def _check_names(modules: dict[str, nn.Module]) -> None:
    for m in modules:
        if m in _RESERVED or "." in m:
            raise ValueError(f"checkpoint module name {m!r}: must not be {_RESERVED} nor contain '.'")
