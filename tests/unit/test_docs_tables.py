"""bench/embed_tables.py: result tables copied into the docs between markers, and the repo's docs in sync."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def load_embed_tables():
    """bench/ is not a package: load the script as a module from its file."""
    spec = importlib.util.spec_from_file_location("embed_tables", ROOT / "bench" / "embed_tables.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


et = load_embed_tables()

TABLE = "| a | b |\n|---|---|\n| 1 | 2 |"
DOC = """# Title

Prose before, kept.

<!-- results: docs/results/demo.md -->
| a | b |
|---|---|
| 1 | 9 |
<!-- /results -->

Prose between, kept.

```markdown
<!-- results: docs/results/in_a_fence.md -->
not a block: inside a code fence
<!-- /results -->
```

<!-- results: docs/results/gone.md -->
stale text kept while the file is missing
<!-- /results -->
Prose after, kept.
"""


def write_result(root: Path, name: str, text: str) -> None:
    path = root / "docs" / "results" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")


def test_render_replaces_blocks_and_keeps_the_rest(tmp_path):
    write_result(tmp_path, "demo.md", f"<!-- written by bench/demo.py; do not edit -->\n\n{TABLE}\n\n")
    found = et.blocks(DOC)
    assert [b.source for b in found] == ["docs/results/demo.md", "docs/results/gone.md"]

    out = et.render(DOC, tmp_path)
    expected_block = f"<!-- results: docs/results/demo.md -->\n\n{TABLE}\n\n<!-- /results -->\n"
    assert expected_block in out
    assert "| 1 | 9 |" not in out
    assert "written by" not in out
    before, after = (
        DOC.split("<!-- results: docs/results/demo.md -->")[0],
        DOC.split("<!-- /results -->", 1)[1],
    )
    assert out.startswith(before)
    assert out.endswith(after)  # the fenced example and the block of a missing file are untouched
    assert et.render(out, tmp_path) == out  # idempotent

    problems = et.check(out, tmp_path)
    assert len(problems) == 1 and "docs/results/gone.md" in problems[0] and "missing" in problems[0]
    assert len(et.check(DOC, tmp_path)) == 2  # plus the stale demo block

    write_result(tmp_path, "gone.md", "$ python bench/gone.py\ncaption\n" + TABLE + "\n")
    (tmp_path / "docs" / "x.md").write_text(out, encoding="utf-8")
    assert len(et.check_docs(tmp_path)) == 1
    assert et.main(["--root", str(tmp_path)]) == 0
    assert et.check_docs(tmp_path) == []
    assert f"<!-- results: docs/results/gone.md -->\n\ncaption\n{TABLE}\n\n<!-- /results -->" in (
        tmp_path / "docs" / "x.md"
    ).read_text(encoding="utf-8")
    assert et.main(["--root", str(tmp_path), "--check"]) == 0


@pytest.mark.parametrize(
    "text",
    [
        "<!-- results: docs/results/a.md -->\nno end\n",
        "x\n<!-- /results -->\n",
        "<!-- results: a.md -->\n<!-- results: b.md -->\n<!-- /results -->\n",
    ],
)
def test_malformed_markers_are_reported(text, tmp_path):
    with pytest.raises(ValueError):
        et.blocks(text)
    assert len(et.check(text, tmp_path)) == 1


def test_repo_docs_in_sync_with_their_result_files():
    assert et.check_docs(ROOT) == []
    assert len(et.blocks((ROOT / "docs" / "patchcore.md").read_text(encoding="utf-8"))) >= 5
