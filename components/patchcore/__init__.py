"""PatchCore: locally aware patch features, greedy coreset, faiss nearest-neighbour scoring."""

from components.patchcore.detector import PatchCore

__all__ = ["PatchCore"]
