"""A LLaMA with LaVIN's / Meta LLaMA's structure and parameter names.

State dict keys are those of Meta's checkpoints (``tok_embeddings.weight``,
``layers.{i}.attention.wq.weight``, ``layers.{i}.feed_forward.w1.weight``,
``layers.{i}.attention_norm.weight``, ``layers.{i}.ffn_norm.weight``, ``norm.weight``,
``output.weight``), so a real LLaMA / LaVIN checkpoint loads with ``strict=True``. RoPE
uses Meta's interleaved-pair convention; grouped-query attention via ``n_kv_heads``.

Beyond Meta's code, the forward takes per-example padding (``attention_mask``): a padded
token is never attended to and positions count real tokens only, so a left-padded batch
gives every example the result it gets alone. The KV cache is allocated lazily at the
first cached call, with the rows of its batch (``max_batch_size`` bounds them), so an
attention that never runs (a skipped MHA) holds no cache and one that runs for some
examples only holds theirs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .._checks import check_positive_finite, check_positive_int, check_tensor


@dataclass
class ModelArgs:
    """Hyper-parameters (Meta LLaMA names; ``rope_theta`` and ``ffn_dim_multiplier`` as LLaMA 2)."""

    dim: int = 512
    n_layers: int = 8
    n_heads: int = 8
    n_kv_heads: int | None = None
    vocab_size: int = 32000
    multiple_of: int = 256
    ffn_dim_multiplier: float | None = None
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    max_seq_len: int = 2048
    max_batch_size: int = 32

    def __post_init__(self) -> None:
        for name in ("dim", "n_layers", "n_heads", "vocab_size", "multiple_of"):
            check_positive_int(getattr(self, name), name)
        for name in ("max_seq_len", "max_batch_size"):
            check_positive_int(getattr(self, name), name)
        if self.n_kv_heads is not None:
            check_positive_int(self.n_kv_heads, "n_kv_heads")
        check_positive_finite(self.norm_eps, "norm_eps")
        check_positive_finite(self.rope_theta, "rope_theta")
        if self.ffn_dim_multiplier is not None:
            check_positive_finite(self.ffn_dim_multiplier, "ffn_dim_multiplier")
        if self.dim % self.n_heads:
            raise ValueError(f"dim ({self.dim}) must be divisible by n_heads ({self.n_heads})")
        if (self.dim // self.n_heads) % 2:
            raise ValueError(f"head dim {self.dim // self.n_heads} must be even for RoPE")
        if self.n_heads % self.kv_heads:
            raise ValueError(
                f"n_heads ({self.n_heads}) must be a multiple of n_kv_heads ({self.kv_heads})"
            )

    @property
    def kv_heads(self) -> int:
        return self.n_heads if self.n_kv_heads is None else self.n_kv_heads

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def ffn_hidden_dim(self) -> int:
        """Meta's rule: ``2/3 · 4d``, scaled, rounded up to a multiple of ``multiple_of``."""
        hidden = int(2 * 4 * self.dim / 3)
        if self.ffn_dim_multiplier is not None:
            hidden = int(self.ffn_dim_multiplier * hidden)
        return self.multiple_of * math.ceil(hidden / self.multiple_of)


