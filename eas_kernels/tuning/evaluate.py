"""Accuracy and decode speed of a tuned model, the way it is deployed (EAS_SPEC §3–4).

Accuracy: every test prompt is answered by greedy generation (prefill with the image, then
one token per decode call; at batch 1, or in left-padded batches with the low-rank or
eager mode) with the model's re-parameterisation mode, and counts when the generated
tokens equal the answer's tokens.

Decode speed: milliseconds per decode call at batch 1, the median over the decode steps
after each prompt's first (the first decode step of a merged model also writes the PIAs
into the weights; it is reported apart), with the models' calls interleaved step by step
so that two models can be compared call by call (:func:`paired_ratio`).
"""

from __future__ import annotations

import copy
import statistics
import time
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from .._checks import check_positive_int
from ..generation import greedy_generate
from ..layout import LAVIN
from ..patch import patch_of, runtime_of
from ..plan import SkipPlan
from ..reparam import reparameterize
from ..routing import route_control, set_routing
from .data import Example


def _prefill_kwargs(example: Example) -> dict[str, Any]:
    return {} if example.image is None else {"images": example.image.unsqueeze(0)}


def _set_mode(model: nn.Module, mode: str | None) -> None:
    try:
        patch_of(model)
    except TypeError:
        if mode is not None:
            raise
        return
    reparameterize(model, mode or "eager")


@torch.no_grad()
def answer_correct(
    model: nn.Module,
    examples: Sequence[Example],
    *,
    pad_id: int,
    mode: str | None = "merge",
    batch_size: int = 1,
) -> list[bool]:
    """For each of ``examples``, whether its greedy answer equals the answer tokens.

    ``mode`` is the :func:`~eas_kernels.reparameterize` mode (None: an unpatched model).
    With ``batch_size > 1`` examples whose answers have the same length are decoded
    together, left-padded, in order (``"merge"`` needs batch 1: use ``"lowrank"``, which is
    tested equal to it, or ``"eager"``); the answers are those of batch 1.
    """
    if not examples:
        raise ValueError("examples must not be empty")
    check_positive_int(batch_size, "batch_size")
    if batch_size > 1 and mode == "merge":
        raise ValueError('mode "merge" decodes one prompt at a time: use batch_size=1 or "lowrank"')
    _set_mode(model, mode)
    model.eval()
    by_length: dict[int, list[int]] = {}
    for index, example in enumerate(examples):
        by_length.setdefault(len(example.answer), []).append(index)
    correct = [False] * len(examples)
    for length, indices in by_length.items():
        for first in range(0, len(indices), batch_size):
            chunk = [examples[i] for i in indices[first : first + batch_size]]
            images = [e.image for e in chunk]
            if any(image is None for image in images) and not all(i is None for i in images):
                raise ValueError("either every example has an image or none has")
            kwargs = {} if images[0] is None else {"images": torch.stack(images)}
            generated = greedy_generate(
                model, [list(e.prompt) for e in chunk], length, pad_id=pad_id, prefill_kwargs=kwargs
            )
            for row, index in enumerate(indices[first : first + batch_size]):
                correct[index] = tuple(generated.tokens[row]) == tuple(examples[index].answer)
    return correct


@torch.no_grad()
def route_matrix(
    model: nn.Module, examples: Sequence[Example], *, pad_id: int, batch_size: int = 8
) -> torch.Tensor:
    """``(N, routed layers)`` bool: which units the hard route of each example's prompt
    skips, on a routed ``model`` (:func:`~eas_kernels.routing.patch_routes`): the routes
    its prefills freeze."""
    if not examples:
        raise ValueError("examples must not be empty")
    check_positive_int(batch_size, "batch_size")
    control = route_control(model)
    set_routing(model, "hard")
    model.eval()
    rows = []
    for first in range(0, len(examples), batch_size):
        chunk = examples[first : first + batch_size]
        images = [e.image for e in chunk]
        kwargs = {} if images[0] is None else {"images": torch.stack(images)}
        greedy_generate(
            model, [list(e.prompt) for e in chunk], 1, pad_id=pad_id, prefill_kwargs=kwargs
        )
        rows.append(control.routes())
    return torch.cat(rows)


