"""EpiKVConfig saved and loaded as JSON, and the zero weight a calibrated config may carry."""

from __future__ import annotations

import json

import pytest

from epikv_triton.config import JSON_FORMAT, JSON_VERSION, EpiKVConfig

CONFIGS = [
    EpiKVConfig(),
    EpiKVConfig(budget=300, method="h2o", recent=7, keep_prompt=False, evict_every=16, sink=2, seed=9),
    EpiKVConfig(budget=1024, method="epikv", bands=([9, 7, 8], [20]), weights=(0.1 + 0.2, -1 / 3), window=32),
    EpiKVConfig(method="epikv", bands=((), (3, 4)), weights=(0.0, 1.0)),
]


@pytest.mark.parametrize("config", CONFIGS, ids=["default", "h2o", "bands", "one-band"])
def test_json_round_trip_is_exact(config, tmp_path):
    assert EpiKVConfig.from_json(config.to_json()) == config
    path = tmp_path / "config.json"
    config.save(path)
    loaded = EpiKVConfig.load(path)
    assert loaded == config
    assert loaded.weights == config.weights and all(isinstance(w, float) for w in loaded.weights)


def test_the_file_names_its_format_and_version_and_every_setting():
    document = json.loads(EpiKVConfig(budget=64, method="epikv").to_json())
    assert document["format"] == JSON_FORMAT and document["version"] == JSON_VERSION == 1
    assert document["settings"]["budget"] == 64 and document["settings"]["recent"] == 16
    assert document["settings"]["bands"] is None and document["settings"]["weights"] == [1.29, 1.0]


def test_missing_settings_take_their_defaults():
    text = json.dumps({"format": JSON_FORMAT, "version": 1, "settings": {"budget": 64, "method": "knorm"}})
    assert EpiKVConfig.from_json(text) == EpiKVConfig(budget=64, method="knorm")


def saved(**changes) -> str:
    document = {"format": JSON_FORMAT, "version": 1, "settings": {"budget": 64}}
    document.update(changes)
    return json.dumps(document)


@pytest.mark.parametrize(
    "text, match",
    [
        ("{budget: 64", "must be JSON"),
        ("[1, 2]", "not an EpiKVConfig file"),
        (json.dumps({"version": 1, "settings": {}}), "not an EpiKVConfig file"),
        (saved(version=2), "version 2 is not supported.*a newer file needs a newer epikv_triton"),
        (saved(version="1"), "version '1' is not supported"),
        (saved(settings=[64]), 'needs a "settings" object'),
        (saved(settings={"budget": 64, "budjet": 32}), r"unknown EpiKVConfig settings \['budjet'\]"),
        (saved(settings={"budget": 0}), "budget must be a positive int"),
        (saved(settings={"method": "epikv", "bands": [[1, 2.0], [3]]}), "non-negative layer indices"),
        (saved(settings={"method": "no_such_method"}), "method must be one of"),
    ],
)
def test_bad_files_raise_saying_what_is_wrong(text, match):
    with pytest.raises(ValueError, match=match):
        EpiKVConfig.from_json(text)


def test_a_band_may_be_empty_only_when_its_weight_is_zero():
    config = EpiKVConfig(method="epikv", bands=([2], []), weights=(-0.5, 0))
    assert config.bands == ((2,), ()) and config.weights == (-0.5, 0.0)
    assert config.resolve_bands(3) == ((2,), ())
    with pytest.raises(ValueError, match="non-empty.*a band may be empty only when its weight is 0"):
        EpiKVConfig(method="epikv", bands=([2], []), weights=(1.0, 0.5))
    with pytest.raises(ValueError, match="weights must not both be 0"):
        EpiKVConfig(method="epikv", bands=([1], [2]), weights=(0, 0))