class RMSNorm(nn.Module):
    """``x / sqrt(mean(x²) + eps) · weight``, normalised in float32 (Meta's RMSNorm)."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        normed = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + self.eps)
        return normed.type_as(x) * self.weight


def precompute_freqs_cis(head_dim: int, end: int, theta: float) -> torch.Tensor:
    """Complex rotations ``exp(i · t · θ^(-2j/head_dim))``, shape ``(end, head_dim // 2)``."""
    freqs = 1.0 / (theta ** (torch.arange(0, head_dim, 2)[: head_dim // 2].double() / head_dim))
    angles = torch.outer(torch.arange(end, dtype=torch.float64), freqs)
    return torch.polar(torch.ones_like(angles), angles).to(torch.complex64)


def apply_rotary_emb(x: torch.Tensor, freqs_cis: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs of ``x`` ``(B, n, heads, hd)`` by ``freqs_cis`` ``(B, n, hd/2)``."""
    pairs = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
    rotated = torch.view_as_real(pairs * freqs_cis.unsqueeze(2)).flatten(3)
    return rotated.type_as(x)


class Attention(nn.Module):
    """Multi-head attention with grouped KV heads and a lazily allocated KV cache."""

    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.n_heads = args.n_heads
        self.n_kv_heads = args.kv_heads
        self.head_dim = args.head_dim
        self.max_batch_size = args.max_batch_size
        self.max_seq_len = args.max_seq_len
        self.wq = nn.Linear(args.dim, args.n_heads * args.head_dim, bias=False)
        self.wk = nn.Linear(args.dim, self.n_kv_heads * args.head_dim, bias=False)
        self.wv = nn.Linear(args.dim, self.n_kv_heads * args.head_dim, bias=False)
        self.wo = nn.Linear(args.n_heads * args.head_dim, args.dim, bias=False)
        self.cache_k: torch.Tensor | None = None
        self.cache_v: torch.Tensor | None = None

    def _cache(self, like: torch.Tensor, start_pos: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The KV cache, with a row per example of the calls so far: allocated at the first
        cached call with the rows of its batch, and again at a prefill that needs more (a
        per-example route that keeps this layer for 3 examples of 8 holds 3 rows)."""
        batch = like.shape[0]
        if (
            self.cache_k is None
            or self.cache_k.dtype != like.dtype
            or self.cache_k.device != like.device
            or (start_pos == 0 and self.cache_k.shape[0] < batch)
        ):
            shape = (batch, self.max_seq_len, self.n_kv_heads, self.head_dim)
            # Normal tensors even when first called under torch.inference_mode(), so that
            # later calls outside it can still write into them.
            with torch.inference_mode(False):
                self.cache_k = torch.zeros(shape, dtype=like.dtype, device=like.device)
                self.cache_v = torch.zeros(shape, dtype=like.dtype, device=like.device)
        assert self.cache_v is not None
        if self.cache_k.shape[0] < batch:
            raise RuntimeError(
                f"decode call with {batch} examples but the KV cache holds "
                f"{self.cache_k.shape[0]}: a decode call must continue its prefill's batch"
            )
        return self.cache_k, self.cache_v

    def forward(
        self,
        x: torch.Tensor,
        start_pos: int | None,
        freqs_cis: torch.Tensor,
        mask: torch.Tensor,
    ) -> torch.Tensor:
        """``x`` ``(B, n, dim)``; ``mask`` ``(B, 1, n, keys)`` bool, True where attended."""
        batch, seqlen, _ = x.shape
        xq = self.wq(x).view(batch, seqlen, self.n_heads, self.head_dim)
        xk = self.wk(x).view(batch, seqlen, self.n_kv_heads, self.head_dim)
        xv = self.wv(x).view(batch, seqlen, self.n_kv_heads, self.head_dim)
        xq = apply_rotary_emb(xq, freqs_cis)
        xk = apply_rotary_emb(xk, freqs_cis)
        if start_pos is None:
            keys, values = xk, xv
        else:
            cache_k, cache_v = self._cache(xk, start_pos)
            end = start_pos + seqlen
            cache_k[:batch, start_pos:end] = xk
            cache_v[:batch, start_pos:end] = xv
            keys, values = cache_k[:batch, :end], cache_v[:batch, :end]
        repeats = self.n_heads // self.n_kv_heads
        keys = keys.repeat_interleave(repeats, dim=2) if repeats > 1 else keys
        values = values.repeat_interleave(repeats, dim=2) if repeats > 1 else values
        out = F.scaled_dot_product_attention(
            xq.transpose(1, 2), keys.transpose(1, 2), values.transpose(1, 2), attn_mask=mask
        )
        return self.wo(out.transpose(1, 2).reshape(batch, seqlen, -1))


class FeedForward(nn.Module):
    """``W2(silu(W1 z) ⊙ W3 z)``."""

    def __init__(self, dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.w1 = nn.Linear(dim, hidden_dim, bias=False)
        self.w2 = nn.Linear(hidden_dim, dim, bias=False)
        self.w3 = nn.Linear(dim, hidden_dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class TransformerBlock(nn.Module):
    """Pre-norm block: ``h = x + Attn(attention_norm(x))``, ``out = h + FFN(ffn_norm(h))``."""

    def __init__(self, layer_id: int, args: ModelArgs) -> None:
        super().__init__()
        self.layer_id = layer_id
        self.attention = Attention(args)
        self.feed_forward = FeedForward(args.dim, args.ffn_hidden_dim)
        self.attention_norm = RMSNorm(args.dim, eps=args.norm_eps)
        self.ffn_norm = RMSNorm(args.dim, eps=args.norm_eps)

    def forward(
        self,
        x: torch.Tensor,
        start_pos: int | None,
        freqs_cis: torch.Tensor,
        mask: torch.Tensor,
    ) -> torch.Tensor:
        h = x + self.attention(self.attention_norm(x), start_pos, freqs_cis, mask)
        return h + self.feed_forward(self.ffn_norm(h))


class Transformer(nn.Module):
    """Decoder-only LLaMA. See :meth:`forward` for the training and cached-inference calls."""

    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        if not isinstance(args, ModelArgs):
            raise TypeError(f"args must be a ModelArgs, got {type(args).__name__}")
        self.params = args
        self.vocab_size = args.vocab_size
        self.n_layers = args.n_layers
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(TransformerBlock(i, args) for i in range(args.n_layers))
        self.norm = RMSNorm(args.dim, eps=args.norm_eps)
        self.output = nn.Linear(args.dim, args.vocab_size, bias=False)
        # A plain attribute, not a buffer: ``model.to(dtype)`` would cast a complex buffer to
        # real and drop the rotation. Moved to the tokens' device on use (as Meta does).
        self.freqs_cis = precompute_freqs_cis(args.head_dim, args.max_seq_len * 2, args.rope_theta)
        # Cached-inference bookkeeping (not part of the state dict): which cache slots hold
        # real tokens, and how many real tokens each example has seen.
        self._key_valid: torch.Tensor | None = None
        self._num_real: torch.Tensor | None = None
        self._cache_batch = 0

    def _check_mask(self, mask: object, name: str, tokens: torch.Tensor) -> torch.Tensor | None:
        if mask is None:
            return None
        check_tensor(mask, name, ndim=2, dtype=torch.bool, device=tokens.device)
        assert isinstance(mask, torch.Tensor)
        if mask.shape != tokens.shape:
            raise ValueError(
                f"{name} must have the shape of tokens {tuple(tokens.shape)}, "
                f"got {tuple(mask.shape)}"
            )
        return mask

    def _check_embeds(self, embeds: object, tokens: torch.Tensor) -> torch.Tensor:
        weight = self.tok_embeddings.weight
        check_tensor(embeds, "embeds", ndim=3, dtype=weight.dtype, device=weight.device)
        assert isinstance(embeds, torch.Tensor)
        if embeds.shape != (*tokens.shape, self.params.dim):
            raise ValueError(
                f"embeds must have shape {(*tokens.shape, self.params.dim)}, "
                f"got {tuple(embeds.shape)}"
            )
        return embeds

    def _check_call(self, tokens: object, start_pos: object) -> torch.Tensor:
        check_tensor(tokens, "tokens", ndim=2, device=self.tok_embeddings.weight.device)
        assert isinstance(tokens, torch.Tensor)
        if tokens.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"tokens must be int64 or int32, got {tokens.dtype}")
        if tokens.numel() == 0:
            raise ValueError(f"tokens must not be empty, got shape {tuple(tokens.shape)}")
        if tokens.shape[1] > self.params.max_seq_len:
            raise ValueError(
                f"sequence length {tokens.shape[1]} exceeds max_seq_len {self.params.max_seq_len}"
            )
        low, high = int(tokens.min()), int(tokens.max())
        if low < 0 or high >= self.vocab_size:
            raise ValueError(f"token ids must lie in [0, {self.vocab_size}), got [{low}, {high}]")
        if start_pos is not None:
            if isinstance(start_pos, bool) or not isinstance(start_pos, int) or start_pos < 0:
                raise TypeError(f"start_pos must be None or an int >= 0, got {start_pos!r}")
            if tokens.shape[0] > self.params.max_batch_size:
                raise ValueError(
                    f"batch size {tokens.shape[0]} exceeds max_batch_size "
                    f"{self.params.max_batch_size}"
                )
            if start_pos + tokens.shape[1] > self.params.max_seq_len:
                raise ValueError(
                    f"start_pos + n = {start_pos + tokens.shape[1]} exceeds max_seq_len "
                    f"{self.params.max_seq_len}"
                )
            if start_pos > 0 and (self._num_real is None or tokens.shape[0] != self._cache_batch):
                raise ValueError(
                    f"decode call (start_pos={start_pos}) with batch {tokens.shape[0]} does not "
                    f"continue a prefill (last prefill batch: {self._cache_batch or 'none'}); "
                    "call with start_pos=0 first"
                )
        return tokens

    def _positions_and_mask(
        self, tokens: torch.Tensor, start_pos: int | None, real: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """RoPE positions ``(B, n)``, the attention mask ``(B, 1, n, keys)`` and, for cached
        calls, each example's count of real tokens after this call (committed by
        :meth:`forward` once every layer has run)."""
        batch, seqlen = tokens.shape
        device = tokens.device
        steps = torch.arange(seqlen, device=device)
        if start_pos is None or start_pos == 0:
            if real is None:
                real = torch.ones_like(tokens, dtype=torch.bool)
            positions = (real.long().cumsum(dim=1) - 1).clamp(min=0)
            key_valid, offset = real, 0
            num_real = real.sum(dim=1) if start_pos == 0 else None
            if start_pos == 0:
                if self._key_valid is None or self._key_valid.device != device:
                    shape = (self.params.max_batch_size, self.params.max_seq_len)
                    with torch.inference_mode(False):  # see Attention._cache
                        self._key_valid = torch.zeros(shape, dtype=torch.bool, device=device)
                self._key_valid[:batch, :seqlen] = real
        else:
            assert self._key_valid is not None and self._num_real is not None
            positions = self._num_real.unsqueeze(1) + steps
            self._key_valid[:batch, start_pos : start_pos + seqlen] = True
            key_valid, offset = self._key_valid[:batch, : start_pos + seqlen], start_pos
            num_real = self._num_real + seqlen
        query_index = (offset + steps).unsqueeze(1)
        key_index = torch.arange(key_valid.shape[1], device=device).unsqueeze(0)
        causal = key_index <= query_index
        # A padding query attends to itself only, so its (unused) output stays finite.
        mask = (causal & key_valid.unsqueeze(1)) | (key_index == query_index)
        return positions, mask.unsqueeze(1), num_real

    def forward(
        self,
        tokens: torch.Tensor,
        start_pos: int | None = None,
        prompt_mask: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        embeds: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits ``(B, n, vocab_size)`` in float32.

        Args:
            tokens: ``(B, n)`` token ids.
            start_pos: ``None`` for the full-sequence training forward (causal, no cache);
                an int for cached inference: ``0`` is the prefill, ``> 0`` continues the
                sequences written by the previous calls (decode steps).
            prompt_mask: ``(B, n)`` bool, the prompt tokens (EAS_SPEC §3). The model itself
                only uses it at the prefill, as the default ``attention_mask``; a patched
                model's PIA states average over it (see ``eas_kernels.patch_lavin``).
            attention_mask: ``(B, n)`` bool, the real (non-padding) tokens, on a training
                forward or a prefill. Default: ``prompt_mask`` at the prefill, all tokens
                otherwise. Decode tokens are always real.
            embeds: ``(B, n, dim)`` input embeddings used instead of
                ``tok_embeddings(tokens)`` (a multimodal model puts image features there);
                ``tokens`` still give positions and are validated.
        """
        tokens = self._check_call(tokens, start_pos)
        prompt_mask = self._check_mask(prompt_mask, "prompt_mask", tokens)
        attention_mask = self._check_mask(attention_mask, "attention_mask", tokens)
        if (
            start_pos is not None
            and start_pos > 0
            and (prompt_mask is not None or attention_mask is not None)
        ):
            raise ValueError(
                "prompt_mask and attention_mask belong to a training forward or a prefill "
                f"(start_pos None or 0), not to a decode call (start_pos={start_pos})"
            )
        real = attention_mask
        if real is None and start_pos == 0:
            real = prompt_mask
        positions, mask, num_real = self._positions_and_mask(tokens, start_pos, real)
        if self.freqs_cis.device != tokens.device:
            self.freqs_cis = self.freqs_cis.to(tokens.device)
        freqs_cis = self.freqs_cis[positions]
        h = self.tok_embeddings(tokens) if embeds is None else self._check_embeds(embeds, tokens)
        for layer in self.layers:
            h = layer(h, start_pos, freqs_cis, mask)
        logits = self.output(self.norm(h)).float()
        if num_real is not None:
            self._num_real, self._cache_batch = num_real, tokens.shape[0]
        return logits
