"""Make `import torchvision` (and so `import timm`) work with a CPU torch and PyPI's CUDA torchvision.

torchvision 0.28 from PyPI is a CUDA build: with the CPU torch its compiled extension `_C` fails to load,
and its `_meta_registrations` then fails with "operator torchvision::nms does not exist". Defining the
`torchvision::nms` and `torchvision::qnms` schemas (with a CPU kernel for nms) before torchvision is
imported lets it import. Where the extension loads, this module does nothing.

Import this module before timm or torchvision; `components.backbones` does.
"""

from __future__ import annotations

import importlib.util
import logging
import sys
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

_LIBRARY: torch.library.Library | None = None  # kept alive: the schemas live as long as this object


def _extension_loads() -> bool:
    spec = importlib.util.find_spec("torchvision")
    if spec is None or spec.origin is None:
        return True  # no torchvision at all: nothing to patch
    lib = Path(spec.origin).parent / "_C.so"
    try:
        torch.ops.load_library(str(lib))
        return True
    except (OSError, RuntimeError):
        return False


def _op_exists(name: str) -> bool:
    try:
        getattr(torch.ops.torchvision, name)
        return True
    except (AttributeError, RuntimeError):
        return False


def nms_cpu(dets: torch.Tensor, scores: torch.Tensor, iou_threshold: float) -> torch.Tensor:
    """Greedy non-maximum suppression. dets (N, 4) as x1, y1, x2, y2; scores (N,) -> kept indices (K,)."""
    if dets.numel() == 0:
        return torch.empty(0, dtype=torch.long)
    x1, y1, x2, y2 = dets.unbind(1)
    areas = (x2 - x1).clamp(min=0) * (y2 - y1).clamp(min=0)
    order = scores.argsort(descending=True)
    suppressed = torch.zeros(dets.shape[0], dtype=torch.bool)
    keep = []
    for i in order.tolist():
        if suppressed[i]:
            continue
        keep.append(i)
        w = (torch.minimum(x2[i], x2) - torch.maximum(x1[i], x1)).clamp(min=0)
        h = (torch.minimum(y2[i], y2) - torch.maximum(y1[i], y1)).clamp(min=0)
        inter = w * h
        iou = inter / (areas[i] + areas - inter).clamp(min=1e-12)
        suppressed |= iou > iou_threshold
    return torch.tensor(keep, dtype=torch.long)


def install() -> bool:
    """Define the missing operator schemas if needed. Returns True when it had to patch."""
    global _LIBRARY
    if "torchvision" in sys.modules or _LIBRARY is not None or _extension_loads() or _op_exists("nms"):
        return False
    lib = torch.library.Library("torchvision", "DEF")
    lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    lib.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    lib.impl("nms", nms_cpu, "CPU")
    _LIBRARY = lib
    logger.debug("torchvision extension did not load; defined torchvision::nms/qnms schemas")
    return True


install()
