"""Every shipped recipe loads into the config of the command it names in its file name, as is."""

from pathlib import Path

import pytest
from conftest import load_bench_script

RECIPES = Path(__file__).parent.parent / "recipes"


@pytest.mark.parametrize("recipe", sorted(RECIPES.glob("*-hybridize-*.yaml")), ids=lambda p: p.name)
def test_hybridize_recipes_are_valid(recipe):
    from effconv.pipelines.hybridize import HybridizeConfig
    from effconv.config import build_config

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
    from effconv.pipelines.linearize import LinearizeConfig
    from effconv.config import build_config

    cfg = build_config(LinearizeConfig, recipe, {})
    cfg.validate()
    assert cfg.out.startswith("out/") and cfg.stage1_tokens > 0


@pytest.mark.parametrize("recipe", sorted(RECIPES.glob("*-moe*.yaml")), ids=lambda p: p.name)
def test_moe_recipes_are_valid(recipe):
    from effconv.pipelines.moe_upcycle import MoeUpcycleConfig
    from effconv.config import build_config

    cfg = build_config(MoeUpcycleConfig, recipe, {})
    cfg.validate()
    assert cfg.out.startswith("out/") and 1 <= cfg.top_k < cfg.experts


def test_bench_report_counts_the_tokens_actually_trained():
    """A stage cut by its wall-clock budget reports what it trained, not what the recipe asked for."""
    trained_tokens = load_bench_script("recipes").trained_tokens
    lin = {"settings": {"stage1_tokens": 20_000_000, "stage2_tokens": 1_500_000},
           "metadata": {"metrics": {"stage1": {"tokens": 9_977_856, "cut_by_time": True},
                                    "stage2": {"tokens": 1_507_328, "cut_by_time": False}}}}
    assert trained_tokens(lin) == ([9_977_856, 1_507_328], [20_000_000, 1_500_000], True)
    moe = {"settings": {"tokens": 20_000_000},
           "metadata": {"metrics": {"distillation": {"tokens": 8_847_360, "cut_by_time": True}}}}
    assert trained_tokens(moe) == ([8_847_360], [20_000_000], True)
    step0 = {"settings": {"tokens": 0}, "metadata": {"metrics": {}}}
    assert trained_tokens(step0) == ([0], [0], False)


def test_bench_plot_of_stage2_length(tmp_path):
    """bench/recipes.py plot: one series per command/ratio/window/loss, points sorted by stage-2 tokens, a PNG."""
    import json

    bench = load_bench_script("recipes")

    def record(command, window, stage2, prose, ce_weight=1.0):
        settings = {"stage1_tokens": 10_000_000, "stage2_tokens": stage2, "window": window, "ratio": 0.25,
                    "ce_weight": ce_weight}
        metrics = {"stage1": {"tokens": 9_000_000}, "stage2": {"tokens": stage2}, "stage2_val_ppl": 3.0,
                   "teacher_val_ppl": 4.0}
        return {"command": command, "settings": settings, "metadata": {"metrics": metrics},
                "prose": {"perplexity": prose}, "reference_prose": {"perplexity": 20.0}}

    log = tmp_path / "runs.jsonl"
    rows = [record("linearize", 64, 4_000_000, 25.0), record("linearize", 64, 1_500_000, 24.0),
            record("hybridize", 128, 1_500_000, 22.0), record("hybridize", 128, 1_500_000, 21.0, ce_weight=0.0),
            {"command": "moe-upcycle", "settings": {"tokens": 1}, "metadata": {}, "prose": {}, "reference_prose": {}}]
    log.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    points = bench.plot([log], tmp_path / "p.png", exclude=("KL",))
    assert (tmp_path / "p.png").stat().st_size > 1000
    assert set(points) == {"linearize, window 64", "hybridize r25, window 128"}
    assert points["linearize, window 64"] == [(1_500_000, 9_000_000, 1.2, 0.75), (4_000_000, 9_000_000, 1.25, 0.75)]
    assert "hybridize r25, window 128, KL stage 2" in bench.stage2_points([log])


def test_bench_plot_of_moe_runs(tmp_path):
    """bench/recipes.py plot-moe: before / after / prose ratios of moe-upcycle records only, with trained tokens."""
    import json

    bench = load_bench_script("recipes")
    moe = {"command": "moe-upcycle", "name": "moe-x", "settings": {"tokens": 2_000_000},
           "metadata": {"metrics": {"upcycled_val_ppl": 400.0, "distilled_val_ppl": 8.0, "teacher_val_ppl": 4.0,
                                    "distillation": {"tokens": 1_500_000}}},
           "prose": {"perplexity": 60.0}, "reference_prose": {"perplexity": 20.0}}
    other = {"command": "linearize", "settings": {}, "metadata": {}, "prose": {}, "reference_prose": {}}
    log = tmp_path / "runs.jsonl"
    log.write_text(json.dumps(moe) + "\n" + json.dumps(other) + "\n")
    pts = bench.plot_moe([log], tmp_path / "m.png")
    assert pts == [("moe-x (1.5M)", 100.0, 2.0, 3.0)]
    assert (tmp_path / "m.png").stat().st_size > 1000


def test_switch_pairs_override_a_recipe_both_ways(tmp_path):
    """Every boolean setting has a pair of switches: `--no-gate` turns off a recipe's `gate: true`, `--decay`
    turns on what the recipe leaves off, and no switch keeps the recipe's value."""
    import typer
    from typer.testing import CliRunner

    from effconv.cli import add_command
    from effconv.pipelines.linearize import LinearizeConfig

    recipe = tmp_path / "r.yaml"
    recipe.write_text("gate: true\nlinear_rope: false\n")
    seen = []
    app = typer.Typer()
    app.callback()(lambda: None)
    add_command(app, "linearize", LinearizeConfig, seen.append, "test")
    runner = CliRunner()
    for args, gate, decay, rope in ((["--no-gate", "--decay"], False, True, False), ([], True, False, False),
                                    (["--linear-rope"], True, False, True)):
        result = runner.invoke(app, ["linearize", "--recipe", str(recipe), *args])
        assert result.exit_code == 0, result.output
        cfg = seen[-1]
        assert (cfg.gate, cfg.decay, cfg.linear_rope) == (gate, decay, rope), args
