"""Convert a Hugging Face ``LlamaForCausalLM`` into the LaVIN / Meta LLaMA layout.

Hugging Face and Meta store the same LLaMA under different names and with a different
row order in the query and key projections:

=============================================  =======================================
Hugging Face key                               Meta / LaVIN key
=============================================  =======================================
``model.embed_tokens.weight``                  ``tok_embeddings.weight``
``model.layers.{i}.self_attn.q_proj.weight``   ``layers.{i}.attention.wq.weight`` (*)
``model.layers.{i}.self_attn.k_proj.weight``   ``layers.{i}.attention.wk.weight`` (*)
``model.layers.{i}.self_attn.v_proj.weight``   ``layers.{i}.attention.wv.weight``
``model.layers.{i}.self_attn.o_proj.weight``   ``layers.{i}.attention.wo.weight``
``model.layers.{i}.mlp.gate_proj.weight``      ``layers.{i}.feed_forward.w1.weight``
``model.layers.{i}.mlp.down_proj.weight``      ``layers.{i}.feed_forward.w2.weight``
``model.layers.{i}.mlp.up_proj.weight``        ``layers.{i}.feed_forward.w3.weight``
``model.layers.{i}.input_layernorm.weight``    ``layers.{i}.attention_norm.weight``
``model.layers.{i}.post_attention_layernorm``  ``layers.{i}.ffn_norm.weight``
``model.norm.weight``                          ``norm.weight``
``lm_head.weight`` (absent when tied)          ``output.weight`` (the embedding if tied)
=============================================  =======================================

(*) RoPE. Meta rotates *interleaved pairs* ``(x[2j], x[2j+1])`` of each head by the
angle ``t·θ^(-2j/hd)``; Hugging Face rotates *halves* ``(x[j], x[j + hd/2])`` by the same
angle. Hugging Face's conversion script therefore permutes the rows of ``wq`` and ``wk``
within each head so that Meta row ``2j + s`` (``s ∈ {0, 1}``) becomes HF row
``s·hd/2 + j``. :func:`unpermute_rope_rows` undoes that: HF row ``s·hd/2 + j`` goes back
to Meta row ``2j + s``, per head (``n_heads`` heads for ``wq``, ``n_kv_heads`` for
``wk``). Since attention scores are dot products of a query and a key head permuted the
same way, the converted model computes the same function as the Hugging Face one.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from .lavin import ModelArgs, Transformer, precompute_freqs_cis

_FFN_MULTIPLES = (256, 128, 64, 32, 16, 8, 4, 2, 1)


def _config_value(config: Any, name: str, default: Any = None) -> Any:
    return getattr(config, name, default)


def _rope_settings(config: Any) -> tuple[float, dict[str, Any] | None]:
    """``(rope_theta, rope parameters)`` of a config from transformers 4.x or 5.x."""
    parameters = _config_value(config, "rope_parameters")
    if parameters is None:
        parameters = _config_value(config, "rope_scaling")
    theta = _config_value(config, "rope_theta")
    if isinstance(parameters, Mapping):
        parameters = dict(parameters)
        if theta is None:
            theta = parameters.get("rope_theta")
    elif parameters is not None:
        raise ValueError(
            f"config.rope_parameters must be a dict or None, got {type(parameters).__name__} "
            "(per-layer RoPE settings are not supported by the LaVIN layout)"
        )
    if theta is None:
        theta = 10000.0
    return float(theta), parameters


def _check_convertible(config: Any) -> None:
    """Raise ``ValueError`` naming every feature of ``config`` the LaVIN layout lacks."""
    problems: list[str] = []
    model_type = _config_value(config, "model_type")
    if model_type != "llama":
        problems.append(f"model_type is {model_type!r}, only 'llama' is converted")
    if _config_value(config, "attention_bias", False):
        problems.append("attention_bias=True (LaVIN's wq/wk/wv/wo have no bias)")
    if _config_value(config, "mlp_bias", False):
        problems.append("mlp_bias=True (LaVIN's w1/w2/w3 have no bias)")
    activation = _config_value(config, "hidden_act", "silu")
    if activation != "silu":
        problems.append(f"hidden_act={activation!r} (LaVIN's FFN uses silu)")
    hidden, heads = config.hidden_size, config.num_attention_heads
    if hidden % heads:
        problems.append(f"hidden_size {hidden} is not divisible by num_attention_heads {heads}")
    else:
        head_dim = _config_value(config, "head_dim")
        if head_dim is not None and head_dim != hidden // heads:
            problems.append(
                f"head_dim={head_dim} differs from hidden_size / num_attention_heads = "
                f"{hidden // heads} (LaVIN derives the head width from dim and n_heads)"
            )
    _, rope = _rope_settings(config)
    if rope is not None:
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        extra = sorted(set(rope) - {"rope_type", "type", "rope_theta"})
        if rope_type != "default" or extra:
            problems.append(
                f"RoPE scaling {rope!r}: only plain RoPE (rope_type 'default', i.e. "
                "rope_scaling=None) exists in the LaVIN layout"
            )
    if problems:
        raise ValueError("cannot convert this config to the LaVIN layout: " + "; ".join(problems))


def _ffn_sizing(dim: int, intermediate_size: int) -> tuple[int, float | None]:
    """``(multiple_of, ffn_dim_multiplier)`` for which Meta's rule gives ``intermediate_size``.

    Prefers no multiplier and the largest ``multiple_of`` (Meta's checkpoints use 256).
    """
    if isinstance(intermediate_size, bool) or not isinstance(intermediate_size, int):
        raise TypeError(f"intermediate_size must be an int, got {intermediate_size!r}")
    if intermediate_size <= 0:
        raise ValueError(f"intermediate_size must be positive, got {intermediate_size}")
    base = int(2 * 4 * dim / 3)
    candidates: list[tuple[int, float | None]] = [(m, None) for m in _FFN_MULTIPLES]
    ratio = intermediate_size / base
    for multiplier in (ratio, math.nextafter(ratio, math.inf)):
        candidates += [(m, multiplier) for m in _FFN_MULTIPLES]
    for multiple_of, multiplier in candidates:
        if intermediate_size % multiple_of:
            continue
        args = ModelArgs(dim=dim, n_heads=1, multiple_of=multiple_of, ffn_dim_multiplier=multiplier)
        if args.ffn_hidden_dim == intermediate_size:
            return multiple_of, multiplier
    raise ValueError(
        f"intermediate_size {intermediate_size} cannot be reproduced by Meta's FFN rule "
        f"multiple_of · ceil(int(ffn_dim_multiplier · int(8·{dim}/3)) / multiple_of) "
        f"for hidden size {dim} (int(8·{dim}/3) = {base})"
    )


def lavin_args_from_hf_config(
    config: Any, *, max_seq_len: int = 2048, max_batch_size: int = 8
) -> ModelArgs:
    """The :class:`~eas_kernels.models.lavin.ModelArgs` of a Hugging Face ``LlamaConfig``.

    ``dim = hidden_size``, ``n_layers = num_hidden_layers``, ``n_heads =
    num_attention_heads``, ``n_kv_heads = num_key_value_heads``, ``vocab_size``,
    ``norm_eps = rms_norm_eps`` and ``rope_theta`` carry over unchanged; ``multiple_of``
    and ``ffn_dim_multiplier`` are chosen so that ``ModelArgs.ffn_hidden_dim ==
    intermediate_size`` exactly. ``max_seq_len`` and ``max_batch_size`` size the KV cache
    of cached inference (``max_seq_len`` also bounds the positions of any call).

    Raises ``ValueError`` when the config has a feature the LaVIN layout lacks (attention
    or MLP bias, RoPE scaling, ``head_dim != hidden_size / num_attention_heads``, an
    activation other than silu, a model type other than ``llama``) or an FFN width that
    Meta's rule cannot give.
    """
    _check_convertible(config)
    theta, _ = _rope_settings(config)
    dim = int(config.hidden_size)
    multiple_of, multiplier = _ffn_sizing(dim, config.intermediate_size)
    kv_heads = _config_value(config, "num_key_value_heads")
    return ModelArgs(
        dim=dim,
        n_layers=int(config.num_hidden_layers),
        n_heads=int(config.num_attention_heads),
        n_kv_heads=None if kv_heads is None else int(kv_heads),
        vocab_size=int(config.vocab_size),
        multiple_of=multiple_of,
        ffn_dim_multiplier=multiplier,
        norm_eps=float(config.rms_norm_eps),
        rope_theta=theta,
        max_seq_len=max_seq_len,
        max_batch_size=max_batch_size,
    )


def unpermute_rope_rows(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Reorder the rows of a HF ``q_proj``/``k_proj`` weight for Meta's interleaved RoPE.

    ``weight`` is ``(n_heads · hd, d_in)`` with each head's rows in HF's rotate-half
    order (row ``s·hd/2 + j`` holds pair ``j``, element ``s``). Returns a new
    ``(n_heads · hd, d_in)`` tensor whose head rows are in Meta's order (row ``2j + s``).
    The inverse of HF's ``permute(w) = w.view(h, hd/2, 2, d).transpose(1, 2)``.
    """
    rows, columns = weight.shape
    if rows % n_heads or (rows // n_heads) % 2:
        raise ValueError(
            f"a RoPE projection of {rows} rows cannot hold {n_heads} heads of even width"
        )
    head_dim = rows // n_heads
    return (
        weight.reshape(n_heads, 2, head_dim // 2, columns)
        .transpose(1, 2)
        .reshape(rows, columns)
        .contiguous()
    )


def lavin_state_dict_from_hf(
    hf_state_dict: Mapping[str, torch.Tensor], args: ModelArgs
) -> dict[str, torch.Tensor]:
    """Meta-keyed state dict of a Hugging Face ``LlamaForCausalLM`` state dict.

    Keys are renamed as in the module docstring; ``wq`` and ``wk`` rows are unpermuted
    per head (:func:`unpermute_rope_rows` with ``args.n_heads`` and ``args.kv_heads``);
    when ``lm_head.weight`` is absent (tied embeddings) ``output.weight`` is the embedding
    matrix. Tensors keep their dtype; unpermuted ones are new tensors, the others are the
    input tensors themselves. A leading ``model.`` is optional on the input keys
    (``LlamaModel`` state dicts), and HF's non-persistent ``rotary_emb.inv_freq`` buffer
    is ignored.

    Raises ``KeyError`` for a missing key, ``ValueError`` for a leftover (unknown) key or
    a tensor whose shape does not fit ``args``.
    """
    if not isinstance(args, ModelArgs):
        raise TypeError(f"args must be a ModelArgs, got {type(args).__name__}")
    source: dict[str, torch.Tensor] = {}
    for key, tensor in hf_state_dict.items():
        name = key.removeprefix("model.")
        if name.endswith("rotary_emb.inv_freq"):
            continue
        source[name] = tensor
    used: set[str] = set()

    def take(name: str) -> torch.Tensor:
        if name not in source:
            raise KeyError(f"Hugging Face state dict has no {name!r} (nor 'model.{name}')")
        used.add(name)
        return source[name]

    head_dim, kv_dim = args.head_dim, args.kv_heads * args.head_dim
    hidden = args.ffn_hidden_dim
    out: dict[str, torch.Tensor] = {"tok_embeddings.weight": take("embed_tokens.weight")}
    expected: dict[str, tuple[int, ...]] = {"tok_embeddings.weight": (args.vocab_size, args.dim)}
    for i in range(args.n_layers):
        hf, meta = f"layers.{i}.", f"layers.{i}."
        attn, mlp = hf + "self_attn.", hf + "mlp."
        out[meta + "attention.wq.weight"] = unpermute_rope_rows(
            take(attn + "q_proj.weight"), args.n_heads
        )
        out[meta + "attention.wk.weight"] = unpermute_rope_rows(
            take(attn + "k_proj.weight"), args.kv_heads
        )
        out[meta + "attention.wv.weight"] = take(attn + "v_proj.weight")
        out[meta + "attention.wo.weight"] = take(attn + "o_proj.weight")
        out[meta + "feed_forward.w1.weight"] = take(mlp + "gate_proj.weight")
        out[meta + "feed_forward.w2.weight"] = take(mlp + "down_proj.weight")
        out[meta + "feed_forward.w3.weight"] = take(mlp + "up_proj.weight")
        out[meta + "attention_norm.weight"] = take(hf + "input_layernorm.weight")
        out[meta + "ffn_norm.weight"] = take(hf + "post_attention_layernorm.weight")
        expected.update(
            {
                meta + "attention.wq.weight": (args.n_heads * head_dim, args.dim),
                meta + "attention.wk.weight": (kv_dim, args.dim),
                meta + "attention.wv.weight": (kv_dim, args.dim),
                meta + "attention.wo.weight": (args.dim, args.n_heads * head_dim),
                meta + "feed_forward.w1.weight": (hidden, args.dim),
                meta + "feed_forward.w2.weight": (args.dim, hidden),
                meta + "feed_forward.w3.weight": (hidden, args.dim),
                meta + "attention_norm.weight": (args.dim,),
                meta + "ffn_norm.weight": (args.dim,),
            }
        )
    out["norm.weight"] = take("norm.weight")
    if "lm_head.weight" in source:
        out["output.weight"] = take("lm_head.weight")
    else:
        out["output.weight"] = out["tok_embeddings.weight"]
    expected["norm.weight"] = (args.dim,)
    expected["output.weight"] = (args.vocab_size, args.dim)
    leftover = sorted(set(source) - used)
    if leftover:
        shown = ", ".join(leftover[:5]) + (" ..." if len(leftover) > 5 else "")
        raise ValueError(
            f"Hugging Face state dict has {len(leftover)} key(s) the LaVIN layout has no place "
            f"for (biases? more layers than args.n_layers={args.n_layers}?): {shown}"
        )
    for key, shape in expected.items():
        if tuple(out[key].shape) != shape:
            raise ValueError(
                f"{key} must have shape {shape} for these args, got {tuple(out[key].shape)}"
            )
    return out


def lavin_from_hf(
    hf_model: nn.Module, *, max_seq_len: int = 2048, max_batch_size: int = 8
) -> Transformer:
    """A LaVIN-layout :class:`~eas_kernels.models.lavin.Transformer` computing ``hf_model``.

    ``hf_model`` is a Hugging Face ``LlamaForCausalLM`` (anything with ``.config`` and
    ``.state_dict()`` in its layout). The result has the same dtype and device as
    ``hf_model``'s embedding, its own copy of every weight (the input is not shared or
    changed; tied embeddings become two equal tensors ``tok_embeddings``/``output``),
    is loaded with ``strict=True`` and is in eval mode. Its training forward
    (``start_pos=None``) returns the logits of ``hf_model(input_ids).logits`` up to float
    rounding; see :func:`lavin_args_from_hf_config` for the arguments and the refused
    configs.
    """
    config = getattr(hf_model, "config", None)
    if config is None or not hasattr(hf_model, "state_dict"):
        raise TypeError(
            f"hf_model must be a Hugging Face LlamaForCausalLM, got {type(hf_model).__name__}"
        )
    args = lavin_args_from_hf_config(config, max_seq_len=max_seq_len, max_batch_size=max_batch_size)
    state = lavin_state_dict_from_hf(hf_model.state_dict(), args)
    reference = state["tok_embeddings.weight"]
    with torch.device("meta"):
        model = Transformer(args)
    model = model.to_empty(device=reference.device).to(reference.dtype)
    model.load_state_dict(state, strict=True)
    # to_empty leaves non-persistent buffers uninitialised: recompute the RoPE table.
    table = precompute_freqs_cis(args.head_dim, args.max_seq_len * 2, args.rope_theta)
    model.freqs_cis = table.to(reference.device)
    return model.eval()
