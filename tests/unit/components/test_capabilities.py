"""The capabilities each registered method declares (components.capabilities), the shared config base
(components.method_config) and the shared training loop (components.train_loop)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from components.capabilities import FeatureCached, MultiLine, StepTrained, Updatable
from components.detector import BaseDetector, create_detector, registered_detectors
from components.method_config import MethodConfig, TrainedMethodConfig
from components.train_loop import TrainingRun
from components.training import fit_options

CAPABILITIES = {
    "patchcore": {Updatable, FeatureCached},
    "patchcore_ensemble": set(),
    "dinomaly": {StepTrained, MultiLine},
    "students": {StepTrained},
    "transformaly": {StepTrained},
    "divide_assemble": {StepTrained},
}


@pytest.mark.parametrize("method", registered_detectors())
def test_each_method_declares_its_capabilities(method: str, tiny_config_for) -> None:
    """A new method is listed here with what it can do; isinstance answers without fitting anything."""
    detector = create_detector(tiny_config_for(method))
    assert isinstance(detector, BaseDetector) and detector.params is getattr(detector.cfg.detector, method)
    found = {c for c in (Updatable, FeatureCached, MultiLine, StepTrained) if isinstance(detector, c)}
    assert found == CAPABILITIES[method]
    assert (fit_options(detector, print, Path("ckpt")) != {}) == (StepTrained in found)


@pytest.mark.parametrize("method", registered_detectors())
def test_method_sections_derive_from_the_shared_base(method: str, tiny_config_for) -> None:
    section = getattr(tiny_config_for(method).detector, method)
    if method == "patchcore_ensemble":  # members use detector.patchcore's
        return
    assert isinstance(section, MethodConfig)
    assert isinstance(section, TrainedMethodConfig) == (StepTrained in CAPABILITIES[method])


def test_training_run_checkpoints_logs_and_resumes(tmp_path: Path) -> None:
    """Steps after a checkpoint run again from its step with the checkpointed weights: the same final weights
    as one uninterrupted run."""

    def make() -> tuple[torch.nn.Linear, torch.optim.SGD]:
        torch.manual_seed(0)
        layer = torch.nn.Linear(3, 1)
        return layer, torch.optim.SGD(layer.parameters(), lr=0.1)

    def train(layer, optimizer, directory, total, progress=None, log_step=None) -> TrainingRun:
        run = TrainingRun("toy", "key", total, {"layer": layer}, {"layer": optimizer}, torch.device("cpu"), 2,
                          directory)
        run.resume()

        def step(i: int) -> dict[str, float]:
            x = torch.arange(3.0) + i
            loss = layer(x).pow(2).sum()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            return {"loss": float(loss.detach())}

        run.run(step, progress, log_step)
        return run

    reference, ref_opt = make()
    train(reference, ref_opt, None, 5)
    layer, optimizer = make()
    calls: list[tuple] = []
    train(layer, optimizer, tmp_path / "ckpt", 3, progress=lambda *a: calls.append(a))
    assert calls == [("train", 1, 3), ("train", 2, 3), ("train", 3, 3)]
    layer, optimizer = make()
    steps: list[int] = []
    run = train(layer, optimizer, tmp_path / "ckpt", 5, log_step=lambda s, m: steps.append(s))
    assert steps == [4, 5] and run.stats()["resumed_from_step"] == 3.0 and run.stats()["steps_run"] == 2.0
    assert all(torch.equal(a, b) for a, b in zip(layer.state_dict().values(), reference.state_dict().values(),
                                                 strict=True))
