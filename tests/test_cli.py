"""The eas-kernels command line end to end on the tiny model and a few easy-vqa questions.

Each call trains its own vision tower (one epoch, seconds) unless a cache exists in the
output folder, so runs in different folders are independent.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from eas_kernels import SkipPlan

pytest.importorskip("easy_vqa", reason="the CLI workload needs easy-vqa (pip install easy-vqa)")
ROOT = Path(__file__).resolve().parent.parent
WORKLOAD = ["--model", "tiny", "--train", "16", "--held-out", "8", "--test", "8"]
WORKLOAD += ["--vision-epochs", "1", "--quiet"]
SEARCH = ["--k", "2", "--warmup-epochs", "1", "--search-epochs", "2", "--eval-every", "1"]
SEARCH += ["--batch-size", "4", "--checkpoint-every", "2"]


def cli(*arguments: str, check: bool = True) -> subprocess.CompletedProcess:
    environment = {**os.environ, "PYTHONPATH": str(ROOT)}
    result = subprocess.run(
        [sys.executable, "-m", "eas_kernels.cli", *arguments],
        capture_output=True,
        text=True,
        env=environment,
        cwd=ROOT,
        timeout=600,
    )
    if check and result.returncode != 0:
        raise AssertionError(f"exit {result.returncode}\n{result.stdout}\n{result.stderr}")
    return result


@pytest.fixture(scope="module")
def searched(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("search")
    cli("search", *WORKLOAD, *SEARCH, "--out", str(out))
    return out


def test_search_writes_plan_report_plots_and_pias(searched):
    plan = SkipPlan.load(searched / "plan.json")
    assert plan.num_layers == 6 and len(plan.skipped) == 2
    report = json.loads((searched / "search_report.json").read_text())
    assert report["command"] == "search" and report["plan"]["skipped"] == list(plan.skipped)
    # portfolio over 6 arms, k = 2, greedy's default budget min(2 * 6, 6 + 5) = 11: a round
    # of 6 arms alone and the cosine probe; 3 passes held back leave 1, too few for a
    # second greedy round, so greedy's plan is the 2 cheapest arms alone (leave-one-out's);
    # then the check scores it and the prior's plan (one set if they coincide)
    assert report["estimator"] == "portfolio" and len(report["updates"]) == 2
    first, check = (update["measurements"] for update in report["updates"])
    assert len(first) == 7 and {"kind": "cosine", "arms": []} in first
    assert 1 <= len(check) <= 2 and all(len(m["arms"]) == 2 for m in check)
    assert report["search_passes"] == 7 + len(check) and len(report["scores"]) == 6
    assert report["environment"]["torch"] and report["workload"]["train_questions"] == 16
    for name in ("preferences.png", "plan.png"):
        assert (searched / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (searched / "search" / "eas_pia.safetensors").is_file()


def test_a_killed_search_resumes_to_the_same_plan(searched, tmp_path):
    halted = [*WORKLOAD, *SEARCH, "--out", str(tmp_path), "--halt-after-step", "5"]
    killed = cli("search", *halted, check=False)
    assert killed.returncode == -9  # SIGKILL after step 5; the last checkpoint is step 4
    assert (tmp_path / "search_state" / "tuner_checkpoint.pt").is_file()
    assert not (tmp_path / "plan.json").exists()
    cli("search", *WORKLOAD, *SEARCH, "--out", str(tmp_path))
    assert SkipPlan.load(tmp_path / "plan.json") == SkipPlan.load(searched / "plan.json")
    resumed = json.loads((tmp_path / "search_report.json").read_text())
    uninterrupted = json.loads((searched / "search_report.json").read_text())
    for key in ("scores", "losses", "updates"):
        assert resumed[key] == uninterrupted[key], key


def test_a_cached_vision_tower_gives_the_same_search(searched, tmp_path):
    """The second run in a folder reads the tower from the cache instead of training it;
    nothing else may change (the PIAs' initial weights come from the global RNG)."""
    shutil.copytree(searched / "cache", tmp_path / "cache")
    cli("search", *WORKLOAD, *SEARCH, "--out", str(tmp_path))
    report = json.loads((tmp_path / "search_report.json").read_text())
    assert "cached" in report["workload"]["vision"]
    uninterrupted = json.loads((searched / "search_report.json").read_text())
    assert "cached" not in uninterrupted["workload"]["vision"]
    for key in ("plan", "scores", "losses", "updates"):
        assert report[key] == uninterrupted[key], key


def test_ctrl_c_saves_the_step_and_says_how_to_resume(searched, tmp_path):
    """SIGINT (sent by the run itself after step 5, as Ctrl-C would) ends the run with exit
    130 and one line; the checkpoint holds step 5 and the same command resumes from it to
    the uninterrupted result."""
    arguments = [*WORKLOAD, *SEARCH, "--out", str(tmp_path)]
    interrupted = cli(
        "search", *arguments, "--halt-after-step", "5", "--halt-signal", "INT", check=False
    )
    assert interrupted.returncode == 130, interrupted.stderr
    assert "Traceback" not in interrupted.stderr
    assert interrupted.stderr.strip().splitlines() == [
        f"eas-kernels search: interrupted after step 5 (checkpoint "
        f"{tmp_path / 'search_state' / 'tuner_checkpoint.pt'}); run the same command again to "
        "resume"
    ]
    assert not (tmp_path / "plan.json").exists()
    resumed = cli("search", *arguments)
    assert "Traceback" not in resumed.stderr
    assert SkipPlan.load(tmp_path / "plan.json") == SkipPlan.load(searched / "plan.json")
    report = json.loads((tmp_path / "search_report.json").read_text())
    uninterrupted = json.loads((searched / "search_report.json").read_text())
    for key in ("scores", "losses", "updates"):
        assert report[key] == uninterrupted[key], key


def test_a_run_folder_of_another_workload_is_not_resumed(searched, tmp_path):
    shutil.copytree(searched / "search_state", tmp_path / "search_state")
    before = (tmp_path / "search_state" / "tuner_checkpoint.pt").read_bytes()
    for flag, value in (("--train", "12"), ("--held-out", "4"), ("--test", "4")):
        workload = list(WORKLOAD)
        workload[workload.index(flag) + 1] = value
        result = cli("search", *workload, *SEARCH, "--out", str(tmp_path), check=False)
        written = WORKLOAD[WORKLOAD.index(flag) + 1]
        assert result.returncode == 2, result.stderr
        assert f"with {flag} = {written}; this run has {flag} = {value}" in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert (tmp_path / "search_state" / "tuner_checkpoint.pt").read_bytes() == before
    assert not (tmp_path / "plan.json").exists()


def test_finetune_evaluate_generate(searched, tmp_path):
    out = tmp_path / "tuned"
    cli(
        "finetune",
        *WORKLOAD,
        "--plan",
        str(searched / "plan.json"),
        "--init",
        str(searched / "search"),
        "--epochs",
        "1",
        "--batch-size",
        "4",
        "--out",
        str(out),
    )
    report = json.loads((out / "finetune_report.json").read_text())
    assert report["plan"] == SkipPlan.load(searched / "plan.json").to_dict()
    assert report["trainable_params"] > 0 and len(report["losses"]) == 4
    evaluated = cli(
        "evaluate",
        *WORKLOAD,
        "--checkpoint",
        str(out / "eas"),
        "--timing-prompts",
        "2",
        "--timing-tokens",
        "3",
        "--out",
        str(tmp_path / "eval"),
    )
    report = json.loads((tmp_path / "eval" / "evaluate_report.json").read_text())
    assert 0.0 <= report["accuracy"] <= 1.0 and "accuracy" in evaluated.stdout
    assert set(report["timings"]) == {"unpatched", "EAS (merged)", "floor"}
    generated = cli(
        "generate",
        *WORKLOAD,
        "--checkpoint",
        str(out / "eas"),
        "--image-id",
        "3",
        "--question",
        "what color is the shape?",
        "--out",
        str(tmp_path / "gen"),
    )
    assert "Q: what color is the shape?" in generated.stdout
    decoding = json.loads((tmp_path / "gen" / "generate_report.json").read_text())["decoding"]
    assert decoding["mode"] == "auto" and decoding["auto"]["decode_steps"] == 3  # 4 tokens
    assert decoding["realized"] == decoding["auto"]["mode"]
    assert set(decoding["auto"]["costs"]) == {
        "eager_step",
        "merge",
        "lowrank_setup",
        "lowrank_step",
    }


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["search", "--k", "6"], "k must be smaller than the number of arms"),
        (["finetune", "--plan", "PLAN30", "--epochs", "1"], "plan is for 30 layers"),
        (["evaluate", "--checkpoint", "MISSING"], "--checkpoint"),
    ],
)
def test_bad_input_ends_with_one_clear_line(tmp_path, arguments, message):
    plan30 = tmp_path / "plan30.json"
    SkipPlan(30, [1, 2]).save(plan30)
    arguments = [
        {"PLAN30": str(plan30), "MISSING": str(tmp_path / "missing")}.get(a, a) for a in arguments
    ]
    result = cli(*arguments, *WORKLOAD, "--out", str(tmp_path / "out"), check=False)
    assert result.returncode == 2 and message in result.stderr, result.stderr