def answer_accuracy(
    model: nn.Module,
    examples: Sequence[Example],
    *,
    pad_id: int,
    mode: str | None = "merge",
    batch_size: int = 1,
) -> float:
    """Fraction of ``examples`` answered exactly (:func:`answer_correct`)."""
    correct = answer_correct(model, examples, pad_id=pad_id, mode=mode, batch_size=batch_size)
    return sum(correct) / len(correct)


TIMING_METHOD = (
    "batch 1; per prompt: prefill, then greedy decode calls timed one by one, the models' "
    "calls interleaved step by step (order rotated) after a warm-up prompt; ms_per_token = "
    "median over the decode calls after each prompt's first (the first of a merged model "
    "includes the merge: first_decode_ms), with quartiles; ratios between models = median "
    "of their call-by-call ratios"
)


class _Decoder:
    """One model's batch-1 greedy decoding of one prompt, a call at a time."""

    def __init__(self, model: nn.Module, example: Example) -> None:
        self.model = model
        self.tokens = torch.tensor([list(example.prompt)])
        self.kwargs = _prefill_kwargs(example)
        self.logits: torch.Tensor | None = None
        self.position = 0

    def prefill(self) -> float:
        """Seconds of the prefill."""
        prompt_mask = torch.ones_like(self.tokens, dtype=torch.bool)
        begin = time.perf_counter()
        self.logits = self.model(self.tokens, start_pos=0, prompt_mask=prompt_mask, **self.kwargs)
        elapsed = time.perf_counter() - begin
        self.position = self.tokens.shape[1]
        return elapsed

    def step(self) -> float:
        """Seconds of one decode call on the last greedy token."""
        assert self.logits is not None
        next_token = self.logits[:, -1].argmax(dim=-1, keepdim=True)
        begin = time.perf_counter()
        self.logits = self.model(next_token, start_pos=self.position)
        elapsed = time.perf_counter() - begin
        self.position += 1
        return elapsed


@torch.no_grad()
def decode_timing(model: nn.Module, example: Example, steps: int) -> dict[str, Any]:
    """Prefill one prompt (batch 1), then ``steps`` greedy decode calls, timed one by one
    (:func:`time_models` of this one model, without a warm-up prompt)."""
    return time_models({"model": (model, None)}, [example], steps, warmup=False)["model"]


