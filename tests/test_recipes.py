"""The paper-table recipes of ``python/``: their method lists, and the shared harness end
to end on the tiny model (tune, cache, accuracy per decode mode, timing, JSON and PNG)."""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "python"))

experiments = importlib.import_module("paper_experiments")
TABLES = ["table1_methods", "table3_candidates", "table4_pia_ablation", "table5_skip_number"]
SMOLLM2_LAYERS = 30
TINY = [
    "--model",
    "tiny",
    "--train",
    "16",
    "--held-out",
    "8",
    "--test",
    "6",
    "--timing-prompts",
    "2",
    "--timing-tokens",
    "3",
]


@pytest.mark.parametrize("table", TABLES)
def test_table_methods_are_valid_rows_for_smollm2(table):
    methods = importlib.import_module(table).METHODS
    assert len({m.name for m in methods}) == len(methods)
    for method in methods:
        method.plan(SMOLLM2_LAYERS)  # validated by SkipPlan
        assert method.mode in ("eager", "merge")
        if method.candidates is not None:
            assert 0 < method.k < SMOLLM2_LAYERS


def test_table4_last_two_rows_share_one_tuned_model():
    methods = importlib.import_module("table4_pia_ablation").METHODS
    args = experiments.options("", [])
    keys = [json.dumps(experiments._key(m, args), sort_keys=True) for m in methods]
    assert keys[2] == keys[3] and len(set(keys)) == 3


def test_harness_tunes_caches_measures_and_reports(tmp_path, capsys):
    methods = [
        experiments.Method("LaVIN-style", mode="eager"),
        experiments.Method("EAS-2", candidates="mha", k=2),
        experiments.Method("EAS-2 plan", plan_from="EAS-2"),
        experiments.Method(
            "running", skipped=(2, 3, 4), plan_options=(("state", "running"),), mode="eager"
        ),
        experiments.Method("frozen eager", skipped=(2, 3, 4), mode="eager"),
        experiments.Method("frozen merged", skipped=(2, 3, 4), mode="merge"),
    ]
    argv = [*TINY, "--out", str(tmp_path)]
    report = experiments.run_table("tiny", "tiny table", methods, argv, {"source": "none"})
    rows = {row["name"]: row for row in report["rows"]}
    assert set(rows) == {m.name for m in methods}
    assert rows["EAS-2"]["skipped_mhas"] and len(rows["EAS-2"]["skipped_mhas"]) == 2
    assert rows["EAS-2 plan"]["skipped_mhas"] == rows["EAS-2"]["skipped_mhas"]
    assert rows["EAS-2 plan"]["folder"] != rows["EAS-2"]["folder"]
    assert rows["running"]["plan"]["state"] == "running"
    assert rows["frozen eager"]["folder"] == rows["frozen merged"]["folder"]
    assert rows["LaVIN-style"]["trainable_params"] < rows["frozen eager"]["trainable_params"]
    for row in rows.values():
        assert 0.0 <= row["accuracy"] <= 1.0
        assert row["ms_per_token"] > 0 and row["floor_ms_per_token"] > 0
    assert (tmp_path / "tiny.png").stat().st_size > 0
    saved = json.loads((tmp_path / "tiny.json").read_text())
    assert saved["rows"] == report["rows"] and "| frozen merged |" in saved["markdown"]
    results = sorted((tmp_path / "methods").glob("*/result.json"))
    assert len(results) == 5  # six rows, five tuned models
    capsys.readouterr()
    again = experiments.run_table("tiny", "tiny table", methods, argv, {"source": "none"})
    assert "tuning (" not in capsys.readouterr().out  # every row came from the cache
    assert [r["accuracy"] for r in again["rows"]] == [r["accuracy"] for r in report["rows"]]
    assert len(sorted((tmp_path / "methods").glob("*/result.json"))) == 5


SEARCH_QUALITY_TINY = ["--model", "tiny", "--train", "16", "--test", "4"]
SEARCH_QUALITY_TINY += ["--search-batch", "6", "--validation", "6"]


