"""tests/algos.py, the table of per-algo and per-fixture facts, covers everything there is: every
algo a recipe registers (lazyxform.recipes.RECIPES) and every bundled fixture, each by name; and
each row says what its fixture's config says."""

from __future__ import annotations

import json
import re

import pytest
from algos import ALGOS, ALIASES, FIXTURE_DIR, FIXTURE_TABLE, REFUSED, SGLANG_SCHEME
from reference import hf_quant_algo

import lazyxform
from lazyxform.recipes import RECIPES


def test_every_registered_algo_has_a_row():
    missing = sorted(set(RECIPES) - set(ALGOS) - set(ALIASES))
    assert not missing, f"recipe algos with no row in tests/algos.py ALGOS (or ALIASES): {missing}"
    stale = sorted((set(ALGOS) | set(ALIASES)) - set(RECIPES))
    assert not stale, f"rows of tests/algos.py for algos no recipe registers: {stale}"


def test_every_algo_has_its_sglang_scheme():
    assert sorted(SGLANG_SCHEME) == sorted(ALGOS)


def test_an_alias_is_handled_by_its_algos_recipe():
    for alias, algo in ALIASES.items():
        assert algo in ALGOS and alias not in ALGOS, alias
        assert RECIPES[alias] is RECIPES[algo], alias


def test_every_algo_row_names_its_recipe_module_and_a_fixture_of_its_own():
    for algo, row in ALGOS.items():
        assert type(RECIPES[algo]).__module__ == f"lazyxform.recipes.{row.family}", algo
        assert FIXTURE_TABLE[row.fixture].algo == algo, (algo, row.fixture)


def test_every_fixture_directory_has_a_row():
    on_disk = {p.name for p in FIXTURE_DIR.iterdir() if p.is_dir()}
    missing = sorted(on_disk - set(FIXTURE_TABLE))
    assert not missing, f"fixtures with no row in tests/algos.py FIXTURE_TABLE: {missing}"
    stale = sorted(set(FIXTURE_TABLE) - on_disk)
    assert not stale, f"rows of tests/algos.py FIXTURE_TABLE with no fixture directory: {stale}"


def test_every_fixture_says_the_algo_its_row_names():
    for name, row in FIXTURE_TABLE.items():
        assert row.algo in ALGOS or row.algo in ALIASES, name
        assert hf_quant_algo(FIXTURE_DIR / name) == ("MIXED_PRECISION" if row.mixed_precision else row.algo), name
        assert lazyxform.read_modelopt_algos(FIXTURE_DIR / name) == {row.algo}, name
        assert json.loads((FIXTURE_DIR / name / "config.json").read_text())["model_type"] == row.model_type, name
        cfg, _ = lazyxform.read_modelopt_config(FIXTURE_DIR / name)
        assert cfg.kv_cache_algo == row.kv, name


@pytest.mark.parametrize("fixture", REFUSED)
def test_a_refused_fixture_is_refused_by_name(fixture):
    with pytest.raises(lazyxform.UnsupportedAlgoError, match=re.escape(FIXTURE_TABLE[fixture].refused)):
        lazyxform.open(FIXTURE_DIR / fixture, device="cpu")