def test_argument_errors_exit_2(tmp_path):
    result = cli("search", "--train", "0", "--out", str(tmp_path), check=False)
    assert result.returncode == 2 and "--train" in result.stderr
    result = cli("demo", "--candidates", "attention", check=False)
    assert result.returncode == 2 and "--candidates" in result.stderr
    result = cli("finetune", "--max-grad-norm", "0", check=False)
    assert result.returncode == 2 and "--max-grad-norm" in result.stderr
    for tie in ("-1", "nan"):
        result = cli("search", "--tie-se", tie, check=False)
        assert result.returncode == 2 and "--tie-se" in result.stderr


@pytest.mark.parametrize(("given", "expected"), [([], 10.0), (["2.5"], 2.5), (["none"], None)])
def test_max_grad_norm_reaches_the_tuning_config(given, expected):
    from eas_kernels.cli import _tuning_config, parser

    flag = ["--max-grad-norm", *given] if given else []
    for command, searches in ((["search"], True), (["finetune", "--plan", "p.json"], False)):
        args = parser().parse_args([*command, *flag])
        config = _tuning_config(args, searches=searches, finetune_epochs=1)
        assert config.max_grad_norm == expected


def test_demo_compares_lavin_style_and_eas_end_to_end(tmp_path):
    """The README's main job on the tiny model: both methods tuned, accuracy per question
    type, the interleaved timing table with its ratios, the plan and the plots."""
    timing = ["--timing-prompts", "2", "--timing-tokens", "3", "--finetune-epochs", "1"]
    result = cli("demo", *WORKLOAD, *SEARCH, *timing, "--out", str(tmp_path))
    assert "speed-up [quartiles]" in result.stdout and "decode time" in result.stdout
    report = json.loads((tmp_path / "demo_report.json").read_text())
    eas = "EAS, 2 MHA skipped"
    assert set(report["methods"]) == {"LaVIN-style", eas}
    for method in report["methods"].values():
        assert 0.0 <= method["accuracy"] <= 1.0 and method["epochs"] == 4
        assert set(method["accuracy_by_type"]) <= {"color", "shape", "yes/no"}
    assert list(report["timings"]) == ["unpatched", "LaVIN-style", eas, "floor"]
    for name, timing in report["timings"].items():
        assert len(timing["step_ms"]) == 2 * (3 - 1), name
        assert timing["ms_per_token_iqr"][0] <= timing["ms_per_token"]
    assert report["timings"][eas]["mode"] == "merge"
    assert set(report["timing_ratios"]) == {f"{eas} / floor", f"LaVIN-style / {eas}"}
    assert SkipPlan.load(tmp_path / "plan.json").skipped == tuple(
        report["methods"][eas]["plan"]["skipped"]
    )
    assert report["workload"]["projector_alignment"]["color_accuracy"] > 0.5


