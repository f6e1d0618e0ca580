"""Property tests (hypothesis) of the image loader and the config parser: whatever the bytes or values,
the loader returns RGB uint8 (H, W, 3) or raises DataError naming the file, and the config parser returns a
Config or raises ConfigError naming the file and the key's dotted path; nothing else escapes.

Modest example counts keep this at a few seconds; HYPOTHESIS_PROFILE=thorough runs 20x more.
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from PIL import Image

from components.config import Config, ConfigError, flatten, load_config, parse_override, validate
from components.data import DataError, load_image, load_mask

settings.register_profile("default", max_examples=40, deadline=None,
                          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
settings.register_profile("thorough", max_examples=800, deadline=None,
                          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))

FORMATS = {"PNG": ".png", "JPEG": ".jpg", "BMP": ".bmp", "TIFF": ".tif"}
MODES = ("L", "RGB", "RGBA", "P", "1", "LA", "I;16", "CMYK")


def _encode(arr: np.ndarray, mode: str, fmt: str) -> bytes:
    if mode == "CMYK" and fmt in ("PNG", "BMP"):  # neither format stores CMYK
        mode = "RGB"
    im = Image.fromarray(arr[..., 0] if arr.ndim == 3 else arr).convert("L")
    if mode == "I;16":
        im = Image.fromarray(arr[..., 0].astype(np.uint16) * 257) if arr.ndim == 3 else im
    elif mode != "L":
        im = Image.fromarray(arr).convert(mode) if arr.ndim == 3 else im.convert(mode)
    buf = io.BytesIO()
    if fmt == "JPEG" and im.mode not in ("L", "RGB", "CMYK"):
        im = im.convert("RGB")
    if fmt == "BMP" and im.mode in ("LA", "CMYK", "I;16"):
        im = im.convert("RGB")
    im.save(buf, format=fmt)
    return buf.getvalue()


images = arrays(np.uint8, st.tuples(st.integers(1, 24), st.integers(1, 24), st.just(3)))


@given(arr=images, mode=st.sampled_from(MODES), fmt=st.sampled_from(list(FORMATS)))
def test_valid_images_decode_to_rgb(tmp_path_factory, arr, mode, fmt):
    path = tmp_path_factory.mktemp("img") / f"x{FORMATS[fmt]}"
    path.write_bytes(_encode(arr, mode, fmt))
    out = load_image(path)
    assert out.dtype == np.uint8 and out.shape == (*arr.shape[:2], 3)


@st.composite
def damaged(draw):
    """A valid encoded image, then truncated, bit-flipped, spliced or replaced by random bytes."""
    arr, fmt = draw(images), draw(st.sampled_from(list(FORMATS)))
    data = bytearray(_encode(arr, draw(st.sampled_from(("L", "RGB"))), fmt))
    how = draw(st.sampled_from(("truncate", "flip", "splice", "random")))
    if how == "truncate":
        data = data[: draw(st.integers(0, max(0, len(data) - 1)))]
    elif how == "flip":
        for _ in range(draw(st.integers(1, 8))):
            i = draw(st.integers(0, len(data) - 1))
            data[i] ^= 1 << draw(st.integers(0, 7))
    elif how == "splice":
        i = draw(st.integers(0, len(data)))
        data[i:i] = draw(st.binary(min_size=1, max_size=64))
    else:
        data = bytearray(draw(st.binary(max_size=512)))
    return FORMATS[fmt], bytes(data)


@given(case=damaged())
def test_damaged_bytes_decode_or_raise_data_error(tmp_path_factory, case):
    ext, data = case
    path = tmp_path_factory.mktemp("bad") / f"damaged{ext}"
    path.write_bytes(data)
    try:
        out = load_image(path, max_pixels=1_000_000)
    except DataError as exc:
        assert exc.path == path and str(path) in str(exc) and exc.reason
    else:  # a flip in pixel data can leave a decodable image: then it must be a proper one
        assert out.dtype == np.uint8 and out.ndim == 3 and out.shape[2] == 3


@given(case=damaged(), hw=st.tuples(st.integers(1, 24), st.integers(1, 24)))
def test_damaged_masks_load_or_raise_data_error(tmp_path_factory, case, hw):
    ext, data = case
    path = tmp_path_factory.mktemp("mask") / f"m_mask{ext}"
    path.write_bytes(data)
    try:
        mask = load_mask(path, hw)
    except DataError as exc:
        assert exc.path == path and exc.reason
    else:
        assert mask.dtype == bool and mask.shape == hw


# ------------------------------------------------------------------------------------------------ config
LEAVES = sorted(flatten(Config().to_dict()))
values = st.one_of(st.none(), st.booleans(), st.integers(-10**6, 10**6), st.floats(allow_nan=True),
                   st.text(max_size=12), st.lists(st.integers(-5, 300), max_size=4),
                   st.dictionaries(st.text(max_size=5), st.integers(), max_size=2))
key_part = st.text(st.characters(codec="ascii", categories=("L", "N")), min_size=1, max_size=10)


def _nested(dotted: str, value) -> dict:
    out: dict = {}
    node = out
    parts = dotted.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value
    return out


@given(key=st.sampled_from(LEAVES), value=values)
def test_any_value_for_a_known_key_is_accepted_or_named(tmp_path_factory, key, value):
    path = tmp_path_factory.mktemp("cfg") / "params.yaml"
    path.write_text(yaml.safe_dump(_nested(key, value)))
    try:
        cfg = load_config(path)
    except ConfigError as exc:
        text = str(exc)
        assert text.startswith(str(path)) and key.split(".")[0] in text, text
        # pydantic may add the union member (e.g. `...pretrain_embed_dim.int`); the key path comes first.
        # A cross-field check (weights: 'file' needs weights_file) names its section and the key.
        section, leaf = key.rsplit(".", 1) if "." in key else ("", key)
        assert any(line.strip().startswith(key) or (line.strip().startswith(f"{section}:") and leaf in line)
                   for line in text.splitlines()[1:]), text
    else:
        assert isinstance(cfg, Config)


@given(section=st.sampled_from(sorted({k.rsplit(".", 1)[0] for k in LEAVES if "." in k})), extra=key_part,
       value=values)
def test_unknown_keys_are_rejected_with_their_path(tmp_path_factory, section, extra, value):
    if f"{section}.{extra}" in LEAVES or any(k.startswith(f"{section}.{extra}.") for k in LEAVES):
        return
    path = tmp_path_factory.mktemp("cfg") / "params.yaml"
    path.write_text(yaml.safe_dump(_nested(f"{section}.{extra}", value)))
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert f"{section}.{extra}" in str(info.value) and str(path) in str(info.value)


@given(text=st.text(max_size=200))
def test_any_params_text_loads_or_raises_config_error(tmp_path_factory, text):
    path = tmp_path_factory.mktemp("cfg") / "params.yaml"
    path.write_text(text, encoding="utf-8")
    try:
        assert isinstance(load_config(path), Config)
    except ConfigError as exc:
        assert str(path) in str(exc)


@given(text=st.text(max_size=60))
def test_any_override_parses_or_raises_config_error(text):
    try:
        key, _ = parse_override(text)
    except ConfigError as exc:
        assert "--set" in str(exc)
    else:
        assert key and "=" in text
        try:
            validate(_nested(key, _) if all(key.split(".")) else {key: _})
        except ConfigError as exc:
            assert "invalid configuration" in str(exc)


@given(name=st.one_of(st.text(max_size=20), st.sampled_from(["../../x", "a/b", "..", ".", "x/../y", "/etc", ""])))
def test_line_names_are_safe_or_refused(tmp_path_factory, name):
    try:
        cfg = validate({"lines": {name: {"data": "line"}}})
    except ConfigError as exc:
        assert "lines" in str(exc)
    else:  # an accepted name is one safe object-key part and one safe path part
        assert name in cfg.lines and "/" not in name and "\\" not in name and name not in (".", "..")
        assert not name.startswith(".") and Path(name).name == name
