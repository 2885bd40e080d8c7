"""RoE's training (ROE_SPEC §4): the schedule, the regularised loss, and what it learns."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from eas_kernels.routing import (
    RoutePlan,
    RouteSchedule,
    patch_routes,
    route_control,
    route_loss,
    set_routing,
)
from tests.helpers import tiny_model


# ---------------------------------------------------------------------- the schedule
def test_schedule_stages_and_annealing() -> None:
    schedule = RouteSchedule(1000)
    first = schedule.stage(0)
    assert (first.name, first.mode, first.train_routers, first.train_shortcuts) == (
        "random", "random", False, True,
    )  # fmt: skip
    assert schedule.stage(299).name == "random"
    start = schedule.stage(300)
    assert (start.name, start.mode, start.train_routers, start.train_shortcuts) == (
        "routers", "soft", True, False,
    )  # fmt: skip
    assert (start.temperature, start.keep_bias) == (10.0, 5.0)
    tick = schedule.stage(305)  # 0.5 % later: one decay
    assert tick.temperature == pytest.approx(9.5) and tick.keep_bias == pytest.approx(4.25)
    assert schedule.stage(304).temperature == 10.0
    joint = schedule.stage(500)
    assert (joint.name, joint.keep_bias, joint.train_routers, joint.train_shortcuts) == (
        "joint", 0.0, True, True,
    )  # fmt: skip
    assert joint.temperature == pytest.approx(10 * 0.95**40)
    assert 0.005 < schedule.stage(999).temperature < 0.02  # "to about 0.01"


@pytest.mark.parametrize(
    ("kwargs", "error", "words"),
    [
        ({"total_steps": 0}, ValueError, "total_steps"),
        ({"random_until": 0.6}, ValueError, "random_until <= routers_until"),
        ({"routers_until": 1.5}, ValueError, "routers_until <= 1"),
        ({"random_until": "0.3"}, TypeError, "random_until must be a float"),
        ({"decay": 1.5}, ValueError, "decay must lie in"),
        ({"bias_decay": 0.0}, ValueError, "bias_decay"),
        ({"initial_temperature": -1.0}, ValueError, "initial_temperature"),
        ({"initial_keep_bias": float("nan")}, ValueError, "initial_keep_bias must be finite"),
        ({"tick": 0.0}, ValueError, "tick"),
    ],
)
def test_schedule_refuses_bad_settings(kwargs: dict, error: type, words: str) -> None:
    settings = {"total_steps": 100} | kwargs
    with pytest.raises(error, match=words):
        RouteSchedule(**settings)


def test_random_ramp_raises_the_skip_probability_to_the_target() -> None:
    schedule = RouteSchedule(100, random_ramp=True)  # stage 1: steps 0-29
    shares = [schedule.stage(step).skip_probability for step in range(30)]
    assert shares[0] == pytest.approx(1 / 30) and shares[-1] == pytest.approx(1.0)
    assert shares == sorted(shares)
    assert RouteSchedule(100).stage(0).skip_probability == 1.0
    assert schedule.stage(30).skip_probability is None
    model = tiny_model()
    patch_routes(model, RoutePlan(4, ratio=0.4, skip_rank=6))
    schedule.apply(model, 14)
    assert route_control(model).random_ratio == pytest.approx(0.4 * 15 / 30)
    with pytest.raises(TypeError, match="random_ramp must be a bool"):
        RouteSchedule(10, random_ramp=1)


def test_schedule_refuses_steps_outside_it() -> None:
    with pytest.raises(ValueError, match="step must be an int in"):
        RouteSchedule(10).stage(10)


def test_apply_sets_mode_and_what_trains() -> None:
    model = tiny_model()
    patch_routes(model, RoutePlan(4, skip_rank=6))
    schedule = RouteSchedule(10)
    control = route_control(model)
    for step, (mode, routers, shortcuts) in {
        0: ("random", False, True),
        4: ("soft", True, False),
        9: ("soft", True, True),
    }.items():
        schedule.apply(model, step)
        assert control.mode == mode
        assert all(b.router.weight.requires_grad == routers for b in model.layers)
        adapters = [
            p for b in model.layers for m in (b.route_pia, b.kept_adapter) for p in m.parameters()
        ]
        assert all(p.requires_grad == shortcuts for p in adapters)
    names = {"router", "route_pia", "kept_adapter"}
    base = [p for n, p in model.named_parameters() if not set(n.split(".")) & names]
    assert not any(p.requires_grad for p in base)


# ---------------------------------------------------------------------- the loss
def test_route_loss_is_roes_objective() -> None:
    model = tiny_model()
    patch_routes(model, RoutePlan(4, ratio=0.6, skip_rank=6))
    with torch.no_grad():
        for block in model.layers:
            block.router.weight.normal_()
    set_routing(model, "soft", temperature=3.0)
    tokens = torch.randint(1, 97, (3, 7), generator=torch.Generator().manual_seed(0))
    model(tokens)
    control = route_control(model)
    realized = torch.stack([w.detach().mean() for w in control.skip_weights.values()]).mean()
    assert 0 < float(realized) < 0.6
    ce = torch.tensor(0.4, requires_grad=True)
    loss, reported = route_loss(ce, model)
    expected = 0.4 + torch.exp(torch.tensor(-2.0)) * (0.6 - realized)
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(reported, realized.detach())
    loss.backward()
    assert ce.grad == pytest.approx(1.0)  # the weight exp(-5 CE) is detached
    assert all(b.router.weight.grad.abs().sum() > 0 for b in model.layers)
    control.plan = RoutePlan(4, ratio=0.0, skip_rank=6)  # above the target: no penalty
    loss, _ = route_loss(torch.tensor(0.4), model)
    assert loss.item() == pytest.approx(0.4)


def test_route_loss_refusals() -> None:
    model = tiny_model()
    patch_routes(model, RoutePlan(4, skip_rank=6))
    with pytest.raises(ValueError, match="no fresh call"):
        route_loss(torch.tensor(1.0), model)
    with pytest.raises(TypeError, match="scalar floating tensor"):
        route_loss(torch.ones(2), model)
    with pytest.raises(TypeError, match="not routed"):
        route_loss(torch.tensor(1.0), tiny_model())


# ---------------------------------------------------------------------- what it learns
def _pretrained(task, n_layers: int, seed: int) -> torch.nn.Module:
    """A tiny model trained on ``task`` (all its weights), in train mode."""
    model = tiny_model(seed, n_layers=n_layers).train()
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(300 if n_layers > 2 else 400):
        loss = task(model, generator, None)[0]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model


def _train_routers(
    model: torch.nn.Module, task, steps: int, seed: int, batch: int | None = None
) -> None:
    """RoE's schedule on the routers only, with the regularised loss."""
    control = route_control(model)
    control.generator = torch.Generator().manual_seed(seed + 1)
    routers = [block.router.weight for block in model.layers if hasattr(block, "router")]
    optimizer = torch.optim.Adam(routers, lr=1e-2)
    schedule = RouteSchedule(steps)
    generator = torch.Generator().manual_seed(seed + 2)
    for step in range(steps):
        schedule.apply(model, step)
        ce = task(model, generator, batch)[0]
        loss, _ = route_loss(ce, model)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    set_routing(model, "hard")