def test_route_trains_routers_and_reports_ratio_accuracy_and_speed(tmp_path):
    """`eas-kernels route` on the tiny model: RoE's stages in the history, the realised
    ratio per layer and per example, the plot and the batch-1 timing."""
    options = ["--unit", "mha", "--ratio", "0.4", "--layers", "1-4", "--epochs", "2"]
    options += ["--pretune-epochs", "1"]
    options += ["--batch-size", "4", "--timing-prompts", "2", "--timing-tokens", "3"]
    cli("route", *WORKLOAD, *options, "--out", str(tmp_path))
    report = json.loads((tmp_path / "route_report.json").read_text())
    assert report["route_plan"]["layers"] == [1, 2, 3, 4] and report["route_plan"]["ratio"] == 0.4
    stages = [record["stage"] for record in report["history"]]
    assert stages[:4] == ["pretune"] * 4 and stages[4] == "random" and stages[-1] == "joint"
    assert "routers" in stages and len(stages) == 3 * 4  # 16 questions in batches of 4
    realized = report["realized_ratio"]
    assert 0.0 <= realized["mean"] <= 1.0 and set(realized["per_layer"]) == {"1", "2", "3", "4"}
    assert 0.0 <= report["accuracy"] <= 1.0 and report["decode"] is None
    assert set(report["timings"]) == {"unpatched", "routed"}
    assert (tmp_path / "routes.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the saved routes give back the routed model: the same route for every test question
    assert report["files"]["routes"] == str(tmp_path / "routes")
    assert (tmp_path / "route_state" / "route_checkpoint.pt").is_file()
    resumed = cli("route", *WORKLOAD, *options, "--out", str(tmp_path))  # finished: resumes
    assert json.loads((tmp_path / "route_report.json").read_text())["history"] == report["history"]
    assert resumed.returncode == 0


def test_saved_routes_load_back_into_the_same_routed_model(tmp_path):
    """``demo.workload.save_routed`` / ``load_routed``: the route plan, routers, adapters,
    vision tower and projector; the loaded model holds the same weights and routes every
    test question as the saved one."""
    import copy

    import torch

    from eas_kernels.demo.workload import WorkloadConfig, build_workload, load_routed, save_routed
    from eas_kernels.routing import RoutePlan, patch_routes
    from eas_kernels.tuning.evaluate import route_matrix

    config = WorkloadConfig(model="tiny", train=4, held_out=2, test=6, vision_epochs=1, seed=0)
    workload = build_workload(config, cache_dir=tmp_path / "cache")
    model = patch_routes(copy.deepcopy(workload.model), RoutePlan(6, ratio=0.3, skip_rank=4))
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():  # routers, adapters and projector away from their initial values
        for name, parameter in model.named_parameters():
            if any(part in name for part in ("router", "route_pia", "kept_adapter", "projector")):
                parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.3)
    save_routed(model, tmp_path / "routes")
    loaded = load_routed(workload.model, tmp_path / "routes")
    expected = model.state_dict()
    for name, value in loaded.state_dict().items():
        assert torch.equal(value, expected[name]), name
    routes = route_matrix(model, workload.test, pad_id=workload.pad_id)
    assert routes.any() and not routes.all()
    assert torch.equal(route_matrix(loaded, workload.test, pad_id=workload.pad_id), routes)


