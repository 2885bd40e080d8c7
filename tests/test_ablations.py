"""The PIA ablations of the paper's Table 4: one down path (``token_mixing=False``) and
running instead of frozen states (``state="running"``), against the spec reference."""

from __future__ import annotations

import pytest
import torch

import eas_kernels
from eas_kernels import PIA, SkipPlan
from eas_kernels.pia import RunningSums
from tests.helpers import (
    assert_bitwise,
    left_pad,
    patched,
    random_sequences,
    tiny_model,
    weights_snapshot,
)
from tests.reference import eas_forward_reference, pia_reference

RUNNING = {"state": "running"}


# ---------------------------------------------------------------------------- the plan
def test_plan_options_round_trip_and_default_for_old_documents():
    plan = SkipPlan(6, [1, 4], token_mixing=False, state="running")
    assert SkipPlan.from_json(plan.to_json()) == plan
    assert "token_mixing=False" in repr(plan) and "state='running'" in repr(plan)
    old = plan.to_dict()
    del old["token_mixing"], old["state"]
    restored = SkipPlan.from_dict(old)
    assert restored.token_mixing is True and restored.state == "frozen"
    assert plan.replace(state="frozen").state == "frozen"


@pytest.mark.parametrize(
    ("options", "error", "message"),
    [
        ({"token_mixing": 1}, TypeError, "token_mixing must be a bool"),
        ({"state": "live"}, ValueError, "state must be one of"),
    ],
)
def test_plan_rejects_bad_options(options, error, message):
    with pytest.raises(error, match=message):
        SkipPlan(4, [1], **options)


# ---------------------------------------------------------------------------- one down path
def test_single_path_plan_builds_skip_pias_without_the_averaged_path():
    model = patched([1, 2], plan_options={"token_mixing": False})
    assert model.layers[1].skip_pia.down2 is None and model.layers[2].skip_pia.down2 is None
    assert eas_kernels.current_plan(model).token_mixing is False