def _progressions(model, generator, batch: int | None):
    """Next-token prediction of arithmetic progressions mod 97 (steps 1-3); the prompt
    is the first 4 tokens."""
    batch = batch or 16
    start = torch.randint(0, 97, (batch, 1), generator=generator)
    step = torch.randint(1, 4, (batch, 1), generator=generator)
    tokens = (start + step * torch.arange(12)) % 97
    prompt = torch.zeros(batch, 12, dtype=torch.bool)
    prompt[:, :4] = True
    logits = model(tokens, prompt_mask=prompt)
    return F.cross_entropy(logits[:, 3:-1].reshape(-1, 97), tokens[:, 4:].reshape(-1)), None


@pytest.mark.parametrize("ratio", [0.3, 0.5])
def test_regulariser_drives_the_realised_ratio_to_the_target(ratio: float) -> None:
    """Routers only (the shortcuts stay at zero, so skipping costs CE): the one-sided
    penalty pushes ρ̂ up to ρ and CE holds it there. The penalty acts only on batches
    whose ρ̂ falls below ρ, so batch noise biases the ratio upwards: measured at ρ = 0.3
    over 3 seeds, batches of 16 end at 0.34-0.36 and batches of 48 at 0.32-0.33."""
    model = _pretrained(_progressions, 4, seed=0)
    patch_routes(model, RoutePlan(4, ratio=ratio, skip_rank=6))
    _train_routers(model, _progressions, steps=300, seed=0, batch=48)
    with torch.no_grad():
        _progressions(model, torch.Generator().manual_seed(99), 256)
    realised = float(route_control(model).routes().float().mean())
    assert realised == pytest.approx(ratio, abs=0.05)


def _copy_or_constant(model, generator, batch: int | None):
    """Kind A (marker 95, last prompt token): answer the first token, which needs attention;
    kind B (marker 96): answer 0, which needs none. Examples alternate A, B."""
    batch = batch or 32
    kind_a = torch.arange(batch) % 2 == 0
    body = torch.randint(1, 95, (batch, 5), generator=generator)
    tokens = torch.cat([body, torch.where(kind_a, 95, 96)[:, None]], dim=1)
    target = torch.where(kind_a, body[:, 0], 0)
    return F.cross_entropy(model(tokens)[:, -1], target), kind_a


