"""EASTuner: the warm-up → search → fine-tune schedule, checkpoints and resume, bad input."""

from __future__ import annotations

import math

import pytest
import torch

from eas_kernels import SkipPlan, current_plan, patch_lavin
from eas_kernels.search import Candidates, HeldOutScorer
from eas_kernels.tuning import EASTuner, Example, TuningConfig, answer_loss, collate
from tests.helpers import tiny_model


def examples(count: int, seed: int) -> list[Example]:
    """Prompts of 4-8 random tokens; the answer is a function of the first one."""
    generator = torch.Generator().manual_seed(seed)
    result = []
    for _ in range(count):
        length = int(torch.randint(4, 9, (1,), generator=generator))
        prompt = torch.randint(1, 60, (length,), generator=generator).tolist()
        result.append(Example(tuple(prompt), (60 + prompt[0] % 7, 70)))
    return result


def searching_model(candidates: str = "mha", seed: int = 0) -> torch.nn.Module:
    return patch_lavin(
        tiny_model(seed=seed),
        SkipPlan(4, [], skip_rank=4, adapter_rank=2),
        search=candidates,
    )


def config(**overrides: object) -> TuningConfig:
    values = dict(
        k=2,
        warmup_epochs=1,
        search_epochs=2,
        finetune_epochs=1,
        batch_size=4,
        eval_every=2,
        checkpoint_every=3,
        lr=5e-3,
        seed=3,
    )
    values.update(overrides)
    return TuningConfig(**values)


PAPER = {"estimator": "paper", "warmup_ramp": False}  # the paper's search, as specified


