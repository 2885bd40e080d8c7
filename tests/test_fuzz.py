"""Bad input, tried as a new user and an attacker would (issue 17): the public API and the
command line, class by class. Every case asserts three things:

1. a one-line error of the documented type whose message names the argument (or file);
2. the model bitwise and structurally unchanged (state dict, requires_grad, hooks,
   attributes, children);
3. nothing written to the run folder that a resume would trust (the tuner checkpoint, the
   vision tower cache, plans and PIA weights keep their bytes; no new ones appear).

The files are the ones a run folder holds — tuner checkpoints, vision caches,
``multimodal.pt``, ``eas_plan.json``, ``eas_pia.safetensors``, plan files — each garbage,
truncated, malicious (a pickle that would run code), with wrong keys, wrong shapes, NaN,
wrong types, or deeply nested JSON.
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import eas_kernels as E
from eas_kernels.checkpoint import PLAN_FILE, WEIGHTS_FILE
from eas_kernels.patch import runtime_of
from eas_kernels.search import BanditSearch
from eas_kernels.tuning import EASTuner
from eas_kernels.tuning.trainer import CHECKPOINT_FILE
from tests.helpers import assert_bitwise, patched, structure, tiny_model, weights_snapshot
from tests.test_tuning import config, examples, searching_model
from tests.test_untrusted_files import RunsCode

DEEP_JSON = "[" * 100_000 + "]" * 100_000
TRUSTED = ("*.pt", "*.json", "*.safetensors")  # what a resume or a load reads


def trusted_files(folder: Path) -> dict[str, bytes]:
    """Every file a later run or load would read, with its bytes."""
    return {
        str(path.relative_to(folder)): path.read_bytes()
        for pattern in TRUSTED
        for path in folder.rglob(pattern)
        if not path.name.endswith("_report.json")
    }


def assert_one_line(error: BaseException, kind: type, pattern: str) -> None:
    message = str(error)
    assert isinstance(error, kind), f"{type(error).__name__} is not {kind.__name__}: {message}"
    assert "\n" not in message.strip(), f"not one line: {message!r}"
    assert re.search(pattern, message), f"{pattern!r} not in {message!r}"


# ----------------------------------------------------------------------------- files
def truncated(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def garbage(path: Path) -> None:
    path.write_bytes(b"12 garbage \x00\xff" * 7)


def code(path: Path) -> None:
    torch.save({"payload": RunsCode(path.with_name("ran"))}, path)


def edit_pt(change: Callable[[dict], None]) -> Callable[[Path], None]:
    def edit(path: Path) -> None:
        state = torch.load(path, weights_only=True)
        change(state)
        torch.save(state, path)

    return edit


def edit_json(change: Callable[[dict], object]) -> Callable[[Path], None]:
    def edit(path: Path) -> None:
        document = json.loads(path.read_text())
        path.write_text(json.dumps(change(document)))

    return edit


def replace_text(text: str) -> Callable[[Path], None]:
    return lambda path: path.write_text(text)


def edit_weights(change: Callable[[dict], None]) -> Callable[[Path], None]:
    def edit(path: Path) -> None:
        tensors = load_file(str(path))
        change(tensors)
        save_file(tensors, str(path))

    return edit


def first_tensor(state: dict) -> str:
    return next(key for key, value in state.items() if isinstance(value, torch.Tensor))


def nan_first(tensors: dict) -> None:
    tensors[first_tensor(tensors)].view(-1)[0] = float("nan")


# ----------------------------------------------------------------------------- API: patched model
@dataclass(frozen=True)
class Case:
    name: str
    call: Callable[[torch.nn.Module], object]
    error: type
    pattern: str


def plan_dict(**changes: object) -> dict:
    return {**E.SkipPlan(4, [1]).to_dict(), **changes}


MODEL_CASES = [
    Case("patch twice", lambda m: E.patch_lavin(m, E.SkipPlan(4, [2])), ValueError, "already"),
    Case("set_skipped range", lambda m: E.set_skipped(m, [7]), ValueError, r"index 7"),
    Case("set_skipped float", lambda m: E.set_skipped(m, [1.5]), TypeError, "indices"),
    Case("set_skipped str", lambda m: E.set_skipped(m, "1"), TypeError, "indices"),
    Case("set_skipped no PIA", lambda m: E.set_skipped(m, [2]), ValueError, "layer 1 has no"),
    Case("reparameterize mode", lambda m: E.reparameterize(m, "fast"), ValueError, "mode"),
    Case("reparameterize type", lambda m: E.reparameterize(m, 1), ValueError, "mode"),
    Case("prompt mask dtype", lambda m: E.set_prompt_mask(m, torch.ones(1, 2)), TypeError, "mask"),
    Case(
        "prompt mask empty",
        lambda m: E.set_prompt_mask(m, torch.zeros(1, 2, dtype=torch.bool)),
        ValueError,
        "prompt_mask selects no token",
    ),
    Case(
        "prompt mask shape",
        lambda m: m(torch.tensor([[1, 2, 3]]), start_pos=0, prompt_mask=torch.ones(1, 2).bool()),
        ValueError,
        "prompt_mask must have the shape of tokens",
    ),
    Case(
        "decode first",
        lambda m: m(torch.tensor([[1]]), start_pos=3),
        ValueError,
        "does not continue a prefill",
    ),
    Case("generate float", lambda m: E.greedy_generate(m, [[1, 2.5]], 2), TypeError, "prompts"),
    Case("generate str", lambda m: E.greedy_generate(m, ["ab"], 2), TypeError, "prompts"),
    Case("generate empty", lambda m: E.greedy_generate(m, [], 2), ValueError, "prompts"),
    Case("generate zero", lambda m: E.greedy_generate(m, [[1]], 0), ValueError, "max_new_tokens"),
    Case("generate long", lambda m: E.greedy_generate(m, [[1]], 10**6), ValueError, "max_seq_len"),
    Case(
        "generate id",
        lambda m: E.greedy_generate(m, [[1, 10**9]], 2),
        ValueError,
        r"token ids must lie in \[0, 97\)",
    ),
    Case("generate negative", lambda m: E.greedy_generate(m, [[-1]], 2), ValueError, "token ids"),
    Case(
        "generate pad",
        lambda m: E.greedy_generate(m, [[1], [1, 2]], 2, pad_id=-5),
        ValueError,
        "pad_id",
    ),
    Case(
        "merge batch 2",
        lambda m: (E.reparameterize(m, "merge"), E.greedy_generate(m, [[1], [2]], 2)),
        ValueError,
        "batch size 1",
    ),
]


@pytest.mark.parametrize("case", MODEL_CASES, ids=lambda case: case.name)
def test_patched_model_refuses(case):
    model = patched([1])
    weights, before = weights_snapshot(model), structure(model)
    mode = runtime_of(model).mode
    with pytest.raises(Exception) as caught:  # noqa: PT011 - the type is asserted below
        case.call(model)
    assert_one_line(caught.value, case.error, case.pattern)
    assert_bitwise(model, weights)
    assert structure(model) == before
    if case.name != "merge batch 2":  # that case sets the mode first, on purpose
        assert runtime_of(model).mode == mode


def nan_pia(model: torch.nn.Module) -> torch.nn.Module:
    with torch.no_grad():
        model.layers[2].attn_adapter.down1.weight[0, 0] = float("inf")
    return model


@pytest.mark.parametrize("mode", ["eager", "lowrank", "merge", "auto"])
def test_a_corrupted_pia_is_refused_at_the_prefill_in_every_mode(mode):
    model = nan_pia(E.reparameterize(patched([1]), mode))
    weights, before = weights_snapshot(model), structure(model)
    with torch.no_grad(), pytest.raises(ValueError) as caught:
        E.greedy_generate(model, [[1, 2, 3]], 3)
    assert_one_line(caught.value, ValueError, "layer 2 attention adapter: down1.weight holds NaN")
    assert_bitwise(model, weights)
    assert structure(model) == before


# ----------------------------------------------------------------------------- API: unpatched model
PATCH_CASES = [
    Case(
        "rank huge",
        lambda m: E.patch_lavin(m, E.SkipPlan(4, [1], skip_rank=2**40)),
        ValueError,
        "skip_rank",
    ),
    Case(
        "adapter rank",
        lambda m: E.patch_lavin(m, E.SkipPlan(4, [1], adapter_rank=65)),
        ValueError,
        "adapter_rank",
    ),
    Case("layers", lambda m: E.patch_lavin(m, E.SkipPlan(5, [1])), ValueError, "5 layers"),
    Case("plan type", lambda m: E.patch_lavin(m, "plan.json"), TypeError, "plan"),
    Case("search", lambda m: E.patch_lavin(m, E.SkipPlan(4, []), search="x"), ValueError, "search"),
    Case("model type", lambda m: E.patch_lavin("model", E.SkipPlan(4, [])), TypeError, "model"),
    Case("hf on lavin", lambda m: E.patch_hf(m, E.SkipPlan(4, [1])), TypeError, "model must be"),
    Case("unpatch", lambda m: E.unpatch(m), TypeError, "not patched"),
    Case("save", lambda m: E.save_pretrained(m, "/nonexistent"), TypeError, "not patched"),
    Case("plan of", lambda m: E.current_plan(m), TypeError, "not patched"),
    Case("from_pretrained type", lambda m: E.from_pretrained("m", "x"), TypeError, "base_model"),
    Case(
        "from_pretrained missing",
        lambda m: E.from_pretrained(m, "/nonexistent"),
        FileNotFoundError,
        "nonexistent",
    ),
]


@pytest.mark.parametrize("case", PATCH_CASES, ids=lambda case: case.name)
def test_unpatched_model_refuses(case):
    model = tiny_model(0)
    weights, before = weights_snapshot(model), structure(model)
    with pytest.raises(Exception) as caught:  # noqa: PT011 - the type is asserted below
        case.call(model)
    assert_one_line(caught.value, case.error, case.pattern)
    assert_bitwise(model, weights)
    assert structure(model) == before


# ------------------------------------------------------------------------- API: checkpoint folders
CHECKPOINT_FILES = [
    ("plan garbage", PLAN_FILE, garbage, ValueError, "eas_plan.json"),
    ("plan nested", PLAN_FILE, replace_text(DEEP_JSON), ValueError, "nested too deeply"),
    ("plan list", PLAN_FILE, replace_text("[]"), ValueError, "not an eas_kernels checkpoint"),
    ("plan version", PLAN_FILE, edit_json(lambda d: {**d, "version": 99}), ValueError, "version"),
    ("plan search", PLAN_FILE, edit_json(lambda d: {**d, "search": "all"}), ValueError, "search"),
    (
        "plan rank",
        PLAN_FILE,
        edit_json(lambda d: {**d, "plan": plan_dict(skip_rank=2**40)}),
        ValueError,
        "skip_rank",
    ),
    (
        "plan layers",
        PLAN_FILE,
        edit_json(lambda d: {**d, "plan": plan_dict(num_layers=9)}),
        ValueError,
        "9 layers",
    ),
    (
        "plan skipped",
        PLAN_FILE,
        edit_json(lambda d: {**d, "plan": plan_dict(skipped=[[[1]]])}),
        TypeError,
        "skipped",
    ),
    (
        "plan temperature",
        PLAN_FILE,
        edit_json(lambda d: {**d, "plan": plan_dict(temperature="hot")}),
        TypeError,
        "temperature",
    ),
    ("weights garbage", WEIGHTS_FILE, garbage, ValueError, "eas_pia.safetensors is corrupt"),
    ("weights truncated", WEIGHTS_FILE, truncated, ValueError, "eas_pia.safetensors is corrupt"),
    ("weights pickle", WEIGHTS_FILE, code, ValueError, "eas_pia.safetensors is corrupt"),
    ("weights NaN", WEIGHTS_FILE, edit_weights(nan_first), ValueError, "holds NaN or Inf"),
    (
        "weights key",
        WEIGHTS_FILE,
        edit_weights(lambda t: t.update(extra=torch.ones(1))),
        ValueError,
        "unexpected",
    ),
    (
        "weights shape",
        WEIGHTS_FILE,
        edit_weights(lambda t: t.update({first_tensor(t): torch.ones(2, 2)})),
        ValueError,
        "shape",
    ),
    (
        "weights int",
        WEIGHTS_FILE,
        edit_weights(lambda t: t.update({first_tensor(t): t[first_tensor(t)].long()})),
        ValueError,
        "has dtype torch.int64",
    ),
]


@pytest.fixture(scope="module")
def saved_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("checkpoint") / "eas"
    E.save_pretrained(patched([1], seed=3), folder)
    return folder


@pytest.mark.parametrize(
    ("name", "file", "damage", "error", "pattern"),
    CHECKPOINT_FILES,
    ids=lambda v: v if isinstance(v, str) and " " in v else "",
)
def test_a_damaged_checkpoint_folder_is_refused(
    saved_checkpoint, tmp_path, name, file, damage, error, pattern
):
    folder = tmp_path / "eas"
    shutil.copytree(saved_checkpoint, folder)
    damage(folder / file)
    files = trusted_files(tmp_path)
    model = tiny_model(0)
    weights, before = weights_snapshot(model), structure(model)
    with pytest.raises(Exception) as caught:  # noqa: PT011 - the type is asserted below
        E.from_pretrained(model, folder)
    assert_one_line(caught.value, error, pattern)
    assert_bitwise(model, weights)
    assert structure(model) == before
    assert trusted_files(tmp_path) == files
    assert not (folder / "ran").exists()


@pytest.mark.parametrize(
    ("text", "error", "pattern"),
    [
        (DEEP_JSON, ValueError, "nested too deeply"),
        ("{", ValueError, "not valid JSON"),
        ('{"num_layers": 4}', ValueError, "not a SkipPlan v2 document"),
        (json.dumps(plan_dict(skipped=[1, 1])), ValueError, "duplicate"),
        (json.dumps(plan_dict(skipped=[9])), ValueError, "out of range"),
        (json.dumps(plan_dict(skip_rank=0)), ValueError, "skip_rank"),
        (json.dumps(plan_dict(skip_rank=1.5)), TypeError, "skip_rank"),
        (json.dumps(plan_dict(temperature=float("inf"))), ValueError, "temperature"),
        (json.dumps(plan_dict(state="liquid")), ValueError, "state"),
    ],
)
def test_plan_json_is_refused(tmp_path, text, error, pattern):
    with pytest.raises(Exception) as caught:  # noqa: PT011 - the type is asserted below
        E.SkipPlan.from_json(text)
    assert_one_line(caught.value, error, pattern)
    (tmp_path / "plan.json").write_text(text)
    with pytest.raises(Exception) as caught:  # noqa: PT011 - the type is asserted below
        E.SkipPlan.load(tmp_path / "plan.json")
    assert_one_line(caught.value, error, "plan.json: .*" + pattern)


def test_plan_files_that_are_no_plan_are_refused(tmp_path):
    (tmp_path / "binary.json").write_bytes(b"\xff\xfe\x00")
    for path, error, pattern in [
        (tmp_path, ValueError, "is a directory"),
        (tmp_path / "binary.json", ValueError, "binary.json is not a plan JSON file"),
        (tmp_path / "missing.json", FileNotFoundError, "missing.json"),
    ]:
        with pytest.raises(Exception) as caught:  # noqa: PT011 - the type is asserted below
            E.SkipPlan.load(path)
        assert_one_line(caught.value, error, pattern)


# -------------------------------------------------------------------------- API: tuner checkpoints
def make_checkpoint(run_dir: Path) -> None:
    EASTuner(
        searching_model(),
        examples(8, 1),
        examples(4, 2),
        config(checkpoint_every=1),
        pad_id=0,
        run_dir=run_dir,
    ).run(resume=False)


def retype(key: str, value: object) -> Callable[[dict], None]:
    return lambda state: state.update({key: value})


def nan_trainable(state: dict) -> None:
    nan_first(state["trainable"])


TUNER_FILES = [
    ("garbage", garbage, "not a file written by torch.save"),
    ("truncated", truncated, "not a file written by torch.save"),
    ("code", code, "can be read safely"),
    ("list", lambda p: torch.save([1, 2], p), "holds a list"),
    ("keys", edit_pt(lambda s: s.pop("optimizer")), r"lacks \['optimizer'\]"),
    ("run key", edit_pt(retype("run_key", "x")), "run_key is not a dict"),
    ("position", edit_pt(retype("position", {"phase": "x"})), "position"),
    ("position negative", edit_pt(lambda s: s["position"].update(step=-1)), "position"),
    ("phase", edit_pt(lambda s: s["position"].update(phase=9)), "phase 9"),
    ("elapsed", edit_pt(retype("elapsed", float("nan"))), "elapsed"),
    ("trainable", edit_pt(retype("trainable", {})), "other trainable parameters"),
    ("trainable NaN", edit_pt(nan_trainable), "is not a finite"),
    ("optimizer", edit_pt(retype("optimizer", {"state": 1})), "optimizer: KeyError"),
    ("scheduler", edit_pt(retype("scheduler", 3)), "scheduler: "),
    ("search", edit_pt(retype("search", {"k": 2})), "search: ValueError: state is for"),
    ("search NaN", edit_pt(lambda s: s["search"]["latest"].fill_(float("nan"))), "NaN"),
    ("search passes", edit_pt(lambda s: s["search"].update(passes=10**6)), "'passes'"),
    ("search estimator", edit_pt(lambda s: s["search"].update(estimator="loo")), "estimator="),
    ("rng", edit_pt(retype("torch_rng", torch.zeros(3))), "torch_rng"),
    (
        "rng bytes",
        edit_pt(retype("torch_rng", torch.zeros(3, dtype=torch.uint8))),
        "torch_rng: Run",
    ),
    ("history", edit_pt(retype("history", None)), "history"),
    (
        "search seconds",
        edit_pt(lambda s: s["history"].update(search_seconds=["x"])),
        "search_seconds",
    ),
    ("other seed", edit_pt(lambda s: s["run_key"].update(seed=11)), "seed = 11; this run has"),
    (
        "other data",
        edit_pt(lambda s: s["run_key"].update(train="8 examples, sha256 0")),
        "train = '8 examples, sha256 0'; this run has train = '8 examples",
    ),
    ("more key", edit_pt(lambda s: s["run_key"].update(extra=1)), r"other settings \(\['extra'\]"),
]


@pytest.fixture(scope="module")
def tuner_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run_dir = tmp_path_factory.mktemp("tuner")
    make_checkpoint(run_dir)
    return run_dir / CHECKPOINT_FILE


@pytest.mark.parametrize(
    ("name", "damage", "pattern"),
    TUNER_FILES,
    ids=lambda v: v if isinstance(v, str) and not v.startswith(("(", "\\")) else "",
)
def test_a_damaged_tuner_checkpoint_is_refused_before_the_run_changes(
    tuner_checkpoint, tmp_path, name, damage, pattern
):
    shutil.copy(tuner_checkpoint, tmp_path / CHECKPOINT_FILE)
    damage(tmp_path / CHECKPOINT_FILE)
    files = trusted_files(tmp_path)
    model = searching_model()
    weights, before = weights_snapshot(model), structure(model)
    rng = torch.get_rng_state()
    tuner = EASTuner(
        model,
        examples(8, 1),
        examples(4, 2),
        config(checkpoint_every=1),
        pad_id=0,
        run_dir=tmp_path,
    )
    with pytest.raises(ValueError) as caught:
        tuner.run()
    assert_one_line(caught.value, ValueError, re.escape(str(tmp_path / CHECKPOINT_FILE)))
    assert re.search(pattern, str(caught.value)), str(caught.value)
    assert_bitwise(model, weights)
    assert structure(model) == before
    assert torch.equal(torch.get_rng_state(), rng)
    assert tuner.position["step"] == 0 and tuner.history == {"steps": [], "updates": []}
    assert trusted_files(tmp_path) == files
    assert not (tmp_path / "ran").exists()


@pytest.mark.parametrize(
    ("overrides", "error", "pattern"),
    [
        ({"seed": 2**70}, ValueError, r"seed must be in \[0, 2\*\*63\)"),
        ({"seed": -1}, ValueError, "seed"),
        ({"seed": 1.5}, TypeError, "seed"),
        ({"lr": float("inf")}, ValueError, "lr"),
        ({"lr": "1e-3"}, ValueError, "lr"),
        ({"k": 4}, ValueError, "k must be smaller"),
        ({"k": 0}, ValueError, "k"),
        ({"batch_size": True}, TypeError, "batch_size"),
        ({"num_subnets": 100, "estimator": "paper"}, ValueError, "num_subnets"),
        ({"candidates": "attention"}, ValueError, "candidates|search"),
    ],
)
def test_bad_tuning_configurations_are_refused(overrides, error, pattern):
    model = searching_model()
    weights, before = weights_snapshot(model), structure(model)
    with pytest.raises(Exception) as caught:  # noqa: PT011 - the type is asserted below
        EASTuner(model, examples(8, 1), examples(4, 2), config(**overrides), pad_id=0)
    assert_one_line(caught.value, error, pattern)
    assert_bitwise(model, weights)
    assert structure(model) == before


def test_a_diverging_run_writes_no_checkpoint_of_its_nan(tmp_path):
    model = searching_model()
    tuner = EASTuner(
        model,
        examples(8, 1),
        examples(4, 2),
        config(lr=1e308, checkpoint_every=1),
        pad_id=0,
        run_dir=tmp_path,
    )
    with pytest.raises(FloatingPointError) as caught:
        tuner.run()
    assert_one_line(caught.value, FloatingPointError, r"training diverged: step 1 .*lower lr")
    assert trusted_files(tmp_path) == {}


def test_bandit_states_are_refused_whole():
    search = BanditSearch(6, 2, seed=0)
    good = search.state_dict()
    for state, pattern in [
        ("x", "state must be a dict"),
        ({**good, "scores": torch.ones(5)}, "scores"),
        ({**good, "generator": torch.zeros(3)}, "generator"),
        ({**good, "generator": torch.zeros(5056, dtype=torch.uint8)}, "generator"),
    ]:
        fresh = BanditSearch(6, 2, seed=1)
        scores, generator = fresh.scores, fresh.generator.get_state()
        with pytest.raises(ValueError) as caught:
            fresh.load_state_dict(state)
        assert_one_line(caught.value, ValueError, pattern)
        assert torch.equal(fresh.scores, scores)
        assert torch.equal(fresh.generator.get_state(), generator)


# ----------------------------------------------------------------------------- command line
WORKLOAD = ["--model", "tiny", "--train", "8", "--held-out", "4", "--test", "4"]
WORKLOAD += ["--vision-epochs", "1", "--quiet"]
SEARCH = ["search", *WORKLOAD, "--k", "2", "--warmup-epochs", "1", "--search-epochs", "1"]
SEARCH += ["--eval-every", "1", "--batch-size", "4", "--checkpoint-every", "1"]
STATE = "search_state/" + CHECKPOINT_FILE


@pytest.fixture(scope="module")
def run_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run folder with the workload's vision tower cache, a tuned checkpoint ``eas/`` and
    a finished search's checkpoint (all written by the command line itself)."""
    pytest.importorskip("easy_vqa", reason="the CLI workload needs easy-vqa")
    from eas_kernels.cli import main

    template = tmp_path_factory.mktemp("run")
    assert main([*SEARCH, "--out", str(template)]) == 0
    finetune = ["finetune", *WORKLOAD, "--plan", str(template / "plan.json"), "--epochs", "1"]
    assert main([*finetune, "--batch-size", "4", "--out", str(template / "tuned")]) == 0
    shutil.move(template / "tuned" / "eas", template / "eas")
    return template