@pytest.mark.parametrize("mode", ["eager", "merge", "lowrank"])
def test_single_path_plan_matches_reference_and_decodes_in_every_mode(mode):
    model = patched([1, 2], seed=3, plan_options={"token_mixing": False})
    sequence = random_sequences([10], vocab=97, seed=4)[0]
    tokens = torch.tensor([sequence])
    prompt = torch.zeros_like(tokens, dtype=torch.bool)
    prompt[0, :7] = True
    with torch.no_grad():
        teacher = model(tokens, prompt_mask=prompt)[0]
    expected = eas_forward_reference(model, tokens[0], 7, {1, 2})
    torch.testing.assert_close(teacher, expected, rtol=1e-5, atol=1e-5)
    eas_kernels.reparameterize(model, mode)
    with torch.no_grad():
        steps = [model(tokens[:, :7], start_pos=0, prompt_mask=prompt[:, :7])[0, -1]]
        for position in range(7, 10):
            steps.append(model(tokens[:, position : position + 1], start_pos=position)[0, -1])
    torch.testing.assert_close(torch.stack(steps), teacher[6:], rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------------------- running states
def _causal_reference(pia: PIA, u: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Token t of each example: the frozen-state formula with the state of tokens <= t
    selected by ``mask`` (zero mean before the first one), recomputed from scratch."""
    rows = []
    for b in range(u.shape[0]):
        tokens = []
        for t in range(u.shape[1]):
            selected = mask[b, : t + 1]
            if selected.any():
                delta = pia_reference(pia, u[b : b + 1, : t + 1], selected[None])[0, -1]
            else:  # nothing averaged yet: the state of a zero mean
                zero = torch.zeros(1, 1, u.shape[2], dtype=u.dtype)
                c = pia.down1.bias + (0 if pia.down2 is None else pia.down2(zero)[0, 0])
                alpha = torch.softmax(pia.router(zero)[0, 0] / pia.temperature, dim=-1)
                delta = pia_reference(pia, u[b : b + 1, t : t + 1], state=(c[None], alpha[None]))
                delta = delta[0, 0]
            tokens.append(delta)
        rows.append(torch.stack(tokens))
    return torch.stack(rows)


@pytest.mark.parametrize("token_mixing", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_running_pia_equals_the_per_token_reference(token_mixing, dtype):
    torch.manual_seed(0)
    pia = PIA(24, 5, token_mixing=token_mixing).to(dtype)
    with torch.no_grad():
        for parameter in pia.parameters():
            parameter.normal_(0, 0.3)
    u = torch.randn(3, 9, 24, dtype=dtype)
    mask = torch.ones(3, 9, dtype=torch.bool)
    mask[1, :4] = False  # left padding
    mask[2, [0, 5]] = False
    delta, sums = pia.running(u, mask)
    expected = _causal_reference(pia, u, mask)
    tolerance = 1e-5 if dtype == torch.float32 else 1e-12
    torch.testing.assert_close(delta, expected, rtol=tolerance, atol=tolerance)
    torch.testing.assert_close(sums.count, mask.sum(dim=1).to(sums.count.dtype))
    # two calls with the carry equal one call over the concatenation
    first, carry = pia.running(u[:, :5], mask[:, :5])
    second, carry = pia.running(u[:, 5:], mask[:, 5:], carry)
    torch.testing.assert_close(torch.cat([first, second], dim=1), delta)
    torch.testing.assert_close(carry.total, sums.total)


def test_running_pia_gradients_flow_to_every_parameter():
    torch.manual_seed(1)
    pia = PIA(16, 4)
    with torch.no_grad():
        pia.up1.weight.normal_()
        pia.up2.weight.normal_()
    u = torch.randn(2, 6, 16, requires_grad=True)
    delta, _ = pia.running(u)
    delta.square().sum().backward()
    assert u.grad is not None and bool(u.grad.abs().sum() > 0)
    for name, parameter in pia.named_parameters():
        assert parameter.grad is not None and bool(parameter.grad.abs().sum() > 0), name


def test_running_pia_rejects_bad_mask_and_carry():
    pia = PIA(8, 2)
    u = torch.randn(2, 3, 8)
    with pytest.raises(ValueError, match="mask must have shape"):
        pia.running(u, torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(TypeError, match="mask"):
        pia.running(u, torch.ones(2, 3))
    with pytest.raises(ValueError, match="carry must be the RunningSums of 2 examples"):
        pia.running(u, None, RunningSums(torch.zeros(3, 8), torch.zeros(3)))


@pytest.mark.parametrize(("mhas", "ffns"), [([1, 2], []), ([2], [0, 3]), ([0, 3], [0, 3])])
def test_running_model_matches_reference(mhas, ffns):
    model = patched(mhas, skipped_ffns=tuple(ffns), seed=7, plan_options=RUNNING)
    tokens = torch.tensor(random_sequences([11], vocab=97, seed=8))
    prompt = torch.zeros_like(tokens, dtype=torch.bool)
    prompt[0, :6] = True  # the answer after the prompt is averaged too, causally
    with torch.no_grad():
        ours = model(tokens, prompt_mask=prompt)[0]
    expected = eas_forward_reference(model, tokens[0], 6, set(mhas), set(ffns), running=True)
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-5)


def test_running_decoding_equals_teacher_forcing_with_left_padding():
    """A left-padded teacher-forced batch (what training sees) predicts each answer token
    as batch-1 incremental decoding does, the running sums growing by one per step."""
    model = patched([1, 2], seed=9, plan_options=RUNNING)
    prompts = random_sequences([5, 8], vocab=97, seed=10)
    answers = random_sequences([4, 3], vocab=97, seed=11)
    tokens, real = left_pad([p + a for p, a in zip(prompts, answers, strict=True)])
    prompt_mask = real.clone()
    width = tokens.shape[1]
    for row, answer in enumerate(answers):
        prompt_mask[row, width - len(answer) :] = False
    with torch.no_grad():
        forced = model(tokens, prompt_mask=prompt_mask, attention_mask=real)
        for row, (prompt, answer) in enumerate(zip(prompts, answers, strict=True)):
            steps = [model(torch.tensor([prompt]), start_pos=0)[:, -1]]
            for offset, token in enumerate(answer[:-1]):
                steps.append(model(torch.tensor([[token]]), start_pos=len(prompt) + offset)[:, -1])
            predicting = forced[row, width - len(answer) - 1 : width - 1]
            torch.testing.assert_close(torch.cat(steps), predicting, rtol=1e-4, atol=1e-4)


def test_running_model_refuses_reparameterisation_and_stays_unchanged():
    model = patched([1, 2], seed=2, plan_options=RUNNING)
    snapshot = weights_snapshot(model)
    for mode in ("merge", "lowrank"):
        with pytest.raises(ValueError, match="state='running'"):
            eas_kernels.reparameterize(model, mode)
    eas_kernels.reparameterize(model, "auto")  # resolves to eager
    tokens = torch.tensor(random_sequences([6], vocab=97, seed=3))
    with torch.no_grad():
        model(tokens, start_pos=0)
        model(tokens[:, :1], start_pos=6)
    assert_bitwise(model, snapshot)


def test_running_plan_survives_save_and_load(tmp_path):
    model = patched([1, 2], seed=4, plan_options={"state": "running", "token_mixing": False})
    eas_kernels.save_pretrained(model, tmp_path)
    fresh = eas_kernels.from_pretrained(tiny_model(4), tmp_path)
    plan = eas_kernels.current_plan(fresh)
    assert plan.state == "running" and plan.token_mixing is False
    tokens = torch.tensor(random_sequences([7], vocab=97, seed=6))
    with torch.no_grad():
        torch.testing.assert_close(fresh(tokens), model(tokens))
