"""The method registry: lookups, defaults, and the README's method table rendered from it."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from epikv_triton.config import EpiKVConfig
from epikv_triton.scoring import Method, evicting_methods, lookup, method_names, readme_table, register
from epikv_triton.scoring.baselines import PositionScorer
from tests.methods import registered

ROOT = Path(__file__).resolve().parents[1]


def test_readme_method_table_is_the_registry_rendering():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert readme_table() in readme, (
        "README.md's method table differs from the registry: replace it with the output of "
        "`python -m epikv_triton.scoring --readme-table`"
    )


def test_docs_define_every_built_in_method():
    method_doc = (ROOT / "docs" / "method.md").read_text(encoding="utf-8")
    missing = [name for name in method_names() if not re.search(rf"`{name}`", method_doc)]
    assert not missing, f"docs/method.md does not define {missing}"


def test_built_ins_in_order_and_only_full_keeps_everything():
    assert method_names() == (
        "epikv", "epikv_flat", "kv", "lag_kv", "full", "streaming", "random", "knorm", "h2o", "keydiff", "tova",
        "snapkv", "rkv",
    )
    assert evicting_methods() == tuple(name for name in method_names() if name != "full")
    assert [name for name in method_names() if lookup(name).uses_bands] == ["epikv", "epikv_flat", "kv"]


def test_unknown_and_duplicate_names_are_refused_with_the_known_ones():
    with pytest.raises(ValueError, match="method must be one of epikv, epikv_flat, kv, .*, rkv; got 'pyramidkv'"):
        lookup("pyramidkv")
    with pytest.raises(ValueError, match=r"got \['epikv'\]"):
        EpiKVConfig(method=["epikv"])
    with pytest.raises(ValueError, match="'streaming' is already registered"):
        register(Method("streaming", "the most recent tokens", "positions", lambda config, num_layers: None))
    assert lookup("streaming").keeps.startswith("the first `sink` tokens")


def test_a_method_without_bands_has_no_default_bands():
    with pytest.raises(ValueError, match="'h2o' scores without layer bands"):
        EpiKVConfig(method="h2o").resolve_bands(32)
    with pytest.raises(ValueError, match="method 'h2o' has none: pass method='epikv'"):
        EpiKVConfig(method="h2o", bands=([1], [2]))


def test_a_registered_method_is_validated_rendered_and_removed_after():
    newest = Method(
        "newest_only", "the most recent tokens", "positions", lambda config, num_layers: PositionScorer(),
        weights=(2.0, 0.5),
    )
    with registered(newest):
        config = EpiKVConfig(method="newest_only", budget=16)
        assert (config.evicts, config.uses_bands, config.weights) == (True, False, (2.0, 0.5))
        assert "newest_only" in evicting_methods()
        assert readme_table().endswith("| `newest_only` | the most recent tokens | positions |\n")
        with pytest.raises(ValueError, match=r"one of epikv, .*, rkv, newest_only; got 'nope'"):
            EpiKVConfig(method="nope")
    assert "newest_only" not in method_names()
    with pytest.raises(ValueError, match="method must be one of"):
        EpiKVConfig(method="newest_only")