def damaged(file: str, damage: Callable[[Path], None]) -> Callable[[Path], None]:
    return lambda out: damage(out / file)


def make(path: str, content: str | bytes | None = None) -> Callable[[Path], None]:
    """Create ``out/../path``: a folder (``content`` None) or a file with ``content``."""

    def create(out: Path) -> None:
        target = out.parent / path
        if content is None:
            target.mkdir(parents=True, exist_ok=True)
        elif isinstance(content, bytes):
            target.write_bytes(content)
        else:
            target.write_text(content)

    return create


PLAN30 = json.dumps(E.SkipPlan(30, [1]).to_dict())
HUGE = json.dumps(plan_dict(num_layers=6, skip_rank=2**40))
EVALUATE = ["evaluate", *WORKLOAD, "--checkpoint", "{out}/eas", "--timing-prompts", "1"]
GENERATE = ["generate", *WORKLOAD, "--checkpoint", "{out}/eas", "--question", "what shape?"]
FINETUNE = ["finetune", *WORKLOAD, "--epochs", "1", "--plan"]
CLI_CASES = [
    # name, arguments ({out} is the run folder), setup, pattern of the error line
    ("out file", [*SEARCH, "--out", "{out}/../file"], make("file", "x"), "--out .*is a file"),
    ("out unwritable", [*SEARCH, "--out", "/proc/1/eas"], None, "--out .*not a writable folder"),
    ("plan folder", [*FINETUNE, "{out}/../dir"], make("dir"), "--plan .*is not a file"),
    ("plan missing", [*FINETUNE, "{out}/../none"], None, "--plan .*does not exist"),
    ("plan nested", [*FINETUNE, "{out}/../p"], make("p", DEEP_JSON), "--plan: .*nested too"),
    (
        "plan binary",
        [*FINETUNE, "{out}/../p"],
        make("p", b"\xff\xfe{"),
        "--plan: .*not a plan JSON file",
    ),
    ("plan layers", [*FINETUNE, "{out}/../p"], make("p", PLAN30), "--plan: plan is for 30"),
    ("plan rank", [*FINETUNE, "{out}/../p"], make("p", HUGE), "--plan: .*skip_rank"),
    (
        "init file",
        [*FINETUNE, "{out}/plan.json", "--init", "{out}/plan.json"],
        None,
        "--init .*is not a folder",
    ),
    (
        "checkpoint file",
        [*EVALUATE[:-4], "--checkpoint", "{out}/plan.json"],
        None,
        "--checkpoint .*is not a folder",
    ),
    (
        "checkpoint empty",
        [*EVALUATE[:-4], "--checkpoint", "{out}/cache"],
        None,
        "--checkpoint: .*no multimodal.pt",
    ),
    (
        "multimodal garbage",
        EVALUATE,
        damaged("eas/multimodal.pt", garbage),
        "--checkpoint: .*multimodal.pt is not a tuned vision tower",
    ),
    (
        "multimodal truncated",
        EVALUATE,
        damaged("eas/multimodal.pt", truncated),
        "--checkpoint: .*multimodal.pt is not a tuned vision tower",
    ),
    ("multimodal code", EVALUATE, damaged("eas/multimodal.pt", code), "can be read safely"),
    (
        "multimodal keys",
        EVALUATE,
        damaged("eas/multimodal.pt", edit_pt(lambda s: s.update(vision={}))),
        "missing keys",
    ),
    (
        "multimodal NaN",
        EVALUATE,
        damaged("eas/multimodal.pt", edit_pt(lambda s: nan_first(s["projector"]))),
        "NaN or Inf",
    ),
    (
        "multimodal shape",
        EVALUATE,
        damaged(
            "eas/multimodal.pt", edit_pt(lambda s: s["projector"].update(weight=torch.ones(2)))
        ),
        "expected a tensor of shape",
    ),
    (
        "checkpoint plan",
        GENERATE + ["--image-id", "1"],
        damaged("eas/" + PLAN_FILE, replace_text(DEEP_JSON)),
        "--checkpoint: .*nested too deeply",
    ),
    ("image id", GENERATE + ["--image-id", str(10**9)], None, "--image-id 1000000000: "),
    ("seed huge", [*SEARCH, "--seed", str(2**70)], None, r"argument --seed: must be in \[0"),
    ("seed negative", [*SEARCH, "--seed", "-1"], None, "argument --seed"),
    ("train huge", [*SEARCH, "--train", str(10**12)], None, r"train \+ held_out \(10{12} \+ 4\)"),
    ("test huge", [*SEARCH, "--test", str(10**7)], None, r"test \(10000000\) exceeds"),
    ("lr huge", [*SEARCH, "--lr", "1e308", "--no-resume"], None, "training diverged.*lower lr"),
    ("lr nan", [*SEARCH, "--lr", "nan"], None, "argument --lr"),
    ("k zero", [*SEARCH, "--k", "0"], None, "argument --k"),
    ("k large", [*SEARCH, "--k", "6"], None, "k must be smaller"),
    ("candidates", [*SEARCH, "--candidates", "heads"], None, "argument --candidates"),
    ("estimator", [*SEARCH, "--estimator", "oracle"], None, "argument --estimator"),
    ("budget negative", [*SEARCH, "--search-budget", "-2"], None, "argument --search-budget"),
    (
        "budget small",
        [*SEARCH, "--estimator", "greedy", "--search-budget", "3"],
        None,
        "greedy estimator needs a search_budget of at least 6",
    ),
    ("state garbage", SEARCH, damaged(STATE, garbage), "tuner_checkpoint.pt is not a tuner"),
    ("state truncated", SEARCH, damaged(STATE, truncated), "tuner_checkpoint.pt is not a tuner"),
    ("state code", SEARCH, damaged(STATE, code), "tuner_checkpoint.pt .*can be read safely"),
    ("state keys", SEARCH, damaged(STATE, edit_pt(lambda s: s.pop("search"))), "lacks"),
    ("other train", [*SEARCH, "--train", "6"], None, "--train = 8; this run has --train = 6"),
    ("other lr", [*SEARCH, "--lr", "0.5"], None, "lr = 0.001; this run has lr = 0.5"),
]


