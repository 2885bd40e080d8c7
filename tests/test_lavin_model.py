"""The LaVIN-layout LLaMA itself: checkpoint layout, caching, padding, bad calls."""

from __future__ import annotations

import pytest
import torch

from eas_kernels import greedy_generate
from eas_kernels.models.lavin import ModelArgs, Transformer
from tests.helpers import left_pad, random_sequences, tiny_model

META_KEYS_LAYER0 = {
    "layers.0.attention.wq.weight",
    "layers.0.attention.wk.weight",
    "layers.0.attention.wv.weight",
    "layers.0.attention.wo.weight",
    "layers.0.feed_forward.w1.weight",
    "layers.0.feed_forward.w2.weight",
    "layers.0.feed_forward.w3.weight",
    "layers.0.attention_norm.weight",
    "layers.0.ffn_norm.weight",
}


def test_state_dict_has_meta_llama_keys_and_round_trips_strict(tmp_path):
    model = tiny_model(seed=3)
    keys = set(model.state_dict())
    assert {"tok_embeddings.weight", "norm.weight", "output.weight"} | META_KEYS_LAYER0 <= keys
    assert all(k.startswith(("tok_embeddings.", "norm.", "output.", "layers.")) for k in keys)
    path = tmp_path / "consolidated.00.pth"
    torch.save(model.state_dict(), path)
    fresh = Transformer(model.params)
    fresh.load_state_dict(torch.load(path), strict=True)
    tokens = torch.randint(0, 97, (2, 9))
    assert torch.equal(fresh.eval()(tokens), model(tokens))
    incomplete = dict(torch.load(path))
    incomplete.pop("layers.1.feed_forward.w3.weight")
    with pytest.raises(RuntimeError, match="Missing key"):
        fresh.load_state_dict(incomplete, strict=True)


def test_llama_7b_shapes():
    args = ModelArgs(dim=4096, n_layers=32, n_heads=32, vocab_size=32000)
    assert args.ffn_hidden_dim == 11008 and args.head_dim == 128 and args.kv_heads == 32


@pytest.mark.parametrize("n_kv_heads", [None, 2, 1])
def test_incremental_decoding_equals_full_forward(n_kv_heads):
    model = tiny_model(seed=1, n_kv_heads=n_kv_heads)
    tokens = torch.randint(1, 97, (3, 12))
    full = model(tokens)
    steps = [model(tokens[:, :5], start_pos=0)]
    for position in range(5, 12):
        steps.append(model(tokens[:, position : position + 1], start_pos=position))
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=1e-5, atol=1e-5)


def test_left_padded_batch_gives_each_example_its_alone_result():
    model = tiny_model(seed=2)
    sequences = random_sequences([3, 9, 6], vocab=97, seed=4)
    tokens, real = left_pad(sequences)
    batched = model(tokens, attention_mask=real)
    generated = greedy_generate(model, sequences, 6)
    for row, sequence in enumerate(sequences):
        alone = model(torch.tensor([sequence]))
        torch.testing.assert_close(batched[row, real[row]], alone[0], rtol=1e-5, atol=1e-5)
        single = greedy_generate(model, [sequence], 6)
        assert generated.tokens[row] == single.tokens[0]
        torch.testing.assert_close(generated.logits[row], single.logits[0], rtol=1e-5, atol=1e-5)


def test_casting_the_model_keeps_rope_exact():
    """``model.to(dtype)`` must not touch the complex RoPE table (a buffer would be cast)."""
    tokens = torch.randint(0, 97, (2, 9))
    single = tiny_model(seed=4)(tokens)
    double = tiny_model(seed=4, dtype=torch.float64)(tokens)
    torch.testing.assert_close(double.float(), single, rtol=1e-4, atol=1e-4)
    assert tiny_model(dtype=torch.bfloat16).freqs_cis.dtype == torch.complex64


def test_kv_cache_is_allocated_lazily():
    model = tiny_model()
    assert all(layer.attention.cache_k is None for layer in model.layers)
    model(torch.randint(0, 97, (1, 4)), start_pos=0)
    assert all(layer.attention.cache_k is not None for layer in model.layers)


def test_bad_calls_raise_clear_errors_and_change_nothing():
    model = tiny_model()
    tokens = torch.randint(0, 97, (2, 4))
    model(tokens, start_pos=0)
    cases = [
        (dict(tokens=tokens.float()), TypeError, "int64"),
        (dict(tokens=tokens[0]), ValueError, "2 dimensions"),
        (dict(tokens=tokens.to("meta")), ValueError, "device"),
        (dict(tokens=tokens + 97), ValueError, r"\[0, 97\)"),
        (dict(tokens=tokens - 1000), ValueError, r"\[0, 97\)"),
        (dict(tokens=tokens, start_pos=-1), TypeError, "start_pos"),
        (dict(tokens=tokens, start_pos=True), TypeError, "start_pos"),
        (dict(tokens=tokens, start_pos=62), ValueError, "max_seq_len"),
        (dict(tokens=torch.zeros(1, 65, dtype=torch.long)), ValueError, "length 65 exceeds"),
        (
            dict(tokens=torch.zeros(9, 2, dtype=torch.long), start_pos=0),
            ValueError,
            "max_batch_size",
        ),
        (dict(tokens=tokens[:1, :1], start_pos=4), ValueError, "continue a prefill"),
        (dict(tokens=tokens, prompt_mask=torch.ones(2, 5, dtype=torch.bool)), ValueError, "shape"),
        (dict(tokens=tokens, attention_mask=torch.ones(2, 4)), TypeError, "dtype"),
        (
            dict(tokens=tokens[:, :1], start_pos=4, prompt_mask=torch.ones(2, 1, dtype=torch.bool)),
            ValueError,
            "decode call",
        ),
    ]
    for kwargs, error, message in cases:
        with pytest.raises(error, match=message):
            model(**kwargs)
    # The failed calls did not disturb the cached sequences.
    step = model(tokens[:, :1], start_pos=4)
    reference = tiny_model()
    reference(tokens, start_pos=0)
    assert torch.equal(step, reference(tokens[:, :1], start_pos=4))
    with pytest.raises(TypeError, match="ModelArgs"):
        Transformer({"dim": 8})
    with pytest.raises(ValueError, match="divisible"):
        ModelArgs(dim=30, n_heads=4)
    with pytest.raises(ValueError, match="multiple of n_kv_heads"):
        ModelArgs(dim=48, n_heads=4, n_kv_heads=3)
