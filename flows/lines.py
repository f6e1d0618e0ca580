"""`defectops add-line NAME --data DIR`: register a product line in params.yaml.

The folder's layout is checked first (components.data.scan_line: train/good, test/<type>, masks), then the
name, the cron expression and the timezone; only then is params.yaml changed, and only by adding the line's
entry under `lines:` as text, so every comment of the file stays. The new file is loaded and validated as a
whole before it replaces the old one (written to a temporary name, then renamed): a refused line leaves
params.yaml as it was.

    defectops add-line cookie --data ../shared/datasets/cookie --cron "0 3 * * *" --timezone Europe/Berlin
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from pydantic import ValidationError

from components.config import NAME_PATTERN, ConfigError, LineConfig, load_config
from components.data import scan_line

_TOP_LEVEL = re.compile(r"^[A-Za-z_][\w-]*:")


def add_line(params: Path, name: str, data: Path, cron: str | None = None, timezone: str | None = None) -> dict:
    """Add `name` to params.yaml's `lines`; returns the entry written. ConfigError / DataError naming the
    file and the problem; params.yaml is untouched then."""
    params = Path(params)
    if not params.is_file():
        raise ConfigError(f"{params}: no such params file (run from the checkout, or pass --config)")
    if not NAME_PATTERN.fullmatch(name):
        raise ConfigError(f"product line name {name!r} must match {NAME_PATTERN.pattern}")
    cfg = load_config(params)
    if name in cfg.lines:
        raise ConfigError(f"{params}: line {name!r} is already in `lines` (data: {cfg.lines[name].data}); edit it there")
    split = scan_line(data)  # DataError naming the folder and what is missing
    if not split.train:
        raise ConfigError(f"{data}: train/good holds no image")
    entry: dict[str, str] = {"data": _relative_to(Path(data), params.parent)}
    if cron is not None:
        entry["cron"] = cron
    if timezone is not None:
        entry["timezone"] = timezone
    try:
        LineConfig(**entry)  # the timezone is checked here
    except ValidationError as exc:
        first = exc.errors()[0]
        raise ConfigError(f"lines.{name}.{'.'.join(map(str, first['loc']))}: {first['msg']}") from None
    if cron is not None:
        _check_cron(name, cron, timezone)

    text = params.read_text()
    new_text = _with_line(text, name, entry, params)
    tmp = params.with_name(f".{params.name}.add-line.tmp")
    try:
        tmp.write_text(new_text)
        load_config(tmp)  # the whole file, as the pipeline will read it
        os.replace(tmp, params)
    finally:
        tmp.unlink(missing_ok=True)
    return entry


def _relative_to(data: Path, base: Path) -> str:
    """The data path as params.yaml should hold it: paths in params.yaml are read relative to the file."""
    absolute = data.resolve()
    if not data.is_absolute():
        try:
            return os.path.relpath(absolute, base.resolve())
        except ValueError:  # another drive
            pass
    return str(absolute)


def _check_cron(name: str, cron: str, timezone: str | None) -> None:
    try:
        from flows.schedules import check_cron  # Prefect's own parser (the pipeline extra)
    except ModuleNotFoundError:
        if len(cron.split()) != 5:
            raise ConfigError(f"lines.{name}.cron = {cron!r}: expected 5 fields (minute hour day month weekday)") from None
        return
    check_cron(name, cron, timezone)


def _with_line(text: str, name: str, entry: dict[str, str], params: Path) -> str:
    """params.yaml's text with `name: entry` added under the top-level `lines:` key, comments kept."""
    lines = text.splitlines(keepends=True)
    at = [i for i, line in enumerate(lines) if re.match(r"^lines:", line)]
    if len(at) != 1:
        raise ConfigError(f"{params}: expected one top-level `lines:` key, found {len(at)}")
    i = at[0]
    body = "".join(f"    {key}: {json.dumps(value)}\n" for key, value in entry.items())
    block = f"  {name}:\n{body}"
    head = lines[i].split("#", 1)[0].strip()
    if head in ("lines: {}", "lines:{}", "lines: null", "lines: ~"):
        return "".join(lines[:i]) + "lines:\n" + block + "".join(lines[i + 1:])
    if head != "lines:":
        raise ConfigError(f"{params}: `lines:` is written inline ({head!r}); add the line there by hand")
    end = i + 1  # the block ends at the next top-level key (or the end of the file)
    while end < len(lines) and not _TOP_LEVEL.match(lines[end]):
        end += 1
    while end > i + 1 and not lines[end - 1].strip():  # keep blank lines after the block
        end -= 1
    before = "".join(lines[:end])
    if before and not before.endswith("\n"):
        before += "\n"
    return before + block + "".join(lines[end:])