def test_search_quality_recipe_compares_every_estimator_with_the_baselines(tmp_path):
    recipe = importlib.import_module("search_quality")
    report = recipe.main(
        SEARCH_QUALITY_TINY
        + ["--ks", "2", "--seeds", "0", "1", "--budget", "10"]
        + ["--random", "5", "--finetune-seeds", "1", "--finetune-k", "2"]
        + ["--out", str(tmp_path)]
    )
    names = sorted(recipe.ESTIMATORS)
    assert [row["seed"] for row in report["rows"]] == [0, 1]
    for row in report["rows"]:
        assert set(row["estimators"]) == set(names)
        for name, result in row["estimators"].items():
            assert len(result["plan"]) == 2 and 0 <= result["beats_random"] <= 1
            assert result["passes"] <= {"loo": 6, "cosine": 1}.get(name, 10)
        assert len(row["random"]["validation_losses"]) == 5
        assert -1 <= row["random"]["spearman_search_vs_validation"] <= 1
        assert len(row["best_window"]["all"]) == 6 - 2 + 1 - (6 - 2) // 2  # the deeper half
    finetuned = report["rows"][1]["finetuned"]
    assert {*names, "best window", "best random"} == set(finetuned)
    assert all(0 <= r["test_accuracy"] <= 1 for r in finetuned.values())
    methods = {entry["method"] for entry in report["summary"]}
    assert methods == {*names, "best window", "best random"}
    assert all(entry["jaccard"] is not None for entry in report["summary"])
    # one shared workload: every seed's plan judged on every seed's supernet; a supernet
    # restored from its state scores its own plan as its own search run did
    assert {entry["method"] for entry in report["transfer"]} == set(names)
    for entry in report["transfer"]:
        assert set(entry["matrix"]) == {"0", "1"} and entry["own_better"] in (0, 1, 2)
        for row in report["rows"]:
            own = entry["matrix"][str(row["seed"])][str(row["seed"])]
            expected = row["estimators"][entry["method"]]["validation_loss"]
            assert own == pytest.approx(expected, rel=1e-5)
    assert (tmp_path / "search_quality.json").is_file() and Path(report["plot"]).is_file()
    assert recipe.spearman([1, 2, 3], [3, 2, 1]) == -1 and recipe.jaccard([1, 2], [2, 3]) == 1 / 3


def test_search_quality_cells_do_not_depend_on_the_cells_run_before(tmp_path):
    """A (seed, k) cell warms up the same supernet and finds the same plans whether the
    command runs it alone or after another k (each cell seeds the PIAs' initialisation)."""
    recipe = importlib.import_module("search_quality")
    common = SEARCH_QUALITY_TINY + ["--seeds", "1", "--budget", "10", "--random", "3"]
    common += ["--estimators", "greedy", "loo", "stable@0.5"]  # stable with tie_se 0.5
    alone = recipe.main(common + ["--ks", "2", "--out", str(tmp_path / "alone")])
    after = recipe.main(common + ["--ks", "3", "2", "--out", str(tmp_path / "after")])
    (cell,) = alone["rows"]
    (same,) = [row for row in after["rows"] if row["k"] == 2]
    assert cell["warmup_loss"] == same["warmup_loss"]
    assert cell["random"]["validation_losses"] == same["random"]["validation_losses"]
    assert set(cell["estimators"]) == {"greedy", "loo", "stable@0.5"}
    for name in ("greedy", "loo", "stable@0.5"):
        ours, theirs = cell["estimators"][name], same["estimators"][name]
        assert {k: v for k, v in ours.items() if k != "seconds"} == {
            k: v for k, v in theirs.items() if k != "seconds"
        }


@pytest.mark.parametrize("entry", ["nope", "stable@x", "stable@-1"])
def test_search_quality_refuses_an_unknown_estimator_or_tie(entry, capsys):
    recipe = importlib.import_module("search_quality")
    with pytest.raises(SystemExit):
        recipe.options(["--estimators", "greedy", entry])
    assert "--estimators" in capsys.readouterr().err
    assert recipe.variant("stable@1.5", 2.0) == ("stable", 1.5, False)
    assert recipe.variant("stable", 2.0) == ("stable", 2.0, False)
    assert recipe.variant("untuned:stable@1", 2.0) == ("stable", 1.0, True)


