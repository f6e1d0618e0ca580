"""The markdown tables the bench scripts print (imported by them as `mdtable`: bench/ is their sys.path[0])."""

from __future__ import annotations


def cell(value, spec: str) -> str:
    """One formatted value; "-" where it is missing."""
    return "-" if value is None else format(value, spec)


def markdown(cells: list[list[str]]) -> str:
    """cells: the header row, then the data rows, all strings -> a markdown table, columns padded."""
    widths = [max(len(row[i]) for row in cells) for i in range(len(cells[0]))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) + " |" for row in cells]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def table(rows: list[dict], cols: list[tuple[str, str, str]]) -> str:
    """rows (dicts) with cols [(key, header, format spec)] -> `markdown`, missing values as "-"."""
    return markdown([[h for _, h, _ in cols]] + [[cell(r.get(k), f) for k, _, f in cols] for r in rows])