def trainables(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def test_schedule_phases_updates_and_final_plan():
    model = searching_model()
    before = trainables(model)
    tuner = EASTuner(model, examples(16, 1), examples(4, 2), config(**PAPER), pad_id=0)
    result = tuner.run()
    steps = result.history["steps"]
    phases = [s["phase"] for s in steps]
    assert phases == ["warmup"] * 4 + ["search"] * 8 + ["finetune"] * 4
    assert all(len(s["arms"]) == 2 for s in steps if s["phase"] != "finetune")
    assert len(result.history["updates"]) == 8 // 2
    assert len(result.plan.skipped) == 2 and result.plan.skipped == tuple(result.arms)
    assert current_plan(model) == result.plan
    changed = [n for n, p in trainables(model).items() if not torch.equal(p, before[n])]
    assert any("skip_pia" in n for n in changed) and any("attn_adapter" in n for n in changed)
    assert all(math.isfinite(s["loss"]) for s in steps)


def test_search_updates_are_eq16_of_the_recorded_losses():
    model = searching_model()
    result = EASTuner(model, examples(16, 1), examples(4, 2), config(**PAPER), pad_id=0).run()
    scores = torch.zeros(4, dtype=torch.float64)
    for update in result.history["updates"]:
        pi = torch.softmax(scores, dim=0)
        rewards = torch.exp(-torch.tensor(update["results"], dtype=torch.float64))
        proposals = [m["arms"] for m in update["measurements"]]
        assert {m["kind"] for m in update["measurements"]} == {"loss"}
        step = torch.zeros_like(scores)
        for arms, reward in zip(proposals, rewards, strict=True):
            for i in arms:
                step[i] += (rewards.mean() - reward) * pi[i] * (1 - pi[i])
        scores = scores + step
        torch.testing.assert_close(torch.tensor(update["scores"], dtype=torch.float64), scores)
        assert len({tuple(a) for a in proposals}) == 3  # m distinct subnets
    order = sorted(range(4), key=lambda i: (scores[i].item(), i))
    assert result.plan.skipped == tuple(sorted(order[:2]))


def test_subnet_losses_are_scored_on_the_held_out_batch_in_eval_mode():
    model = searching_model()
    held_out = examples(4, 2)
    tuner = EASTuner(
        model, examples(8, 1), held_out, config(search_epochs=1, estimator="paper"), pad_id=0
    )
    seen = []

    def loss_fn(m: torch.nn.Module, batch: object) -> torch.Tensor:
        seen.append((m.training, torch.is_grad_enabled(), batch.tokens.shape))
        from eas_kernels.tuning import answer_loss

        return answer_loss(m, batch)

    tuner.loss_fn = loss_fn
    tuner.run()
    scoring = [s for s in seen if not s[0]]
    assert len(scoring) == 3 and all(not grad for _, grad, _ in scoring)
    assert all(shape == collate(held_out, 0).tokens.shape for _, _, shape in scoring)


@pytest.mark.parametrize(
    ("estimator", "stop_at"),
    [("paper", 2), ("paper", 7), ("paper", 13)]
    + [
        (name, stop)
        for name in ("bandit", "greedy", "loo", "cosine", "portfolio", "stable")
        for stop in (5, 13)
    ],
)
def test_an_interrupted_run_resumes_to_the_same_plan_and_weights(tmp_path, estimator, stop_at):
    reference_model = searching_model()
    train, held_out = examples(16, 1), examples(4, 2)
    settings = config(estimator=estimator, warmup_ramp=estimator == "greedy")
    reference = EASTuner(reference_model, train, held_out, settings, pad_id=0).run()

    class Interrupted(Exception):
        pass

    def interrupt(record: dict) -> None:
        if record["step"] == stop_at:
            raise Interrupted

    first = searching_model()
    tuner = EASTuner(first, train, held_out, settings, pad_id=0, run_dir=tmp_path)
    tuner.progress = interrupt
    with pytest.raises(Interrupted):
        tuner.run()
    resumed_model = searching_model()
    resumed = EASTuner(resumed_model, train, held_out, settings, pad_id=0, run_dir=tmp_path)
    result = resumed.run()
    assert result.plan == reference.plan and result.scores == reference.scores
    assert result.search_passes == reference.search_passes > 0
    for name, value in trainables(reference_model).items():
        assert torch.equal(trainables(resumed_model)[name], value), name
    for key in ("steps", "updates", "untuned"):  # same losses, skip sets, rounds, probes
        assert result.history.get(key) == reference.history.get(key), key


def test_stable_probes_the_untuned_model_before_the_first_step():
    model = searching_model()
    candidates = Candidates("mha", 4)
    train, held_out = examples(8, 1), examples(4, 2)
    expected = HeldOutScorer(model, collate(held_out, 0), candidates, answer_loss).cosines()
    settings = config(estimator="stable", warmup_ramp=True)
    result = EASTuner(model, train, held_out, settings, pad_id=0).run()
    (probe,) = result.history["untuned"]
    assert probe["kind"] == "cosine"
    torch.testing.assert_close(torch.tensor(probe["result"], dtype=torch.float64), expected)
    assert result.history["steps"][0]["loss"] != 0  # the probe came first, then training
    kinds = {m["kind"] for u in result.history["updates"] for m in u["measurements"]}
    assert kinds == {"examples", "cosine"}


def test_a_loss_without_per_example_losses_is_refused_for_stable():
    def mean_only(m: torch.nn.Module, batch: object) -> torch.Tensor:
        return answer_loss(m, batch)

    model = searching_model()
    before = {n: p.clone() for n, p in model.named_parameters()}
    with pytest.raises(TypeError, match="stable estimator measures per example"):
        EASTuner(
            model, examples(8, 1), examples(4, 2), config(estimator="stable"), pad_id=0,
            loss_fn=mean_only,
        )  # fmt: skip
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    scorer = HeldOutScorer(model, collate(examples(4, 2), 0), Candidates("mha", 4), mean_only)
    with pytest.raises(TypeError, match="needs a loss_fn that takes per_example=True"):
        scorer.examples((1,))
    assert current_plan(model).skipped == ()  # refused before the skip set changed
    per_example = answer_loss(model, collate(examples(4, 2), 0), per_example=True)
    mean = answer_loss(model, collate(examples(4, 2), 0))
    assert per_example.shape == (2, 4)
    torch.testing.assert_close(per_example[0].sum() / per_example[1].sum(), mean.double())


def test_finetune_only_trains_the_current_plan():
    model = patch_lavin(tiny_model(), SkipPlan(4, [1, 3], skip_rank=4, adapter_rank=2))
    tuning = TuningConfig(warmup_epochs=0, search_epochs=0, finetune_epochs=2, batch_size=4)
    result = EASTuner(model, examples(8, 1), examples(4, 2), tuning, pad_id=0).run()
    assert result.plan == current_plan(model) and result.arms == ()
    assert len(result.history["steps"]) == 4 and not result.history["updates"]
    assert result.scores == []


def test_finetune_only_needs_no_search_arms():
    """A one-layer model has a single arm, too few to search, but can be fine-tuned."""
    model = patch_lavin(tiny_model(n_layers=1), SkipPlan(1, [], skip_rank=4, adapter_rank=2))
    tuning = TuningConfig(warmup_epochs=0, search_epochs=0, finetune_epochs=1, batch_size=4)
    result = EASTuner(model, examples(4, 1), examples(2, 2), tuning, pad_id=0).run()
    assert result.plan == current_plan(model) and len(result.history["steps"]) == 1


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"k": 4}, "k must be smaller than the number of arms"),
        ({"k": 0}, "k must be"),
        ({"k": None}, "k must be"),
        ({"batch_size": 0}, "batch_size"),
        ({"warmup_epochs": -1}, "warmup_epochs"),
        ({"lr": float("nan")}, "lr"),
        ({"warmup_epochs": 0, "search_epochs": 0, "finetune_epochs": 0}, "at least one epoch"),
        ({"estimator": "random"}, r"estimator must be one of \['bandit', 'cosine', 'greedy'"),
        ({"estimator": "greedy", "search_budget": 3}, "greedy estimator needs a search_budget of"),
        ({"estimator": "cosine", "search_budget": 0}, "at least 1 held-out passes"),
        ({"estimator": "bandit", "search_budget": 0}, "at least 1 held-out passes"),
        (
            {"estimator": "paper", "search_epochs": 0},
            r"paper estimator needs a search_budget of at least 3 held-out passes for 4 arms "
            r"and k=2, got 0 \(its default budget, 0, counts the search epochs' rounds",
        ),
        ({"search_budget": -1}, "search_budget must be an int >= 0"),
        ({"search_budget": 2.5}, "search_budget must be an int or None"),
        ({"num_subnets": 1}, "num_subnets must be at least 2"),
        ({"tie_se": -1.0}, "tie_se must be a finite number >= 0"),
        ({"tie_se": float("inf")}, "tie_se must be a finite number >= 0"),
        ({"warmup_ramp": "yes"}, "warmup_ramp must be a bool"),
        ({"policy_lr": 0}, "policy_lr"),
    ],
)
def test_bad_configurations_are_refused(overrides, message):
    with pytest.raises((ValueError, TypeError), match=message):
        EASTuner(searching_model(), examples(8, 1), examples(4, 2), config(**overrides), pad_id=0)