def test_search_quality_untuned_entries_search_before_the_warm_up(tmp_path):
    """An untuned:NAME entry searches the untuned model: the same plan for every seed,
    judged like the others on each seed's supernet."""
    recipe = importlib.import_module("search_quality")
    report = recipe.main(
        SEARCH_QUALITY_TINY
        + ["--ks", "2", "--seeds", "0", "1", "--budget", "10"]
        + ["--random", "3", "--estimators", "greedy", "untuned:greedy", "untuned:stable"]
        + ["--out", str(tmp_path)]
    )
    first, second = (row["estimators"] for row in report["rows"])
    for name in ("untuned:greedy", "untuned:stable"):
        assert first[name]["plan"] == second[name]["plan"]
        assert first[name]["untuned_search_loss"] == second[name]["untuned_search_loss"]
        for result in (first[name], second[name]):  # judged on its seed's supernet
            assert result["passes"] <= 10 and 0 <= result["beats_random"] <= 1
            assert result["search_loss"] != result["untuned_search_loss"]
    assert first["greedy"]["search_loss"] != second["greedy"]["search_loss"]
    assert {e["method"]: e["jaccard"] for e in report["summary"]}["untuned:greedy"] == 1.0


def test_search_quality_recipe_runs_on_the_iris_text_task(tmp_path):
    recipe = importlib.import_module("search_quality")
    with pytest.raises(SystemExit):  # the text task runs on SmolLM2 only
        recipe.options(["--task", "iris", "--model", "tiny"])
    report = recipe.main(
        ["--task", "iris", "--train", "8", "--search-batch", "4", "--validation", "6"]
        + ["--ks", "2", "--seeds", "0"]
        + ["--budget", "30", "--random", "3", "--estimators", "greedy", "loo"]
        + ["--warmup-epochs", "2", "--out", str(tmp_path)]
    )
    (row,) = report["rows"]
    assert report["arguments"]["task"] == "iris"
    assert set(row["estimators"]) == {"greedy", "loo"}
    for result in row["estimators"].values():
        assert len(result["plan"]) == 2 and result["passes"] <= 30
        assert result["validation_loss"] > 0
    assert row["warmup_loss"] > 0 and len(row["random"]["validation_losses"]) == 3


def test_seeds_recipe_tunes_every_method_for_every_seed(tmp_path):
    recipe = importlib.import_module("seeds")
    report = recipe.main(
        ["--model", "tiny", "--train", "16", "--held-out", "6", "--test", "6", "--k", "2"]
        + ["--seeds", "3", "4", "--max-grad-norm", "0.5", "--out", str(tmp_path)]
    )
    assert report["arguments"]["max_grad_norm"] == 0.5
    results = report["results"]
    assert set(results) == set(recipe.METHODS)
    for method, runs in results.items():
        assert set(runs) == {"3", "4"}
        for run in runs.values():
            assert len(run["plan"]) == (0 if method == "lavin" else 2)
            assert 0 <= run["accuracy"] <= 1 and len(run["epoch_losses"]) == recipe.EPOCHS
    # the untuned model's search sees no tuning seed: searched once, one plan for every seed
    assert results["untuned"]["3"]["plan"] == results["untuned"]["4"]["plan"]
    assert results["untuned"]["3"]["search_passes"] > 0
    assert "| untuned |" in report["markdown"]
    assert json.loads((tmp_path / "seeds.json").read_text())["results"] == results


def test_roe_recipe_compares_routes_with_static_plans_and_times_both_rules(tmp_path):
    recipe = importlib.import_module("roe_miniature")
    report = recipe.main(
        ["--model", "tiny", "--train", "16", "--held-out", "6", "--test", "8", "--epochs", "2"]
        + ["--ratio", "0.4", "--timing-prompts", "2", "--timing-tokens", "3"]
        + ["--batch-steps", "2", "--batch-rounds", "1", "--out", str(tmp_path)]
    )
    rows = report["rows"]
    assert {"LaVIN-style", "RoE mha", "RoE block"} <= set(rows)
    for unit in ("mha", "block"):
        row = rows[f"RoE {unit}"]
        assert 0 <= row["realized_ratio"] <= 1 and len(row["per_layer"]) == 6
        assert 0 <= row["skipped_per_example"]["min"] <= row["skipped_per_example"]["max"] <= 6
        assert len(row["batch_1"]["routed_over_route_floor"]["per_prompt"]) == 2
        assert row["batch_8"]["steps_timed"] == {"per_example": 2, "any_keeps": 2}
        k = max(1, round(row["skipped_per_example"]["mean"]))
        static = rows[f"static {unit} (k={k})"]
        assert 0 <= static["accuracy"] <= 1
        skipped = static["plan"]["skipped"]
        assert len(skipped) == k and (static["plan"]["skipped_ffns"] == skipped) == (
            unit == "block"
        )
    assert "| RoE mha |" in report["markdown"]
    assert set(report["speedup_over_unpatched"]) >= {"unpatched", "LaVIN-style"}