def test_routers_learn_which_examples_need_a_layer() -> None:
    model = _pretrained(_copy_or_constant, 2, seed=0)
    patch_routes(model, RoutePlan(2, ratio=0.5, skip_rank=6))
    _train_routers(model, _copy_or_constant, steps=200, seed=0)
    with torch.no_grad():
        _, kind_a = _copy_or_constant(model, torch.Generator().manual_seed(99), 256)
    skips = route_control(model).routes()
    correct = torch.where(kind_a, ~skips[:, 0], skips[:, 0]).float().mean()
    assert float(correct) >= 0.9, f"layer 0 routed correctly for {float(correct):.2f}"
    assert float(skips[kind_a].float().mean()) < float(skips[~kind_a].float().mean())


def _examples(count: int, seed: int = 0) -> list:
    from eas_kernels.tuning import Example

    generator = torch.Generator().manual_seed(seed)
    return [
        Example(tuple(torch.randint(1, 97, (5,), generator=generator).tolist()), (3, 4))
        for _ in range(count)
    ]


def test_route_tuner_pretunes_with_every_unit_kept_then_follows_roes_stages() -> None:
    from eas_kernels.tuning.route_trainer import RouteConfig, RouteTuner

    model = tiny_model()
    patch_routes(model, RoutePlan(4, skip_rank=6))
    seen, routers = [], []

    def progress(record: dict) -> None:
        seen.append(record)
        routers.append(model.layers[0].router.weight.abs().sum().item())

    config = RouteConfig(epochs=2, pretune_epochs=1, batch_size=4)
    tuner = RouteTuner(model, _examples(8), config, pad_id=0, progress=progress)
    assert tuner.total == 6
    result = tuner.run()
    stages = [record["stage"] for record in result.history]
    # RoE's 4 steps: progress 0 and 0.25 random, 0.5 and 0.75 joint (routers_until = 0.5)
    assert stages == ["pretune", "pretune", "random", "random", "joint", "joint"]
    assert all(r["realized_ratio"] == 0.0 for r in result.history[:2])
    assert routers[:3] == [0.0, 0.0, 0.0]  # untouched by pretuning and random routes
    assert model.layers[0].kept_adapter.up1.weight.abs().sum() > 0
    assert seen == result.history
    control = route_control(model)
    assert control.forced is None and control.mode == "hard" and not model.training


def test_route_config_refusals() -> None:
    from eas_kernels.tuning.route_trainer import RouteConfig, RouteTuner

    for kwargs, error, words in [
        ({"pretune_epochs": -1}, ValueError, "pretune_epochs"),
        ({"pretune_epochs": 1.5}, TypeError, "pretune_epochs"),
        ({"epochs": 0}, ValueError, "epochs"),
        ({"router_lr": 0.0}, ValueError, "router_lr"),
        ({"routers_until": 0.1}, ValueError, "random_until <= routers_until"),
    ]:
        with pytest.raises(error, match=words):
            RouteConfig(**kwargs).validate()
    with pytest.raises(TypeError, match="not routed"):
        RouteTuner(tiny_model(), _examples(2), RouteConfig(), pad_id=0)


def test_a_route_run_stopped_at_any_step_resumes_to_the_same_weights(tmp_path) -> None:
    """Stopped by an error after its checkpoint at step 3 (of 6: pretune, random and joint
    stages), a run resumes from the checkpoint to bitwise the weights, history and random
    routes of an uninterrupted run; a run folder of another configuration is refused."""
    from eas_kernels.tuning.route_trainer import RouteConfig, RouteTuner

    def routed() -> torch.nn.Module:
        model = tiny_model()
        patch_routes(model, RoutePlan(4, skip_rank=6))
        return model

    config = RouteConfig(epochs=2, pretune_epochs=1, batch_size=4, checkpoint_every=3)
    whole_model = routed()
    whole = RouteTuner(whole_model, _examples(8), config, pad_id=0).run()

    calls = 0

    def failing(model, batch):
        nonlocal calls
        calls += 1
        if calls == 5:
            raise RuntimeError("stopped")
        from eas_kernels.tuning import answer_loss

        return answer_loss(model, batch)

    first = RouteTuner(routed(), _examples(8), config, pad_id=0, run_dir=tmp_path, loss_fn=failing)
    with pytest.raises(RuntimeError, match="stopped"):
        first.run()
    resumed_model = routed()
    resumed = RouteTuner(resumed_model, _examples(8), config, pad_id=0, run_dir=tmp_path).run()
    assert [r["loss"] for r in resumed.history] == [r["loss"] for r in whole.history]
    whole_weights = dict(whole_model.named_parameters())
    for name, value in resumed_model.named_parameters():
        assert torch.equal(value, whole_weights[name]), name
    other = RouteConfig(epochs=2, pretune_epochs=1, batch_size=4, checkpoint_every=3, seed=1)
    with pytest.raises(ValueError, match="seed = 0"):
        RouteTuner(routed(), _examples(8), other, pad_id=0, run_dir=tmp_path).run()
