"""Independent references written straight from EAS_SPEC.md, one example at a time.

Nothing here calls the package's PIA, runtime or ops: the PIA is the literal two-path
formula of §1, the block is §2 with hand-computed RMSNorms (so no patch hook fires), and
the frozen state of §3 is a mean over the first ``prompt_len`` tokens of an unpadded
sequence. Only the model's attention and FFN modules are reused (tested against Hugging
Face separately).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def linear(module: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    out = x @ module.weight.t().to(x.dtype)
    return out if module.bias is None else out + module.bias.to(x.dtype)


def pia_state_reference(pia: nn.Module, u: torch.Tensor, mask: torch.Tensor | None):
    """``(c, α)`` of one example ``u`` (``n × d``) per EAS_SPEC §1."""
    selected = u if mask is None else u[mask]
    mean = selected.sum(0) / selected.shape[0]
    c = pia.down1.bias.to(u.dtype)
    if pia.down2 is not None:
        c = c + linear(pia.down2, mean)
    alpha = torch.softmax(linear(pia.router, mean) / pia.temperature, dim=-1)
    return c, alpha


def pia_reference(
    pia: nn.Module,
    u: torch.Tensor,
    mask: torch.Tensor | None = None,
    state: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """``PIA(u)`` for a batch ``u`` (``B × n × d``), looping over examples."""
    outputs = []
    for b in range(u.shape[0]):
        if state is None:
            c, alpha = pia_state_reference(pia, u[b], None if mask is None else mask[b])
        else:
            c, alpha = state[0][b], state[1][b]
        hidden = u[b] @ pia.down1.weight.t().to(u.dtype) + c
        outputs.append(alpha[0] * linear(pia.up1, hidden) + alpha[1] * linear(pia.up2, hidden))
    return torch.stack(outputs)


def pia_running_reference(pia: nn.Module, u: torch.Tensor, mask=None, state=None) -> torch.Tensor:
    """``PIA(u)`` with running states (``SkipPlan(state="running")``) for an unpadded batch:
    token ``t`` uses the state of the mean of tokens ``0..t``, recomputed from scratch."""
    outputs = []
    for t in range(u.shape[1]):
        prefix = u[:, : t + 1]
        outputs.append(pia_reference(pia, prefix)[:, -1])
    return torch.stack(outputs, dim=1)


def rms_norm(norm: nn.Module, x: torch.Tensor) -> torch.Tensor:
    normed = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + norm.eps)
    return normed.type_as(x) * norm.weight


def ffn(feed_forward: nn.Module, z: torch.Tensor) -> torch.Tensor:
    return linear(feed_forward.w2, F.silu(linear(feed_forward.w1, z)) * linear(feed_forward.w3, z))


def _sequence(model: nn.Module, tokens: torch.Tensor, prompt_len: int) -> tuple:
    """One unpadded sequence's prompt mask ``(1, n)``, causal mask, RoPE rotations and
    input embeddings ``(1, n, d)``."""
    n = tokens.shape[0]
    mask = torch.zeros(1, n, dtype=torch.bool)
    mask[0, :prompt_len] = True
    causal = torch.ones(n, n, dtype=torch.bool).tril()[None, None]
    return mask, causal, model.freqs_cis[:n][None], model.tok_embeddings.weight[tokens][None]


def eas_forward_reference(
    model: nn.Module,
    tokens: torch.Tensor,
    prompt_len: int,
    skipped: set[int],
    skipped_ffns: set[int] = frozenset(),
    running: bool = False,
) -> torch.Tensor:
    """Logits ``(n, vocab)`` of one unpadded sequence through the EAS model of §2–3.

    PIA states average the first ``prompt_len`` tokens. Layers in ``skipped`` only run
    ``x + FFN(v + PIA_s(v))``; in ``skipped_ffns`` only ``x + Attn(u + PIA_f(u))``; in
    both ``x + A(u)`` (DAS, §6); the others ``x + Attn(u + PIA_a(u))`` then the FFN. A layer
    without the PIA its role needs uses none (the unpatched block, or the parts removed).
    ``running``: every PIA uses running states instead (``prompt_len`` is then unused,
    since the prompt and everything after it are averaged causally).
    """
    adapt = pia_running_reference if running else pia_reference
    mask, causal, freqs, x = _sequence(model, tokens, prompt_len)
    for index, block in enumerate(model.layers):
        mha_skipped, ffn_skipped = index in skipped, index in skipped_ffns
        if mha_skipped and ffn_skipped:
            adapter = getattr(block, "block_adapter", None)
            u = rms_norm(block.attention_norm, x)
            x = x if adapter is None else x + adapt(adapter, u, mask)
        elif mha_skipped:
            v = rms_norm(block.ffn_norm, x)
            pia = getattr(block, "skip_pia", None)
            z = v if pia is None else v + adapt(pia, v, mask)
            x = x + ffn(block.feed_forward, z)
        else:
            u = rms_norm(block.attention_norm, x)
            adapter = getattr(block, "ffn_skip_pia" if ffn_skipped else "attn_adapter", None)
            if adapter is not None:
                u = u + adapt(adapter, u, mask)
            h = x + block.attention(u, None, freqs, causal)
            x = h if ffn_skipped else h + ffn(block.feed_forward, rms_norm(block.ffn_norm, h))
    return linear(model.output, rms_norm(model.norm, x))[0].float()


def merged_weight_reference(
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    down_weight: torch.Tensor,
    up1: nn.Linear,
    up2: nn.Linear,
    c: torch.Tensor,
    alpha: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """EAS_SPEC §4 with the dense ``d × d`` matrix (fine for a reference, float64)."""
    w_u = alpha[0] * up1.weight.t() + alpha[1] * up2.weight.t()
    beta = c @ w_u + alpha[0] * up1.bias + alpha[1] * up2.bias
    dense = torch.eye(weight.shape[1], dtype=weight.dtype) + down_weight.t() @ w_u
    new_weight = weight @ dense.t()
    new_bias = beta @ weight.t() + (0 if bias is None else bias)
    return new_weight, new_bias


def routed_forward_reference(
    model: nn.Module,
    tokens: torch.Tensor,
    prompt_len: int,
    unit: str,
    forced: dict[int, bool] | None = None,
    soft: tuple[float, float] | None = None,
) -> tuple[torch.Tensor, dict[int, float]]:
    """Logits ``(n, vocab)`` of one unpadded sequence through a routed model (ROE_SPEC
    §2–§4), and each routed layer's ``w_skip``.

    Routed layers are the blocks with a ``router`` and a ``route_pia``; a block with a
    ``kept_adapter`` ``A_k`` runs ``x + Attn(u + A_k(u))`` on its kept branch. The route reads
    ``ū``, the mean of ``attention_norm(x)`` over the first ``prompt_len`` tokens:
    ``g = ū Wᵀ`` (keep, skip). Hard (``soft`` None): skip iff ``g_skip > g_keep``, unless
    ``forced[layer]`` says otherwise. ``soft = (τ, b)``: ``w = softmax((g + [b, 0]) / τ)``
    and the output mixes both branches. Skip branch: ``x + FFN(v + PIA_s(v))`` (unit
    ``mha``) or ``x + A(attention_norm(x))`` (``block``); PIA states over the prompt.
    """
    mask, causal, freqs, x = _sequence(model, tokens, prompt_len)
    weights: dict[int, float] = {}
    for index, block in enumerate(model.layers):
        u = rms_norm(block.attention_norm, x)
        adapter = getattr(block, "kept_adapter", None)
        z = u if adapter is None else u + pia_reference(adapter, u, mask)
        h = x + block.attention(z, None, freqs, causal)
        kept = h + ffn(block.feed_forward, rms_norm(block.ffn_norm, h))
        router = getattr(block, "router", None)
        if router is None:
            x = kept
            continue
        if unit == "mha":
            v = rms_norm(block.ffn_norm, x)
            skipped = x + ffn(block.feed_forward, v + pia_reference(block.route_pia, v, mask))
        else:
            skipped = x + pia_reference(block.route_pia, u, mask)
        mean = u[0, :prompt_len].double().mean(0)
        logits = mean @ router.weight.double().t()
        if soft is None:
            skip = bool(logits[1] > logits[0]) if forced is None else forced[index]
            w_skip = float(skip)
        else:
            temperature, bias = soft
            soft_logits = (logits + torch.tensor([bias, 0.0]).double()) / temperature
            w_skip = float(torch.softmax(soft_logits.detach(), 0)[1])
        weights[index] = w_skip
        x = (1 - w_skip) * kept + w_skip * skipped
    return linear(model.output, rms_norm(model.norm, x))[0].float(), weights
