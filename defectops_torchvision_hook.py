"""Lets `import torchvision` (and so `import timm`) work in any interpreter of this environment, not only after
`import components`: PyPI's torchvision 0.28 is a CUDA build whose compiled extension does not load with the
CPU torch wheel, and it then fails with "operator torchvision::nms does not exist" unless the missing operator
schemas are defined first (components/torchvision_compat.py does that).

`make install` runs `python -m defectops_torchvision_hook`, which writes `defectops-torchvision.pth` into the
environment's site-packages. Python runs that line at start-up: it only puts a small finder first on
sys.meta_path (no torch import). On the first `import torchvision` the finder takes itself out, imports
components.torchvision_compat (which patches only where the extension fails to load) and lets the normal
import go on. Where torchvision's extension loads, nothing changes.
"""

from __future__ import annotations

import importlib.abc
import sys
import sysconfig
from pathlib import Path

PTH = "defectops-torchvision.pth"


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):  # noqa: ARG002 - the finder protocol
        if name == "torchvision":
            try:
                sys.meta_path.remove(self)
            except ValueError:
                pass
            import components.torchvision_compat  # noqa: F401 - defines the schemas before torchvision loads
        return None  # the regular finders import it


def install() -> None:
    """Put the finder first on sys.meta_path (once; nothing when torchvision is already imported)."""
    if "torchvision" not in sys.modules and not any(isinstance(f, _Finder) for f in sys.meta_path):
        sys.meta_path.insert(0, _Finder())


def write_pth(site_packages: Path | None = None) -> Path:
    """Write the start-up hook into site-packages; returns its path."""
    target = Path(site_packages or sysconfig.get_paths()["purelib"]) / PTH
    target.write_text("import defectops_torchvision_hook; defectops_torchvision_hook.install()\n")
    return target


if __name__ == "__main__":
    print(f"wrote {write_pth()}")