def test_bad_models_and_data_are_refused(tmp_path):
    train, held_out = examples(8, 1), examples(4, 2)
    with pytest.raises(ValueError, match="train must hold"):
        EASTuner(searching_model(), [], held_out, config(), pad_id=0)
    with pytest.raises(ValueError, match="held_out must hold"):
        EASTuner(searching_model(), train, [], config(), pad_id=0)
    fixed = patch_lavin(tiny_model(), SkipPlan(4, [2], skip_rank=4, adapter_rank=2))
    no_search = config(k=None, warmup_epochs=0, search_epochs=0)
    assert EASTuner(fixed, train, [], no_search, pad_id=0).run().plan.skipped == (2,)
    with pytest.raises(ValueError, match="patched with search='mha'"):
        EASTuner(searching_model("mha"), train, held_out, config(candidates="ffn"), pad_id=0)
    with pytest.raises(TypeError, match="not patched"):
        EASTuner(tiny_model(), train, held_out, config(), pad_id=0)
    with pytest.raises(TypeError, match="TuningConfig"):
        EASTuner(searching_model(), train, held_out, {"k": 2}, pad_id=0)
    EASTuner(searching_model(), train, held_out, config(), pad_id=0, run_dir=tmp_path).run()
    other = EASTuner(searching_model(), train, held_out, config(seed=4), pad_id=0, run_dir=tmp_path)
    with pytest.raises(ValueError, match=r"written by a run with seed = 3; this run has seed = 4"):
        other.run()


