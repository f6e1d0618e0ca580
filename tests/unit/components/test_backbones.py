"""Tests for components.backbones (packaged ImageNet weights really classify) and torchvision_compat."""

from __future__ import annotations

import hashlib
import pathlib
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from skimage import data as skdata

from components.backbones import (
    PACKAGED,
    WeightsError,
    build_classifier,
    build_extractor,
    load_weights_into,
    map_by_order,
    packaged_weights_path,
    read_state_dict,
)
from components.config import BackboneConfig
from components.torchvision_compat import nms_cpu

CAT_CLASSES = {281, 282, 283, 284, 285}  # tabby, tiger cat, Persian, Siamese, Egyptian cat
COFFEE_CLASSES = {967, 968}  # espresso, cup


def top5(model: torch.nn.Module, mean: tuple, std: tuple, image: np.ndarray) -> list[int]:
    """uint8 (H, W, 3) -> the 5 most likely ImageNet classes of the full network at 224 x 224."""
    x = torch.from_numpy(image).permute(2, 0, 1)[None].float() / 255.0
    x = F.interpolate(x, size=(224, 224), mode="bilinear", antialias=True, align_corners=False)
    x = (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    with torch.inference_mode():
        return model(x).topk(5, dim=1).indices[0].tolist()


@pytest.mark.parametrize("name", ["mobilenetv2_100", "tf_efficientnet_lite0"])
def test_packaged_weights_are_imagenet_weights(name: str) -> None:
    path = packaged_weights_path(name)
    assert path is not None, f"packaged weights for {name} are not installed (run `make install`)"
    model, info, mean, std = build_classifier(BackboneConfig(name=name, weights="packaged"))
    assert info.source == "packaged"
    assert info.location == str(path)
    assert info.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert (mean, std) == (PACKAGED[name].mean, PACKAGED[name].std)
    cat = top5(model, mean, std, skdata.chelsea())
    coffee = top5(model, mean, std, skdata.coffee())
    assert CAT_CLASSES & set(cat), f"{name}: chelsea (a cat) classified as {cat}"
    assert COFFEE_CLASSES & set(coffee), f"{name}: coffee classified as {coffee}"
    assert cat[0] in CAT_CLASSES and coffee[0] in COFFEE_CLASSES


def test_auto_prefers_packaged_weights() -> None:
    _model, info, _mean, _std = build_classifier(BackboneConfig(name="tf_efficientnet_lite0"))
    assert info.source == "packaged"


@pytest.mark.parametrize(
    ("name", "layers", "channels", "strides"),
    [("mobilenetv2_100", (2, 3), [32, 96], [8, 16]), ("test_resnet", (1, 2), [32, 48], [4, 8]),
     ("test_resnet", (0, 1, 2), [32, 32, 48], [2, 4, 8])],
)
def test_feature_levels(name: str, layers: tuple, channels: list, strides: list) -> None:
    weights = "packaged" if name in PACKAGED else "random"
    extractor, _info = build_extractor(BackboneConfig(name=name, layers=layers, weights=weights))
    assert extractor.channels == channels
    assert extractor.strides == strides
    assert not extractor.training
    assert not any(p.requires_grad for p in extractor.parameters())
    feats = extractor(torch.rand(2, 3, 64, 96))
    assert [tuple(f.shape) for f in feats] == [(2, c, 64 // s, 96 // s) for c, s in zip(channels, strides, strict=True)]


def test_extractor_carries_the_classifier_weights() -> None:
    cfg = BackboneConfig(name="mobilenetv2_100", layers=(2, 3), weights="packaged")
    classifier, _info, _mean, _std = build_classifier(cfg)
    extractor, _ = build_extractor(cfg)
    full = classifier.state_dict()
    body = extractor.body.state_dict()
    assert len(body) > 50
    for key, tensor in body.items():
        torch.testing.assert_close(tensor, full[key], rtol=0, atol=0, msg=key)


@pytest.mark.parametrize("name", ["mobilenetv2_100", "tf_efficientnet_lite0"])
def test_frozen_graph_equals_the_eager_forward(name: str) -> None:
    """The traced, BN-folded graph gives the eager features within float32 rounding, for several sizes and
    batch sizes (one graph per size), and is used only without autograd."""
    extractor, _ = build_extractor(BackboneConfig(name=name, layers=(2, 3), weights="packaged"))
    gen = torch.Generator().manual_seed(0)
    for shape in [(2, 3, 64, 96), (1, 3, 64, 96), (3, 3, 80, 48)]:
        x = torch.rand(*shape, generator=gen)
        with torch.inference_mode():
            eager, fast = extractor(x), extractor.frozen(x)
        for e, f in zip(eager, fast, strict=True):
            assert f.shape == e.shape
            torch.testing.assert_close(f, e, rtol=1e-4, atol=1e-4 * float(e.abs().max()))
    assert len(extractor._graphs) == 2  # keyed by (C, H, W): batch size shares one graph
    assert all(g is not False for g in extractor._graphs.values())
    x = torch.rand(1, 3, 64, 96, requires_grad=True)
    out = extractor.frozen(x)  # autograd on: the eager forward, gradients flow
    out[0].sum().backward()
    assert x.grad is not None


def test_frozen_graph_follows_the_weights() -> None:
    """Loading new weights, train() or .to() drops the cached graphs, so they never run stale weights."""
    cfg = BackboneConfig(name="test_resnet", layers=(1, 2), weights="random")
    extractor, _ = build_extractor(cfg)
    x = torch.rand(1, 3, 32, 32)
    with torch.no_grad():
        before = extractor.frozen(x)
        state = {k: v * 0.5 if v.is_floating_point() and k.endswith("weight") else v
                 for k, v in extractor.state_dict().items()}
        extractor.load_state_dict(state)
        assert not extractor._graphs
        after, eager = extractor.frozen(x), extractor(x)
    assert not torch.allclose(after[0], before[0])
    torch.testing.assert_close(after[0], eager[0], rtol=1e-4, atol=1e-5)
    extractor.train().eval()
    assert not extractor._graphs


def test_frozen_graph_failure_falls_back_to_eager(monkeypatch: pytest.MonkeyPatch, caplog) -> None:
    extractor, _ = build_extractor(BackboneConfig(name="test_resnet", layers=(1, 2), weights="random"))

    def broken(*_args, **_kwargs):
        raise RuntimeError("tracer says no")

    monkeypatch.setattr(torch.jit, "trace", broken)
    x = torch.rand(1, 3, 32, 32)
    with torch.inference_mode():
        out = extractor.frozen(x)
        again = extractor.frozen(x)  # the failure is remembered: no second attempt, no second warning
        eager = extractor(x)
    assert "tracer says no" in caplog.text and caplog.text.count("not built") == 1
    assert all(torch.equal(a, b) for a, b in zip(out, eager, strict=True))
    assert all(torch.equal(a, b) for a, b in zip(again, eager, strict=True))


def test_bad_layers_rejected() -> None:
    with pytest.raises(WeightsError, match=r"no feature levels \(7,\)"):
        build_extractor(BackboneConfig(name="test_resnet", layers=(7,), weights="random"))


def test_random_weights_are_reproducible_whatever_the_global_seed() -> None:
    """`weights: random` must not depend on the global RNG: the config digest then pins the model."""
    cfg = BackboneConfig(name="test_resnet", layers=(1, 2), weights="random")
    torch.manual_seed(1)
    a, info_a = build_extractor(cfg)
    torch.manual_seed(2)
    b, info_b = build_extractor(cfg)
    assert info_a.source == "random" and info_a.sha256 == info_b.sha256
    for (key, ta), tb in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        torch.testing.assert_close(ta, tb, rtol=0, atol=0, msg=key)
    torch.manual_seed(3)
    before = torch.get_rng_state()
    build_classifier(cfg)
    assert torch.equal(torch.get_rng_state(), before)  # the seeded init does not reseed the caller's RNG


# ------------------------------------------------------------------------------------ weight sources
def trained_state(name: str = "test_resnet", seed: int = 7) -> OrderedDict[str, torch.Tensor]:
    """A state dict that differs from the seeded random init (so loading it is observable)."""
    torch.manual_seed(seed)
    model = timm.create_model(name, pretrained=False)
    state = OrderedDict((k, v.clone()) for k, v in model.state_dict().items())
    for v in state.values():
        if v.is_floating_point():
            v.add_(0.01 * torch.randn_like(v))
    return state


def assert_body_equals(extractor, state: dict, rename: dict[str, str] | None = None) -> None:
    for key, tensor in extractor.body.state_dict().items():
        torch.testing.assert_close(tensor, state[(rename or {}).get(key, key)], rtol=0, atol=0, msg=key)


def test_weights_file_safetensors(tmp_path: Path) -> None:
    state = trained_state()
    path = tmp_path / "w.safetensors"
    save_file(dict(state), str(path))
    extractor, info = build_extractor(BackboneConfig(name="test_resnet", layers=(1, 2), weights="file",
                                                     weights_file=path))
    assert info.source == "file" and info.location == str(path)
    assert info.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert_body_equals(extractor, state)


def test_weights_file_pth_by_order(tmp_path: Path) -> None:
    """Foreign parameter names (as in the packaged torchvision checkpoints) are mapped by position."""
    state = trained_state()
    foreign = OrderedDict((f"layer{i:03d}", v) for i, v in enumerate(state.values()))
    path = tmp_path / "w.pth"
    torch.save({"state_dict": foreign}, path)
    # auto + weights_file: the file wins
    extractor, info = build_extractor(BackboneConfig(name="test_resnet", layers=(1, 2), weights_file=path))
    assert info.source == "file"
    assert_body_equals(extractor, state)


def test_by_order_mapping_rejects_a_shape_mismatch_naming_the_tensor(tmp_path: Path) -> None:
    state = trained_state()
    foreign = OrderedDict((f"layer{i:03d}", v) for i, v in enumerate(state.values()))
    foreign["layer005"] = torch.zeros(3, 3)
    path = tmp_path / "w.pth"
    torch.save(foreign, path)
    model = timm.create_model("test_resnet", pretrained=False)
    with pytest.raises(WeightsError, match=rf"{path}: tensor layer005 \(3, 3\) does not fit"):
        load_weights_into(model, path)
    short = OrderedDict(list(foreign.items())[:10])
    with pytest.raises(WeightsError, match="10 tensors, but the model has"):
        map_by_order(short, model, path)


def test_matching_names_with_a_wrong_shape_are_rejected(tmp_path: Path) -> None:
    state = trained_state()
    key = "conv1.0.weight"
    state[key] = torch.zeros(1, 1, 1, 1)
    path = tmp_path / "w.safetensors"
    save_file(dict(state), str(path))
    with pytest.raises(WeightsError, match=rf"{path}: {key} \(1, 1, 1, 1\)"):
        load_weights_into(timm.create_model("test_resnet", pretrained=False), path)


class _Payload:
    """Unpickling this would create `marker`: the loader must refuse it without running it."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (self.marker,))


def test_pickled_objects_are_refused_and_never_run(tmp_path: Path) -> None:
    marker = tmp_path / "code-ran"
    path = tmp_path / "evil.pth"
    torch.save({"conv.weight": torch.zeros(1), "extra": _Payload(marker)}, path)
    with pytest.raises(WeightsError, match=rf"{path}: cannot read weights"):
        read_state_dict(path)
    assert not marker.exists()


def test_non_tensor_values_and_bad_files_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "meta.pth"
    torch.save({"conv.weight": torch.zeros(1), "epoch": 3}, path)
    with pytest.raises(WeightsError, match="mapping of parameter names to tensors"):
        read_state_dict(path)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x00not safetensors")
    with pytest.raises(WeightsError, match=f"{garbage}: cannot read weights"):
        read_state_dict(garbage)
    with pytest.raises(WeightsError, match="not found"):
        read_state_dict(tmp_path / "absent.pth")


@pytest.mark.parametrize(
    ("cfg", "match"),
    [
        (BackboneConfig(name="mobilenetv2_100", weights="hub"), "allow_network"),
        (BackboneConfig(name="resnet18", weights="auto"), "no offline weights for 'resnet18'"),
        (BackboneConfig(name="resnet18", weights="packaged"), "no packaged weights for 'resnet18'"),
        (BackboneConfig(name="no_such_net", weights="random"), "unknown backbone 'no_such_net'"),
    ],
)
def test_weight_source_errors(cfg: BackboneConfig, match: str) -> None:
    with pytest.raises(WeightsError, match=match):
        build_classifier(cfg)


# ------------------------------------------------------------------------------------ torchvision_compat
def test_nms_hand_case() -> None:
    boxes = torch.tensor([[0, 0, 10, 10], [1, 1, 11, 11], [20, 20, 30, 30], [0, 0, 10, 10.5], [21, 21, 29, 29]],
                         dtype=torch.float32)
    scores = torch.tensor([0.9, 0.8, 0.7, 0.95, 0.6])
    # 3 beats 0 (IoU 0.95) and 1 (IoU 0.65); 2 beats 4 (IoU 0.64); 0 vs 1: IoU 81/119 = 0.68
    assert nms_cpu(boxes, scores, 0.5).tolist() == [3, 2]
    assert nms_cpu(boxes, scores, 0.66).tolist() == [3, 2, 4]
    assert nms_cpu(boxes, scores, 0.99).tolist() == [3, 0, 1, 2, 4]
    assert nms_cpu(torch.zeros(0, 4), torch.zeros(0), 0.5).tolist() == []


def test_torchvision_imports_and_its_nms_op_agrees() -> None:
    import torchvision  # noqa: F401  (importable only thanks to components.torchvision_compat)

    boxes = torch.tensor([[0, 0, 10, 10], [1, 1, 11, 11], [20, 20, 30, 30]], dtype=torch.float32)
    scores = torch.tensor([0.9, 0.8, 0.7])
    expected = nms_cpu(boxes, scores, 0.5)
    assert torch.ops.torchvision.nms(boxes, scores, 0.5).tolist() == expected.tolist() == [0, 2]
