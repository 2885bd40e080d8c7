"""Hugging Face LLaMA -> LaVIN layout: same function, tiny random models and real SmolLM2.

Tolerances. Both implementations compute in float32; they differ in accumulation order
(fused vs separate projections, SDPA kernels) and in the RoPE tables (Meta's are built in
float64 and rounded to complex64, HF's cos/sin are computed in float32). For the tiny
models that gives differences of order 1e-6 of the logit scale; 1e-4 relative to the
largest logit leaves a wide margin and still catches any wrong permutation or key (those
give O(1) relative errors). For the real 30-layer SmolLM2 the measured difference is
about 5e-5 on logits of magnitude 27-37; the bound 2e-3 absolute is 40x that and three
orders of magnitude below the logit gaps that decide a greedy token.
"""

from __future__ import annotations

import types

import pytest
import torch

from eas_kernels import greedy_generate
from eas_kernels.models import convert
from eas_kernels.models.convert import (
    lavin_args_from_hf_config,
    lavin_from_hf,
    lavin_state_dict_from_hf,
    unpermute_rope_rows,
)
from eas_kernels.models.lavin import ModelArgs, Transformer

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.transformers  # .ci/run runs these on the oldest transformers too
LlamaConfig = transformers.LlamaConfig
LlamaForCausalLM = transformers.LlamaForCausalLM

VOCAB = 101


