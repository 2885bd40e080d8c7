"""Accuracy and decode speed of a tuned model, the way it is deployed (EAS_SPEC §3–4).

Accuracy: every test prompt is answered by greedy generation (prefill with the image, then
one token per decode call; at batch 1, or in left-padded batches with the low-rank or
eager mode) with the model's re-parameterisation mode, and counts when the generated
tokens equal the answer's tokens.

Decode speed: milliseconds per decode call at batch 1, the mean of the decode steps after
the first (the first decode step of a merged model also writes the PIAs into the
weights; it is reported apart), median over prompts.
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


@torch.no_grad()
def decode_timing(model: nn.Module, example: Example, steps: int) -> dict[str, float]:
    """Prefill one prompt (batch 1), then ``steps`` greedy decode calls, timed one by one."""
    if steps < 2:
        raise ValueError(
            f"steps must be >= 2 (the first decode step is reported apart), got {steps}"
        )
    tokens = torch.tensor([list(example.prompt)])
    prompt_mask = torch.ones_like(tokens, dtype=torch.bool)
    begin = time.perf_counter()
    logits = model(tokens, start_pos=0, prompt_mask=prompt_mask, **_prefill_kwargs(example))
    prefill = time.perf_counter() - begin
    position, times = tokens.shape[1], []
    for _ in range(steps):
        next_token = logits[:, -1].argmax(dim=-1, keepdim=True)
        begin = time.perf_counter()
        logits = model(next_token, start_pos=position)
        times.append(time.perf_counter() - begin)
        position += 1
    return {
        "prefill_ms": 1e3 * prefill,
        "first_decode_ms": 1e3 * times[0],
        "ms_per_token": 1e3 * statistics.fmean(times[1:]),
    }


def time_models(
    models: dict[str, tuple[nn.Module, str | None]], examples: Sequence[Example], steps: int
) -> dict[str, dict[str, Any]]:
    """Round-robin batch-1 decode timing of ``{name: (model, mode or None)}``.

    One warm-up round, then each prompt of ``examples`` on every model in turn (so that a
    background load hits all alike). Per model: the medians over prompts of
    ``ms_per_token``, ``first_decode_ms`` and ``prefill_ms``, each prompt's
    ``ms_per_token`` and the ``mode``.
    """
    runs: dict[str, list[dict[str, float]]] = {name: [] for name in models}
    for round_index, example in enumerate([examples[0], *examples]):
        for name, (model, mode) in models.items():
            _set_mode(model, mode)
            model.eval()
            result = decode_timing(model, example, steps)
            if round_index > 0:
                runs[name].append(result)
    summary: dict[str, dict[str, Any]] = {}
    for name, results in runs.items():
        summary[name] = {key: statistics.median(r[key] for r in results) for key in results[0]}
        summary[name]["ms_per_token_each_prompt"] = [r["ms_per_token"] for r in results]
        summary[name]["mode"] = models[name][1]
    return summary


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
