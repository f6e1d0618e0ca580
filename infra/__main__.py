"""``python -m infra {start,stop,status} [--root DIR] [--service NAME]``: the local services from a shell.

Prints names, pids, health and URLs; never the keys (they are in ROOT/credentials.json, mode 0600).
"""

from __future__ import annotations

import argparse
import logging
import sys
from dataclasses import replace
from pathlib import Path

from infra.services import ALL_SERVICES, ServicesConfig, start, status, stop


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m infra", description="Start, stop or inspect the local services.")
    parser.add_argument("action", choices=["start", "stop", "status"])
    parser.add_argument("--root", type=Path, default=Path(".defectops"))
    parser.add_argument("--service", action="append", choices=ALL_SERVICES, help="repeatable; default: all")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    cfg = replace(ServicesConfig(root=args.root), services=tuple(args.service or ALL_SERVICES))
    if args.action == "start":
        start(cfg)
    elif args.action == "stop":
        print("stopped:", ", ".join(stop(cfg)) or "nothing")
    for st in status(cfg):
        print(f"{st.name:10} pid={st.pid or '-':<8} alive={st.alive!s:5} healthy={st.healthy!s:5} {st.url}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