@pytest.mark.parametrize(
    "estimator", ["paper", "bandit", "greedy", "loo", "cosine", "portfolio", "stable"]
)
@pytest.mark.parametrize("candidates", ["mha", "ffn", "mha_or_ffn", "block"])
def test_every_estimator_searches_every_candidate_set(candidates, estimator):
    model = searching_model(candidates)
    settings = config(candidates=candidates, estimator=estimator, warmup_ramp=True)
    result = EASTuner(model, examples(8, 1), examples(4, 2), settings, pad_id=0).run()
    assert result.search_passes == result.history["updates"][-1]["passes"] > 0
    untuned = len(result.history.get("untuned", []))  # stable's probe of the untuned model
    assert result.search_passes == untuned + sum(
        len(u["measurements"]) for u in result.history["updates"]
    )
    assert current_plan(model) == result.plan
    assert len(result.arms) == 2 and len(result.scores) == (8 if candidates == "mha_or_ffn" else 4)
    if candidates == "ffn":
        assert not result.plan.skipped and len(result.plan.skipped_ffns) == 2
    if candidates == "block":
        assert result.plan.skipped == result.plan.skipped_ffns == result.plan.skipped_blocks


def test_pretrained_parameter_count_counts_a_copied_tied_output_once():
    from eas_kernels.tuning.evaluate import pretrained_parameter_count
    from tests.helpers import tiny_model

    model = tiny_model(0)
    total = sum(p.numel() for p in model.parameters())
    assert pretrained_parameter_count(model) == total  # untied, different values
    with torch.no_grad():
        model.output.weight.copy_(model.tok_embeddings.weight)  # a converted tied checkpoint
    assert pretrained_parameter_count(model) == total - model.output.weight.numel()


def test_the_core_imports_nothing_from_the_demo():
    """pia, plan, patch, runtime, ops, search and the tuning trainer and data work without
    the demo application (eas_kernels.demo: easy-vqa, the workload)."""
    import subprocess
    import sys

    code = (
        "import sys, eas_kernels, eas_kernels.tuning, eas_kernels.search, eas_kernels.ops, "
        "eas_kernels.tuning.trainer, eas_kernels.tuning.evaluate, eas_kernels.hf, "
        "eas_kernels.checkpoint\n"
        "print(sorted(m for m in sys.modules if m.startswith('eas_kernels.demo')))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_gradients_are_clipped_to_max_grad_norm_and_their_norm_recorded():
    model = searching_model()
    settings = config(max_grad_norm=0.05, search_epochs=0, finetune_epochs=0)
    tuner = EASTuner(model, examples(8, 1), examples(4, 2), settings, pad_id=0)
    seen = []
    step = tuner.optimizer.step

    def checked_step(*args: object, **kwargs: object) -> object:
        grads = [p.grad for p in tuner.parameters.values() if p.grad is not None]
        seen.append(float(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads]))))
        return step(*args, **kwargs)

    tuner.optimizer.step = checked_step
    result = tuner.run()
    norms = [s["grad_norm"] for s in result.history["steps"]]
    assert len(seen) == len(norms) == 2 and all(n > 0.05 for n in norms)  # clipping was due
    assert all(abs(n - 0.05) < 1e-6 for n in seen)
    with pytest.raises(ValueError, match="max_grad_norm"):
        config(max_grad_norm=0.0).validate()


def test_the_warmup_ramp_grows_skip_sets_from_one_to_k():
    model = patch_lavin(
        tiny_model(n_layers=6), SkipPlan(6, [], skip_rank=4, adapter_rank=2), search="mha"
    )
    settings = config(k=4, warmup_ramp=True, warmup_epochs=2, search_epochs=1, batch_size=2)
    result = EASTuner(model, examples(8, 1), examples(4, 2), settings, pad_id=0).run()
    sizes = [len(s["arms"]) for s in result.history["steps"] if s["phase"] == "warmup"]
    assert sizes == [math.ceil(4 * (t + 1) / 8) for t in range(8)] == [1, 1, 2, 2, 3, 3, 4, 4]
    searched = [len(s["arms"]) for s in result.history["steps"] if s["phase"] == "search"]
    assert searched == [4] * 4