@torch.no_grad()
def time_models(
    models: dict[str, tuple[nn.Module, str | None]],
    examples: Sequence[Example],
    steps: int,
    *,
    warmup: bool = True,
) -> dict[str, dict[str, Any]]:
    """Batch-1 greedy decode timing of ``{name: (model, mode or None)}``, interleaved.

    For each prompt of ``examples`` (after a warm-up prompt, ``examples[0]``, unless
    ``warmup=False``) every model prefills, then the models take their decode steps in
    turn: step 1 of each, step 2 of each, ... with the order rotated at every call. So
    the models' calls for one step lie milliseconds apart and a change in the machine's
    load hits them alike; :func:`paired_ratio` compares two models call by call.

    Per model: ``ms_per_token`` (median over every decode call after the first of each
    prompt) and its quartiles ``ms_per_token_iqr``; ``first_decode_ms`` and
    ``prefill_ms`` (medians over prompts; the first decode call of a merged model also
    writes the PIAs into the weights); ``step_ms`` (those calls, prompt by prompt, in
    the same order for every model); ``mode``.
    """
    if steps < 2:
        raise ValueError(
            f"steps must be >= 2 (the first decode step is reported apart), got {steps}"
        )
    if not models or not examples:
        raise ValueError("time_models needs at least one model and one example")
    names = list(models)
    if len({id(model) for model, _ in models.values()}) < len(names):
        raise ValueError("time_models needs a distinct model object per name (copy it)")
    for model, mode in models.values():
        _set_mode(model, mode)
        model.eval()
    prefill: dict[str, list[float]] = {name: [] for name in names}
    first: dict[str, list[float]] = {name: [] for name in names}
    steady: dict[str, list[float]] = {name: [] for name in names}
    turn = 0
    prompts = [examples[0], *examples] if warmup else list(examples)
    for index, example in enumerate(prompts):
        counted = index > 0 or not warmup
        decoders = {name: _Decoder(models[name][0], example) for name in names}
        for step in range(steps + 1):  # step 0: the prefill
            order = names[turn % len(names) :] + names[: turn % len(names)]
            turn += 1
            for name in order:
                decoder = decoders[name]
                seconds = decoder.prefill() if step == 0 else decoder.step()
                if counted:
                    [prefill, first, steady][min(step, 2)][name].append(1e3 * seconds)
    summary: dict[str, dict[str, Any]] = {}
    for name in names:
        summary[name] = {
            "ms_per_token": statistics.median(steady[name]),
            "ms_per_token_iqr": _quartiles(steady[name]),
            "first_decode_ms": statistics.median(first[name]),
            "prefill_ms": statistics.median(prefill[name]),
            "step_ms": steady[name],
            "mode": models[name][1],
        }
    return summary


def paired_ratio(timings: dict[str, dict[str, Any]], name: str, reference: str) -> dict[str, Any]:
    """``name``'s decode time over ``reference``'s, call by call (:func:`time_models`
    interleaves them): the median and quartiles of the per-call ratios."""
    ours, theirs = timings[name]["step_ms"], timings[reference]["step_ms"]
    ratios = [a / b for a, b in zip(ours, theirs, strict=True)]
    return {"median": statistics.median(ratios), "iqr": _quartiles(ratios) or [ratios[0]] * 2}


def _quartiles(values: Sequence[float]) -> list[float] | None:
    """``[q1, q3]`` of ``values`` (None for a single value)."""
    if len(values) < 2:
        return None
    quartiles = statistics.quantiles(values, n=4)
    return [quartiles[0], quartiles[2]]


def tuned_parameter_count(model: nn.Module) -> int:
    """Parameters a tuning method trains: the PIAs of the current roles and, for a
    multimodal model, its projector."""
    pias = sum(p.numel() for site in runtime_of(model).active_sites for p in site.pia.parameters())
    projector = getattr(model, "projector", None)
    return pias + (0 if projector is None else sum(p.numel() for p in projector.parameters()))


def pretrained_parameter_count(llm: nn.Module) -> int:
    """Parameters of a LaVIN-layout language model, an output matrix equal to the token
    embedding (a tied checkpoint, copied by the conversion) counted once."""
    total = sum(p.numel() for p in llm.parameters())
    output, embedding = llm.output.weight, llm.tok_embeddings.weight
    if output is embedding or (output.shape == embedding.shape and torch.equal(output, embedding)):
        total -= output.numel()
    return total


def floor_model(model: nn.Module, plan: SkipPlan) -> nn.Module:
    """A copy of the *unpatched* ``model`` with the plan's skipped parts removed and
    nothing added: the speed limit of any adapter scheme for that plan.

    Blocks whose MHA is skipped run ``x + FFN(ffn_norm(x))``, blocks whose FFN is skipped
    drop the FFN's output, blocks skipped whole return ``x``. No adapter, hook or bias.
    """
    floor = copy.deepcopy(model)
    blocks = LAVIN.find_blocks(floor)
    if len(blocks) != plan.num_layers:
        raise ValueError(f"plan is for {plan.num_layers} layers, the model has {len(blocks)}")
    for index, block in enumerate(blocks):
        plan.role(index).install_floor(block, LAVIN, index)
    return floor
