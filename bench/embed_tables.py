"""Copy the tables the bench scripts write (docs/results/*.md) into the docs, so no table is copied by hand.

In any docs/*.md, a block

    <!-- results: docs/results/NAME.md -->
    ...anything...
    <!-- /results -->

is rewritten to hold exactly the table of docs/results/NAME.md (the path is relative to the repository
root): that file's content without its first line when that line is the bench's header (the comment
`<!-- written by bench/X.py; do not edit -->`, or, in results recorded by hand with `tee`, the `$ command`
line, which the doc shows in its own code block), and without the blank lines around it; one blank line
after the opening marker and one before the closing marker. Markers inside fenced code blocks are text, not
blocks. Standard library only.

    python bench/embed_tables.py            # rewrite the docs in place, print each block that changed
    python bench/embed_tables.py --check    # change nothing; exit 1 listing every block out of sync with
                                            # its result file, or whose result file is missing
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path
from typing import NamedTuple

ROOT = Path(__file__).resolve().parents[1]
OPEN = re.compile(r"^<!--\s*results:\s*(\S+)\s*-->\s*$")
CLOSE = re.compile(r"^<!--\s*/results\s*-->\s*$")
HEADER = re.compile(r"^(<!--\s*written by .*-->|\$ .*)\s*$")
FENCE = re.compile(r"^\s{0,3}(```|~~~)")


class Block(NamedTuple):
    """One marked block: the result file it names, its marker lines (0-based) and the text between them."""

    source: str
    open_line: int
    close_line: int
    content: str


def blocks(text: str) -> list[Block]:
    """The marked blocks of a markdown text, in order. ValueError on an unclosed, nested or stray marker."""
    lines = text.splitlines(keepends=True)
    out: list[Block] = []
    start: int | None = None
    source = ""
    fence: str | None = None
    for i, line in enumerate(lines):
        bare = line.rstrip("\r\n")
        fenced = FENCE.match(bare)
        if fenced and start is None:
            fence = None if fence == fenced.group(1) else (fence or fenced.group(1))
            continue
        if fence is not None:
            continue
        if opened := OPEN.match(bare):
            if start is not None:
                raise ValueError(
                    f"line {i + 1}: results block opened inside the block opened on line {start + 1}"
                )
            start, source = i, opened.group(1)
        elif CLOSE.match(bare):
            if start is None:
                raise ValueError(f"line {i + 1}: '<!-- /results -->' without an opening marker")
            out.append(Block(source, start, i, "".join(lines[start + 1 : i])))
            start = None
    if start is not None:
        raise ValueError(f"line {start + 1}: results block for {source} is never closed")
    return out


def table(result: str) -> str:
    """A result file's text -> its table: without the bench's header line and the blank lines around it."""
    lines = result.strip("\n").splitlines()
    if lines and HEADER.match(lines[0]):
        lines = lines[1:]
    return "\n".join(lines).strip("\n")


def wanted(source: str, root: Path) -> str | None:
    """What a block naming `source` should hold (between its markers), or None when the file is missing."""
    path = root / source
    if not path.is_file():
        return None
    return f"\n{table(path.read_text(encoding='utf-8'))}\n\n"


def render(text: str, root: Path) -> str:
    """The text with every block's content replaced by its result file's table (a missing file: left as is)."""
    lines = text.splitlines(keepends=True)
    out: list[str] = []
    pos = 0
    for block in blocks(text):
        content = wanted(block.source, Path(root))
        if content is None:
            continue
        out += lines[pos : block.open_line + 1]
        out.append(content)
        pos = block.close_line
    return "".join(out + lines[pos:])


def check(text: str, root: Path) -> list[str]:
    """Problems of one text: each block whose result file is missing or whose content differs from it."""
    try:
        found = blocks(text)
    except ValueError as err:
        return [str(err)]
    problems = []
    for block in found:
        content = wanted(block.source, Path(root))
        if content is None:
            problems.append(f"line {block.open_line + 1}: {block.source} is missing")
        elif block.content != content:
            problems.append(f"line {block.open_line + 1}: block differs from {block.source}")
    return problems


def docs(root: Path) -> list[Path]:
    """The markdown files whose blocks are kept: docs/*.md (not docs/results/)."""
    return sorted((Path(root) / "docs").glob("*.md"))


def check_docs(root: Path) -> list[str]:
    """Problems of every doc, each prefixed with the doc's path relative to root."""
    root = Path(root)
    return [
        f"{doc.relative_to(root)}: {p}"
        for doc in docs(root)
        for p in check(doc.read_text(encoding="utf-8"), root)
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--check", action="store_true", help="change nothing; exit 1 if any block is out of sync"
    )
    parser.add_argument("--root", type=Path, default=ROOT, help="repository root (default: this script's)")
    args = parser.parse_args(argv)
    if args.check:
        problems = check_docs(args.root)
        for problem in problems:
            print(problem)
        print(f"{len(problems)} block(s) out of sync" if problems else "all results blocks in sync")
        return 1 if problems else 0
    failed = False
    for doc in docs(args.root):
        text = doc.read_text(encoding="utf-8")
        name = doc.relative_to(args.root)
        try:
            found = blocks(text)
        except ValueError as err:
            print(f"{name}: {err}", file=sys.stderr)
            failed = True
            continue
        for block in found:
            content = wanted(block.source, args.root)
            if content is None:
                print(f"{name}: line {block.open_line + 1}: {block.source} is missing; block left as is")
                failed = True
            elif content != block.content:
                print(f"{name}: line {block.open_line + 1}: updated from {block.source}")
        new = render(text, args.root)
        if new != text:
            doc.write_text(new, encoding="utf-8")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