@pytest.mark.parametrize(
    ("arguments", "words"),
    [
        (["--ratio", "1"], "--ratio: must lie in [0, 1)"),
        (["--layers", "4-2"], "--layers: must be FIRST-LAST"),
        (["--unit", "ffn"], "--unit: invalid choice"),
    ],
)
def test_route_refuses_bad_options(tmp_path, arguments, words):
    result = cli("route", *WORKLOAD, *arguments, "--out", str(tmp_path), check=False)
    assert result.returncode == 2 and words in result.stderr


def test_route_refuses_layers_beyond_the_model(tmp_path):
    result = cli("route", *WORKLOAD, "--layers", "3-9", "--out", str(tmp_path), check=False)
    assert result.returncode == 2
    assert "layers: layer index 6 is out of range [0, 6)" in result.stderr


def test_search_under_torchrun_gives_the_one_process_plan_and_reports_the_world(tmp_path):
    """``torchrun --nproc-per-node 2 -m eas_kernels.cli search``: rank 0 writes every file,
    the plan and the losses are the one-process ones, and the report records the setup.
    Both runs use one thread per process: the workload's vision tower, trained in the run,
    depends on the thread count (about 1e-3 in the first loss between 1 and 2 threads)."""
    environment = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    arguments = ["-m", "eas_kernels.cli", "search", *WORKLOAD, *SEARCH, "--out"]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    runs = {
        "one": [sys.executable, *arguments, str(tmp_path / "one")],
        "two": [*torchrun, "--nproc-per-node", "2", *arguments, str(tmp_path / "two")],
    }
    for command in runs.values():
        result = subprocess.run(
            command, capture_output=True, text=True, env=environment, cwd=ROOT, timeout=900
        )
        assert result.returncode == 0, result.stderr[-4000:]
    one, two = (tmp_path / "one", tmp_path / "two")
    assert SkipPlan.load(two / "plan.json") == SkipPlan.load(one / "plan.json")
    report = json.loads((two / "search_report.json").read_text())
    single = json.loads((one / "search_report.json").read_text())
    assert report["distributed"] == {"world_size": 2, "backend": "gloo", "strategy": "ddp"}
    assert single["distributed"] == {"world_size": 1, "backend": None, "strategy": "single"}
    for ours, theirs in zip(report["losses"], single["losses"], strict=True):
        assert abs(ours - theirs) <= 1e-4 * max(1.0, abs(theirs))
    assert not (two / ".eas-kernels.lock").exists()
    tuned = tmp_path / "tuned"
    finetune = ["finetune", *WORKLOAD, "--plan", str(two / "plan.json"), "--epochs", "1"]
    result = subprocess.run(
        [*torchrun, "--nproc-per-node", "2", "-m", "eas_kernels.cli", *finetune,
         "--init", str(two / "search"), "--out", str(tuned)],
        capture_output=True, text=True, env=environment, cwd=ROOT, timeout=900,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-4000:]
    report = json.loads((tuned / "finetune_report.json").read_text())
    assert report["distributed"]["world_size"] == 2
    assert (tuned / "eas" / "eas_pia.safetensors").is_file()


def test_a_second_run_in_a_busy_folder_is_refused_and_a_stale_lock_is_taken(tmp_path):
    lock = tmp_path / ".eas-kernels.lock"
    lock.write_text(str(os.getpid()))  # a running process holds the folder
    busy = cli("search", *WORKLOAD, "--k", "6", "--out", str(tmp_path), check=False)
    assert busy.returncode == 2
    assert f"is in use by another eas-kernels run (process {os.getpid()})" in busy.stderr
    assert lock.read_text() == str(os.getpid())  # not taken from its holder
    ended = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                           capture_output=True, text=True, check=True)  # fmt: skip
    lock.write_text(ended.stdout.strip())  # left by a run that has ended
    stale = cli("search", *WORKLOAD, "--k", "6", "--out", str(tmp_path), check=False)
    assert "k must be smaller than the number of arms" in stale.stderr  # it ran
    assert not lock.exists()