def run_cli(arguments: list[str], capsys: pytest.CaptureFixture) -> tuple[int, str]:
    from eas_kernels.cli import main

    try:
        code = main(arguments)
    except SystemExit as exit_:  # argparse
        code = exit_.code
    return code, capsys.readouterr().err


@pytest.mark.parametrize(
    ("name", "arguments", "setup", "pattern"), CLI_CASES, ids=[case[0] for case in CLI_CASES]
)
def test_command_line_refuses_in_one_line(
    run_template, tmp_path, capsys, name, arguments, setup, pattern
):
    out = tmp_path / "run"
    shutil.copytree(run_template, out)
    if setup is not None:
        setup(out)
    files = trusted_files(tmp_path)
    arguments = [a.replace("{out}", str(out)) for a in arguments]
    if "--out" not in arguments:
        arguments += ["--out", str(out)]
    code, stderr = run_cli(arguments, capsys)
    assert code == 2, stderr
    assert "Traceback" not in stderr, stderr
    last = stderr.strip().splitlines()[-1]
    command = arguments[0]
    assert last.startswith(f"eas-kernels {command}: error: "), stderr
    assert re.search(pattern, last), f"{pattern!r} not in {last!r}"
    assert trusted_files(tmp_path) == files
    assert not list(tmp_path.rglob("ran"))
