"""Every shipped recipe loads into the config of the command it names in its file name, as is."""

from pathlib import Path

import pytest

RECIPES = Path(__file__).parent.parent / "recipes"


@pytest.mark.parametrize("recipe", sorted(RECIPES.glob("*-hybridize-*.yaml")), ids=lambda p: p.name)
def test_hybridize_recipes_are_valid(recipe):
    from effconv.hybridize import HybridizeConfig
    from effconv.recipes import build_config

    cfg = build_config(HybridizeConfig, recipe, {})
    cfg.validate()
    assert cfg.out.startswith("out/")
    assert cfg.ratio is not None and 0 < cfg.ratio < 1


def test_there_is_a_recipe_per_issue_target():
    names = {p.name for p in RECIPES.glob("*.yaml")}
    for expected in ("smollm2-135m-linearize-w64.yaml", "smollm2-135m-linearize-w0.yaml",
                     "smollm2-135m-hybridize-r25.yaml"):
        assert expected in names


@pytest.mark.parametrize("recipe", sorted(RECIPES.glob("*-linearize-*.yaml")), ids=lambda p: p.name)
def test_linearize_recipes_are_valid(recipe):
    from effconv.linearize import LinearizeConfig
    from effconv.recipes import build_config

    cfg = build_config(LinearizeConfig, recipe, {})
    cfg.validate()
    assert cfg.out.startswith("out/") and cfg.stage1_tokens > 0


@pytest.mark.parametrize("recipe", sorted(RECIPES.glob("*-moe*.yaml")), ids=lambda p: p.name)
def test_moe_recipes_are_valid(recipe):
    from effconv.moe_upcycle import MoeUpcycleConfig
    from effconv.recipes import build_config

    cfg = build_config(MoeUpcycleConfig, recipe, {})
    cfg.validate()
    assert cfg.out.startswith("out/") and cfg.experts == 8 and cfg.top_k == 2
