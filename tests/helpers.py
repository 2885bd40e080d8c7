"""Shared builders for the tests: tiny LaVIN-layout models and trained-looking PIAs."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import eas_kernels
from eas_kernels.models.lavin import ModelArgs, Transformer

PIA_MODULES = {"attn_adapter", "skip_pia", "ffn_skip_pia", "block_adapter"}


def tiny_args(**overrides: object) -> ModelArgs:
    values = dict(
        dim=48,
        n_layers=4,
        n_heads=4,
        n_kv_heads=2,
        vocab_size=97,
        multiple_of=32,
        max_seq_len=64,
        max_batch_size=8,
    )
    values.update(overrides)
    return ModelArgs(**values)


def tiny_model(
    seed: int = 0, dtype: torch.dtype = torch.float32, **overrides: object
) -> Transformer:
    """A random tiny model whose norms have non-trivial gains."""
    torch.manual_seed(seed)
    model = Transformer(tiny_args(**overrides))
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith("norm.weight"):
                parameter.uniform_(0.5, 1.5)
    return model.to(dtype).eval()


def randomize_pias(model: nn.Module, seed: int = 1, scale: float = 0.2) -> None:
    """Give every PIA parameter random non-zero values (up projections included)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if set(name.split(".")) & PIA_MODULES:
                noise = torch.randn(parameter.shape, generator=generator) * scale
                parameter.copy_(noise.to(parameter.dtype))


def patched(
    skipped: list[int],
    *,
    seed: int = 0,
    trained: bool = True,
    dtype: torch.dtype = torch.float32,
    search: bool | str = False,
    skipped_ffns: tuple[int, ...] = (),
    plan_options: dict[str, object] | None = None,
    **overrides: object,
) -> Transformer:
    model = tiny_model(seed, dtype, **overrides)
    plan = eas_kernels.SkipPlan(
        model.n_layers,
        skipped,
        skipped_ffns=skipped_ffns,
        skip_rank=6,
        adapter_rank=3,
        **(plan_options or {}),
    )
    eas_kernels.patch_lavin(model, plan, search=search)
    if trained:
        randomize_pias(model, seed + 1)
    return model


def left_pad(sequences: list[list[int]], pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``(tokens, real)``: left-padded ``(B, width)`` ids and the mask of real tokens."""
    width = max(len(s) for s in sequences)
    tokens = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    real = torch.zeros(len(sequences), width, dtype=torch.bool)
    for row, sequence in enumerate(sequences):
        tokens[row, width - len(sequence) :] = torch.tensor(sequence)
        real[row, width - len(sequence) :] = True
    return tokens, real


def random_sequences(lengths: list[int], vocab: int, seed: int) -> list[list[int]]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(1, vocab, (n,), generator=generator).tolist() for n in lengths]


def weights_snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bitwise equality (NaN payloads and signed zeros included)."""
    return (
        a.dtype == b.dtype
        and a.shape == b.shape
        and torch.equal(a.contiguous().view(torch.uint8), b.contiguous().view(torch.uint8))
    )


def assert_bitwise(model: nn.Module, snapshot: dict[str, torch.Tensor]) -> None:
    current = model.state_dict()
    assert current.keys() == snapshot.keys()
    for name, tensor in snapshot.items():
        assert same_bits(current[name], tensor), f"{name} changed"


_HOOKS_AND_CHILDREN = (
    "_modules",
    "_parameters",
    "_buffers",
    "_forward_hooks",
    "_forward_pre_hooks",
    "_state_dict_pre_hooks",
    "_state_dict_hooks",
    "_load_state_dict_pre_hooks",
    "_load_state_dict_post_hooks",
)


def structure(model: nn.Module) -> dict:
    """Everything but the weights that a patch may change: per module its instance
    attributes, children, parameters, buffers and hooks; each parameter's requires_grad."""
    described: dict = {
        name: (
            sorted(vars(module)),
            {key: list(getattr(module, key)) for key in _HOOKS_AND_CHILDREN},
        )
        for name, module in model.named_modules()
    }
    described["requires_grad"] = [(n, p.requires_grad) for n, p in model.named_parameters()]
    return described


def fail_at(monkeypatch, owner: object, name: str, at: int) -> None:
    """Make call number ``at`` (from 0) of ``owner.name`` raise ``KeyboardInterrupt``."""
    original = getattr(owner, name)
    calls = []

    def failing(*args, **kwargs):
        calls.append(None)
        if len(calls) - 1 == at:
            raise KeyboardInterrupt(f"{name} call {at}")
        return original(*args, **kwargs)

    monkeypatch.setattr(owner, name, failing)


def assert_all_or_nothing(monkeypatch, make_model, patch, unpatch, points) -> None:
    """Interrupt ``patch(model)`` at each of ``points`` (owner, method name, call index): the
    model stays bitwise and structurally as it was, and patches and unpatches afterwards."""
    for owner, name, at in points:
        model = make_model()
        before, weights = structure(model), weights_snapshot(model)
        with monkeypatch.context() as context:
            fail_at(context, owner, name, at)
            with pytest.raises(KeyboardInterrupt):
                patch(model)
        assert structure(model) == before, (name, at)
        assert_bitwise(model, weights)
        unpatch(patch(model))
        assert structure(model) == before, (name, at)


def decode_logits(model: nn.Module, tokens: torch.Tensor, steps: int = 3) -> torch.Tensor:
    """Logits ``(steps, B, vocab)`` of a prefill of ``tokens`` and ``steps - 1`` greedy
    decode steps (LaVIN call protocol); each call of it is a new prompt."""
    logits = []
    with torch.no_grad():
        last = model(tokens, start_pos=0)[:, -1]
        for step in range(steps):
            logits.append(last)
            last = model(last.argmax(-1, keepdim=True), start_pos=tokens.shape[1] + step)[:, -1]
    return torch.stack(logits)
