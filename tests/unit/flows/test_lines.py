"""`defectops add-line`: a line added to params.yaml after its folder, cron and timezone are checked, every
comment kept, and nothing changed when it is refused."""

from __future__ import annotations

from pathlib import Path

import pytest

from components.config import load_config
from flows.cli import main

ROOT = Path(__file__).resolve().parents[3]


@pytest.fixture
def params(tmp_path: Path) -> Path:
    path = tmp_path / "conf" / "params.yaml"
    path.parent.mkdir()
    path.write_text((ROOT / "params.yaml").read_text())
    return path


def test_adds_lines_and_keeps_every_comment(params: Path, tiny_line: Path, capsys, monkeypatch) -> None:
    before = params.read_text()
    assert main(["add-line", "tiny", "--data", str(tiny_line), "--config", str(params),
                 "--cron", "30 2 * * 1-5", "--timezone", "Europe/Berlin"]) == 0
    assert "added line 'tiny'" in capsys.readouterr().out
    monkeypatch.chdir(tiny_line.parent)  # a relative --data is stored relative to the params file
    assert main(["add-line", "second", "--data", tiny_line.name, "--config", str(params)]) == 0
    cfg = load_config(params)
    assert list(cfg.lines) == ["tiny", "second"]
    assert cfg.lines["tiny"].data.resolve() == tiny_line.resolve()
    assert (cfg.lines["tiny"].cron, cfg.lines["tiny"].timezone) == ("30 2 * * 1-5", "Europe/Berlin")
    assert cfg.lines["second"].cron == "0 3 * * *"
    after = params.read_text().splitlines()
    kept = [line for line in before.splitlines() if line != "lines: {}"]
    assert [line for line in after if line in set(kept)] == kept  # every other line, in order
    assert f'data: "../{tiny_line.name}"' in params.read_text()
    assert cfg.lines["second"].data.resolve() == tiny_line.resolve()


@pytest.mark.parametrize("args, message", [
    (["--data", "{missing}"], "product line folder not found"),
    (["--data", "{line}", "--timezone", "Mars/Base"], "lines.new.timezone: Value error, unknown timezone 'Mars/Base'"),
    (["--data", "{line}", "--cron", "61 * * * *"], "not a valid cron"),
    (["--data", "{line}", "--cron", "0 3 * *"], "cron"),
])
def test_refusals_name_the_problem_and_change_nothing(params: Path, tiny_line: Path, args, message, capsys) -> None:
    before = params.read_bytes()
    argv = ["add-line", "new", *[a.format(missing=tiny_line.parent / "nope", line=tiny_line) for a in args],
            "--config", str(params)]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in " ".join(err.split()) and "Traceback" not in err
    assert params.read_bytes() == before and sorted(p.name for p in params.parent.iterdir()) == ["params.yaml"]


def test_an_existing_or_unsafe_name_is_refused(params: Path, tiny_line: Path, capsys) -> None:
    assert main(["add-line", "tiny", "--data", str(tiny_line), "--config", str(params)]) == 0
    before = params.read_bytes()
    assert main(["add-line", "tiny", "--data", str(tiny_line), "--config", str(params)]) == 2
    assert "already in `lines`" in capsys.readouterr().err
    assert main(["add-line", "../evil", "--data", str(tiny_line), "--config", str(params)]) == 2
    assert "must match" in capsys.readouterr().err
    assert params.read_bytes() == before