def tiny_config(**overrides: object) -> LlamaConfig:
    values: dict[str, object] = dict(
        vocab_size=VOCAB,
        hidden_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=192,  # Meta's rule for d=64 with multiple_of=64
        rope_theta=1e5,
        rms_norm_eps=1e-5,
        max_position_embeddings=128,
        tie_word_embeddings=False,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    values.update(overrides)
    return LlamaConfig(**values)


def tiny_hf(seed: int = 0, **overrides: object) -> LlamaForCausalLM:
    """A random HF LLaMA with weights large enough for non-trivial logits and norm gains."""
    torch.manual_seed(seed)
    model = LlamaForCausalLM(tiny_config(**overrides))
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith("norm.weight"):
                parameter.uniform_(0.5, 1.5)
            else:
                parameter.normal_(0.0, 0.15)
    return model.eval()


def assert_logits_close(ours: torch.Tensor, ref: torch.Tensor, rel: float = 1e-4) -> None:
    scale = ref.abs().max().item()
    assert scale > 1.0, "logits too small to make the comparison meaningful"
    diff = (ours - ref).abs().max().item()
    assert diff <= rel * scale, f"max |diff| {diff:.3g} > {rel:g} x logit scale {scale:.3g}"


def hf_positions(mask: torch.Tensor) -> torch.Tensor:
    """Positions counting real tokens only (what HF's generate passes for left padding)."""
    return (mask.long().cumsum(dim=1) - 1).clamp(min=0)


# --------------------------------------------------------------------------- tiny models


@pytest.mark.parametrize("tied", [False, True])
def test_training_forward_equals_hf(tied: bool) -> None:
    hf = tiny_hf(seed=1, tie_word_embeddings=tied)
    tied_in_hf = hf.lm_head.weight.data_ptr() == hf.model.embed_tokens.weight.data_ptr()
    assert tied_in_hf == tied
    ours = lavin_from_hf(hf, max_seq_len=64, max_batch_size=4)
    assert isinstance(ours, Transformer) and not ours.training
    assert ours.params.ffn_hidden_dim == 192
    assert ours.params.rope_theta == 1e5 and ours.params.norm_eps == 1e-5
    assert (ours.params.n_heads, ours.params.kv_heads) == (4, 2)
    tokens = torch.randint(3, VOCAB, (3, 13), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = hf(tokens).logits
        got = ours(tokens)
    assert got.dtype == torch.float32 and got.shape == (3, 13, VOCAB)
    assert_logits_close(got, ref)
    if tied:
        assert torch.equal(ours.output.weight, ours.tok_embeddings.weight)
        assert ours.output.weight.data_ptr() != ours.tok_embeddings.weight.data_ptr()


def test_converted_model_owns_its_weights_and_keeps_hf_unchanged() -> None:
    hf = tiny_hf(seed=2)
    before = {k: v.clone() for k, v in hf.state_dict().items()}
    ours = lavin_from_hf(hf, max_seq_len=32)
    hf_ptrs = {v.data_ptr() for v in hf.state_dict().values()}
    assert all(p.data_ptr() not in hf_ptrs for p in ours.parameters())
    with torch.no_grad():
        for parameter in ours.parameters():
            parameter.add_(1.0)
    after = hf.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_incremental_decoding_equals_full_forward() -> None:
    hf = tiny_hf(seed=3)
    ours = lavin_from_hf(hf, max_seq_len=32, max_batch_size=2)
    tokens = torch.randint(3, VOCAB, (2, 12), generator=torch.Generator().manual_seed(1))
    prefill = 5
    with torch.no_grad():
        full = ours(tokens)
        ref = hf(tokens).logits
        steps = [ours(tokens[:, :prefill], start_pos=0)]
        for position in range(prefill, tokens.shape[1]):
            steps.append(ours(tokens[:, position : position + 1], start_pos=position))
    cached = torch.cat(steps, dim=1)
    assert_logits_close(cached, full, rel=1e-5)
    assert_logits_close(cached, ref)


def test_left_padded_batch_equals_hf_with_attention_mask() -> None:
    hf = tiny_hf(seed=4, tie_word_embeddings=True)
    ours = lavin_from_hf(hf, max_seq_len=32, max_batch_size=4)
    generator = torch.Generator().manual_seed(2)
    lengths = [10, 4, 7]
    width = max(lengths)
    tokens = torch.zeros(len(lengths), width, dtype=torch.long)
    mask = torch.zeros(len(lengths), width, dtype=torch.bool)
    for row, length in enumerate(lengths):
        tokens[row, width - length :] = torch.randint(3, VOCAB, (length,), generator=generator)
        mask[row, width - length :] = True
    with torch.no_grad():
        ref = hf(tokens, attention_mask=mask.long(), position_ids=hf_positions(mask)).logits
        got = ours(tokens, attention_mask=mask)
        alone = [ours(tokens[row : row + 1, width - n :]) for row, n in enumerate(lengths)]
    for row, length in enumerate(lengths):
        assert_logits_close(got[row, width - length :], ref[row, width - length :])
        assert_logits_close(got[row, width - length :], alone[row][0], rel=1e-5)


def test_greedy_generate_matches_hf_generate_on_tiny_model() -> None:
    hf = tiny_hf(seed=5)
    ours = lavin_from_hf(hf, max_seq_len=32, max_batch_size=2)
    prompt = torch.randint(3, VOCAB, (6,), generator=torch.Generator().manual_seed(3)).tolist()
    mine = greedy_generate(ours, [prompt], 8).tokens[0]
    with torch.no_grad():
        out = hf.generate(
            torch.tensor([prompt]),
            max_new_tokens=8,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=0,
        )
    theirs = out[0, len(prompt) :].tolist()
    assert_same_greedy(mine, theirs, eos=2)


def test_bfloat16_model_converts_to_bfloat16() -> None:
    hf = tiny_hf(seed=6).to(torch.bfloat16)
    ours = lavin_from_hf(hf, max_seq_len=16)
    assert {p.dtype for p in ours.parameters()} == {torch.bfloat16}
    assert ours.freqs_cis.dtype == torch.complex64
    tokens = torch.randint(3, VOCAB, (1, 7), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        assert torch.isfinite(ours(tokens)).all()


# --------------------------------------------------------------------------- the mapping


def hf_permute(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """HF's conversion script: Meta row order -> rotate-half row order, per head."""
    rows, columns = weight.shape
    return (
        weight.view(n_heads, rows // n_heads // 2, 2, columns)
        .transpose(1, 2)
        .reshape(rows, columns)
    )


def test_unpermute_inverts_hf_permutation_per_head() -> None:
    weight = torch.randn(3 * 8, 5)
    assert torch.equal(unpermute_rope_rows(hf_permute(weight, 3), 3), weight)
    # Row 2j + s of head h comes from HF row h*hd + s*hd/2 + j (hd = 8).
    hf_rows = torch.arange(24, dtype=torch.float32).unsqueeze(1)
    meta = unpermute_rope_rows(hf_rows, 3).flatten().long().tolist()
    assert meta[:8] == [0, 4, 1, 5, 2, 6, 3, 7]
    assert meta[8:16] == [8 + i for i in [0, 4, 1, 5, 2, 6, 3, 7]]
    with pytest.raises(ValueError, match="even width"):
        unpermute_rope_rows(torch.randn(9, 4), 3)


def test_state_dict_keys_are_exactly_the_transformer_keys() -> None:
    hf = tiny_hf(seed=7)
    args = lavin_args_from_hf_config(hf.config, max_seq_len=16)
    state = lavin_state_dict_from_hf(hf.state_dict(), args)
    assert set(state) == set(Transformer(args).state_dict())
    hf_state = hf.state_dict()
    state = lavin_state_dict_from_hf(hf_state, args)  # one call: the same tensor objects
    for meta, name in [("w1", "gate_proj"), ("w2", "down_proj"), ("w3", "up_proj")]:
        got = state[f"layers.2.feed_forward.{meta}.weight"]
        assert got is hf_state[f"model.layers.2.mlp.{name}.weight"]
    assert torch.equal(
        hf_permute(state["layers.1.attention.wk.weight"], 2),
        hf_state["model.layers.1.self_attn.k_proj.weight"],
    )
    assert torch.equal(
        hf_permute(state["layers.1.attention.wq.weight"], 4),
        hf_state["model.layers.1.self_attn.q_proj.weight"],
    )
    assert state["output.weight"] is hf_state["lm_head.weight"]
    without_head = {k: v for k, v in hf_state.items() if k != "lm_head.weight"}
    tied = lavin_state_dict_from_hf(without_head, args)
    assert tied["output.weight"] is hf_state["model.embed_tokens.weight"]
    bare = {k.removeprefix("model."): v for k, v in without_head.items()}  # a LlamaModel
    assert set(lavin_state_dict_from_hf(bare, args)) == set(state)


def test_ffn_sizing_reproduces_intermediate_size() -> None:
    for size, multiple_of in [(192, 64), (256, 256), (100, 4), (170, 2), (1000, 8), (7, 1)]:
        args = lavin_args_from_hf_config(tiny_config(intermediate_size=size))
        assert args.ffn_hidden_dim == size
        assert args.multiple_of == multiple_of
    assert lavin_args_from_hf_config(tiny_config(intermediate_size=192)).ffn_dim_multiplier is None
    smol = tiny_config(
        hidden_size=576, num_attention_heads=9, num_key_value_heads=3, intermediate_size=1536
    )
    smol_args = lavin_args_from_hf_config(smol)
    assert (smol_args.multiple_of, smol_args.ffn_dim_multiplier) == (256, None)
    assert smol_args.head_dim == 64


# --------------------------------------------------------------------------- refusals


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"attention_bias": True}, "attention_bias"),
        ({"mlp_bias": True}, "mlp_bias"),
        ({"rope_scaling": {"rope_type": "linear", "factor": 2.0}}, "RoPE scaling"),
        ({"rope_scaling": {"rope_type": "dynamic", "factor": 2.0}}, "RoPE scaling"),
        ({"head_dim": 32}, "head_dim=32"),
        ({"hidden_act": "gelu"}, "hidden_act"),
    ],
)
def test_unsupported_configs_are_refused(overrides: dict, message: str) -> None:
    config = tiny_config(**overrides)
    with pytest.raises(ValueError, match=message):
        lavin_args_from_hf_config(config)
    with pytest.raises(ValueError, match="cannot convert"):
        lavin_from_hf(LlamaForCausalLM(config))


def test_other_model_types_and_bad_sizes_are_refused() -> None:
    mistral = transformers.MistralConfig(
        hidden_size=64, num_attention_heads=4, num_key_value_heads=2, intermediate_size=192
    )
    with pytest.raises(ValueError, match="model_type is 'mistral'"):
        lavin_args_from_hf_config(mistral)
    config = types.SimpleNamespace(**tiny_config().to_dict())  # a config without validation
    assert lavin_args_from_hf_config(config).ffn_hidden_dim == 192
    config.intermediate_size = 0
    with pytest.raises(ValueError, match="intermediate_size must be positive"):
        lavin_args_from_hf_config(config)
    config.intermediate_size = 19.5
    with pytest.raises(TypeError, match="intermediate_size must be an int"):
        lavin_args_from_hf_config(config)
    with pytest.raises(ValueError, match="cannot be reproduced"):
        convert._ffn_sizing(64, 2**70 + 1)  # past float precision: no multiplier gives it
    with pytest.raises(TypeError, match="LlamaForCausalLM"):
        lavin_from_hf(torch.nn.Linear(2, 2))


def test_bad_state_dicts_are_refused() -> None:
    hf = tiny_hf(seed=8)
    args = lavin_args_from_hf_config(hf.config)
    state = dict(hf.state_dict())
    missing = dict(state)
    missing.pop("model.layers.1.mlp.up_proj.weight")
    with pytest.raises(KeyError, match="layers.1.mlp.up_proj.weight"):
        lavin_state_dict_from_hf(missing, args)
    extra = dict(state, **{"model.layers.0.self_attn.q_proj.bias": torch.zeros(64)})
    with pytest.raises(ValueError, match="q_proj.bias"):
        lavin_state_dict_from_hf(extra, args)
    fewer = ModelArgs(**{**vars(args), "n_layers": 2})
    with pytest.raises(ValueError, match="layers.2."):
        lavin_state_dict_from_hf(state, fewer)
    wrong = dict(state, **{"model.layers.0.input_layernorm.weight": torch.ones(65)})
    with pytest.raises(ValueError, match="attention_norm.weight must have shape"):
        lavin_state_dict_from_hf(wrong, args)
    with pytest.raises(TypeError, match="ModelArgs"):
        lavin_state_dict_from_hf(state, types.SimpleNamespace())


# --------------------------------------------------------------------------- real SmolLM2


def assert_same_greedy(mine: list[int], theirs: list[int], eos: int | None) -> None:
    """HF stops at EOS (and may pad after it); up to there the tokens must be identical."""
    if eos is not None and eos in theirs:
        theirs = theirs[: theirs.index(eos) + 1]
    assert mine[: len(theirs)] == theirs
    if len(theirs) < len(mine):
        assert theirs[-1] == eos


REAL_PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n    ",
    "<|im_start|>user\nName three primary colours.<|im_end|>\n<|im_start|>assistant\n",
]


