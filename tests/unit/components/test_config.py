"""Tests for components.config: defaults, the repo's params.yaml, --set overrides, validation messages."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from components.config import Config, ConfigError, load_config, parse_override

REPO = Path(__file__).resolve().parents[3]


def write_params(tmp_path: Path, raw: dict) -> Path:
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_defaults_load() -> None:
    cfg = load_config()
    assert cfg == Config()
    assert cfg.data.image_size == (256, 256)
    assert cfg.detector.method == "patchcore"
    assert cfg.detector.patchcore.coreset_ratio == pytest.approx(0.1)
    assert cfg.lines == {}


def test_repo_params_yaml_loads_and_matches_its_text() -> None:
    path = REPO / "params.yaml"
    cfg = load_config(path)
    raw = yaml.safe_load(path.read_text())
    assert cfg.backbone.name == raw["backbone"]["name"]
    assert list(cfg.backbone.layers) == raw["backbone"]["layers"]
    assert cfg.detector.patchcore.coreset_ratio == raw["detector"]["patchcore"]["coreset_ratio"]
    assert set(cfg.lines) == set(raw.get("lines") or {})


@pytest.mark.parametrize(
    ("text", "key", "value"),
    [
        ("detector.patchcore.coreset_ratio=0.25", "detector.patchcore.coreset_ratio", 0.25),
        ("data.batch_size=8", "data.batch_size", 8),
        ("data.image_size=[128, 96]", "data.image_size", [128, 96]),
        ("backbone.allow_network=true", "backbone.allow_network", True),
        ("backbone.name=resnet18", "backbone.name", "resnet18"),
        ("backbone.weights_file=null", "backbone.weights_file", None),
        (" services.bucket = a=b", "services.bucket", "a=b"),  # only the first '=' splits
        ("services.bucket=", "services.bucket", ""),
    ],
)
def test_parse_override(text: str, key: str, value: object) -> None:
    assert parse_override(text) == (key, value)


@pytest.mark.parametrize("text", ["no_equals_sign", "=3", "data.batch_size=[1, 2"])
def test_parse_override_rejects_malformed(text: str) -> None:
    with pytest.raises(ConfigError, match="--set"):
        parse_override(text)


def test_overrides_apply_with_types() -> None:
    cfg = load_config(None, ["data.image_size=[128, 96]", "detector.patchcore.pretrain_embed_dim=auto",
                             "backbone.allow_network=true", "detector.patchcore.coreset_ratio=0.5",
                             "backbone.layers=[1]"])
    assert cfg.data.image_size == (128, 96)
    assert cfg.detector.patchcore.pretrain_embed_dim == "auto"
    assert cfg.backbone.allow_network is True
    assert cfg.detector.patchcore.coreset_ratio == 0.5
    assert cfg.backbone.layers == (1,)


def test_overrides_win_over_the_file(tmp_path: Path) -> None:
    path = write_params(tmp_path, {"data": {"batch_size": 3}})
    assert load_config(path).data.batch_size == 3
    assert load_config(path, ["data.batch_size=5"]).data.batch_size == 5


@pytest.mark.parametrize(
    ("override", "dotted", "reason"),
    [
        ("detector.patchcore.no_such_key=1", "detector.patchcore.no_such_key", "Extra inputs"),
        ("data.batch_size=many", "data.batch_size", "integer"),
        ("data.batch_size=0", "data.batch_size", "greater than 0"),
        ("detector.patchcore.coreset_ratio=1.5", "detector.patchcore.coreset_ratio", "less than or equal"),
        ("threshold.false_reject_rate=0.9", "threshold.false_reject_rate", "less than or equal"),
        ("data.resize=stretch", "data.resize", "resize"),
        ("backbone.weights=file", "backbone", "weights_file"),
    ],
)
def test_invalid_values_name_the_key_path(override: str, dotted: str, reason: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(None, [override])
    message = str(info.value)
    assert dotted in message
    assert reason in message
    assert "Traceback" not in message


def test_error_names_the_file(tmp_path: Path) -> None:
    path = write_params(tmp_path, {"data": {"batch_size": -1}})
    with pytest.raises(ConfigError, match=f"{path}.*\n.*data.batch_size"):
        load_config(path)


def test_unreadable_and_non_mapping_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "list.yaml"
    bad.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(bad)
    broken = tmp_path / "broken.yaml"
    broken.write_text("data: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(broken)


def test_set_refuses_to_descend_into_a_value() -> None:
    with pytest.raises(ConfigError, match="data.batch_size is not a section"):
        load_config(None, ["data.batch_size=3", "data.batch_size.x=1"])
    with pytest.raises(ConfigError, match="data.batch_size"):  # no value to descend into: still named
        load_config(None, ["data.batch_size.x=1"])


def test_frozen() -> None:
    cfg = load_config()
    with pytest.raises(Exception, match="frozen"):
        cfg.data.batch_size = 3  # type: ignore[misc]


def test_lines_paths_resolved_and_overrides_applied(tmp_path: Path) -> None:
    path = write_params(tmp_path, {
        "detector": {"patchcore": {"coreset_ratio": 0.1}},
        "lines": {
            "cookie": {"data": "data/cookie", "overrides": {"detector": {"patchcore": {"coreset_ratio": 0.02}},
                                                             "data": {"image_size": [128, 128]}}},
            "pcb": {"data": "/abs/pcb"},
        },
    })
    cfg = load_config(path)
    assert cfg.lines["cookie"].data == tmp_path / "data" / "cookie"
    assert cfg.lines["pcb"].data == Path("/abs/pcb")
    cookie = cfg.for_line("cookie")
    assert cookie.detector.patchcore.coreset_ratio == pytest.approx(0.02)
    assert cookie.data.image_size == (128, 128)
    assert cfg.detector.patchcore.coreset_ratio == pytest.approx(0.1)  # the base is untouched
    assert cfg.for_line("pcb") == cfg
    with pytest.raises(ConfigError, match="unknown product line 'nope'"):
        cfg.for_line("nope")


def test_bad_line_override_names_the_line(tmp_path: Path) -> None:
    path = write_params(tmp_path, {"lines": {"cookie": {"data": "x", "overrides": {"data": {"batch_size": 0}}}}})
    cfg = load_config(path)
    with pytest.raises(ConfigError, match=r"lines\.cookie\.overrides(.|\n)*data\.batch_size"):
        cfg.for_line("cookie")


def test_bad_line_name_rejected(tmp_path: Path) -> None:
    path = write_params(tmp_path, {"lines": {"bad name/..": {"data": "x"}}})
    with pytest.raises(ConfigError, match="lines"):
        load_config(path)


def test_digest_follows_model_params_not_services() -> None:
    base = load_config()
    assert base.digest() == load_config().digest()
    assert len(base.digest()) == 64
    assert load_config(None, ["detector.patchcore.coreset_ratio=0.2"]).digest() != base.digest()
    assert load_config(None, ["backbone.layers=[1, 2]"]).digest() != base.digest()
    assert load_config(None, ["data.image_size=[224, 224]"]).digest() != base.digest()
    assert load_config(None, ["services.s3_port=9000", "services.bucket=other"]).digest() == base.digest()
    assert load_config(None, ["lines.cookie.data=/x"]).digest() == base.digest()


def test_packaged_defaults_are_what_params_yaml_ships():
    """One source of defaults: run outside the checkout (no params.yaml), `defectops fit --set
    detector.method=dinomaly` must behave as it does inside it. Every setting params.yaml writes equals the
    typed default, except the product lines it lists."""
    from pathlib import Path

    shipped = load_config(Path(__file__).resolve().parents[3] / "params.yaml").to_dict()
    packaged = load_config(None).to_dict()

    def differences(a, b, where=""):
        if isinstance(a, dict) and isinstance(b, dict):
            for key in sorted(set(a) | set(b)):
                yield from differences(a.get(key, "<absent>"), b.get(key, "<absent>"), f"{where}.{key}".lstrip("."))
        elif a != b:
            yield f"{where}: packaged {a!r}, params.yaml {b!r}"

    shipped.pop("lines", None)
    packaged.pop("lines", None)
    assert list(differences(packaged, shipped)) == []