@pytest.fixture(scope="module")
def smollm2(smollm2_hf: tuple) -> tuple:
    hf, tokenizer = smollm2_hf
    ours = lavin_from_hf(hf, max_seq_len=128, max_batch_size=4)
    return hf, ours, tokenizer


def test_real_smollm2_config_carries_over(smollm2: tuple) -> None:
    hf, ours, _ = smollm2
    params = ours.params
    assert (params.dim, params.n_layers, params.n_heads, params.kv_heads) == (576, 30, 9, 3)
    assert params.ffn_hidden_dim == 1536 and params.vocab_size == 49152
    assert params.rope_theta == 1e5 and params.norm_eps == hf.config.rms_norm_eps
    assert getattr(hf.config, "quantization_config", None) is None and hf.hf_quantizer is None
    assert {p.dtype for p in ours.parameters()} == {torch.float32}


def test_real_smollm2_logits_equal_hf(smollm2: tuple) -> None:
    hf, ours, tokenizer = smollm2
    encoded = [tokenizer(p).input_ids for p in REAL_PROMPTS]
    width = max(map(len, encoded))
    tokens = torch.zeros(len(encoded), width, dtype=torch.long)
    mask = torch.zeros_like(tokens, dtype=torch.bool)
    for row, ids in enumerate(encoded):
        tokens[row, width - len(ids) :] = torch.tensor(ids)
        mask[row, width - len(ids) :] = True
    with torch.no_grad():
        got = ours(tokens, attention_mask=mask)
        for row, ids in enumerate(encoded):
            ref = hf(torch.tensor([ids])).logits[0]
            assert ref.abs().max() > 10.0
            diff = (got[row, width - len(ids) :] - ref).abs().max().item()
            assert diff < 2e-3, f"prompt {row}: max |logit diff| {diff:.3g}"
            assert torch.equal(got[row, width - len(ids) :].argmax(-1), ref.argmax(-1))


def test_real_smollm2_greedy_generation_equals_hf(smollm2: tuple) -> None:
    hf, ours, tokenizer = smollm2
    encoded = [tokenizer(p).input_ids for p in REAL_PROMPTS[::2]]
    mine = greedy_generate(ours, encoded, 8, pad_id=tokenizer.pad_token_id).tokens
    eos = hf.generation_config.eos_token_id
    eos = eos[0] if isinstance(eos, list) else eos
    for ids, tokens in zip(encoded, mine, strict=True):
        with torch.no_grad():
            out = hf.generate(torch.tensor([ids]), max_new_tokens=8, do_sample=False)
        theirs = out[0, len(ids) :].tolist()
        assert len(theirs) >= 1
        assert_same_greedy(tokens, theirs, eos)
    assert tokenizer.decode(mine[0]).strip().startswith("Paris")
