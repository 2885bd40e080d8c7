"""The EAS contract every block layout keeps (issue 15), in the style of PEFT's
``PeftCommonTester``.

:class:`LayoutContract` holds the role × mode tests, written against the public API only
(``SkipPlan``, the ``search=`` candidate sets, ``set_skipped``, ``reparameterize``,
``current_plan``, patch / unpatch). It is not collected by itself (no ``Test`` prefix): each
layout's subclass in ``tests/test_contract.py`` provides the hooks that build a tiny base
model, patch and unpatch it, run a teacher-forced forward, decode greedily (prefill, then
one token per step), list the weights a merge may write, and give the LaVIN-layout model
that ``tests/reference.py`` reads.

Every test runs on every role case of :data:`ROLE_CASES` (a layer whose MHA is skipped,
whose FFN is skipped, which is skipped whole as in DAS, or kept), and on every mode where
the property applies. PIAs are randomised (non-zero up projections, EAS_SPEC §1), so a
zero PIA cannot make a test pass.

Tolerances (fp32), those of the per-layout tests these replace, never looser:
reference comparisons 1e-5 (``test_roles.py``, ``test_patch.py``); teacher forcing against
incremental decoding and a batch against its examples alone 1e-4
(``test_frozen_state.py``; ``test_roles.py`` used 2e-4); weights bitwise.
"""

from __future__ import annotations

from collections.abc import Sequence

import pytest
import torch
from torch import nn

from eas_kernels import SkipPlan, current_plan, reparameterize, set_skipped
from eas_kernels.roles import CANDIDATE_SETS, Role, candidate_roles
from tests.helpers import (
    PIA_MODULES,
    assert_bitwise,
    left_pad,
    random_sequences,
    randomize_pias,
    same_bits,
    weights_snapshot,
)
from tests.reference import eas_forward_reference

NUM_LAYERS = 4
VOCAB = 97  # both tiny models; token 0 pads
SKIP_RANK, ADAPTER_RANK = 6, 3

# (skipped MHAs, skipped FFNs); a layer in both is skipped whole (DAS). The last layer
# always has a role whose PIA merges (the non-finite merge test corrupts it: a corrupted
# earlier layer would make the later layers' states non-finite first).
ROLE_CASES: dict[str, tuple[list[int], list[int]]] = {
    "kept": ([], []),
    "mha": ([0, 3], []),  # layer 0 too: on HF, lengths come from the first kept layer
    "ffn": ([], [1, 3]),
    "block": ([2], [2]),
    "mixed": ([0, 3], [0, 1]),  # 0 block, 1 FFN skipped, 2 kept, 3 MHA skipped
}
CASES = list(ROLE_CASES)
MODES = ["eager", "merge", "lowrank", "auto"]
BATCH_MODES = ["eager", "lowrank", "auto"]  # merge needs batch size 1
MERGING_MODES = ["merge", "auto"]  # auto merges at batch size 1

REFERENCE_TOLERANCE = dict(rtol=1e-5, atol=1e-5)
DECODING_TOLERANCE = dict(rtol=1e-4, atol=1e-4)


def plan_of(case: str) -> SkipPlan:
    mhas, ffns = ROLE_CASES[case]
    return SkipPlan(
        NUM_LAYERS, mhas, skipped_ffns=ffns, skip_rank=SKIP_RANK, adapter_rank=ADAPTER_RANK
    )


def roles_of(case: str) -> list[Role]:
    """The role of each layer (``eas_kernels.roles``: kept, skipped_mha, skipped_ffn,
    skipped_block)."""
    plan = plan_of(case)
    return [plan.role(index) for index in range(NUM_LAYERS)]


# How a case is patched: with its plan (None), or with every search candidate set whose
# roles can express it, then set_skipped.
PATCH_WAYS = [
    (case, search)
    for case in CASES
    for search in (None, *CANDIDATE_SETS)
    if search is None or set(roles_of(case)) <= set(candidate_roles(search))
]


def is_pia_parameter(name: str) -> bool:
    return bool(set(name.split(".")) & PIA_MODULES)


def base_parameters(model: nn.Module) -> dict[str, torch.Tensor]:
    """The live non-PIA parameters (a merged PIA's added biases included), read without
    ``state_dict()``, whose hooks would put merged weights back first."""
    return {n: p for n, p in model.named_parameters() if not is_pia_parameter(n)}


def assert_base_parameters(model: nn.Module, expected: dict[str, torch.Tensor]) -> None:
    current = base_parameters(model)
    assert current.keys() == expected.keys(), sorted(current.keys() ^ expected.keys())
    for name, tensor in expected.items():
        assert same_bits(current[name].detach(), tensor), f"{name} changed"


def clone_all(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {name: tensor.detach().clone() for name, tensor in tensors.items()}


def prompt_batch(
    lengths: Sequence[int], prompt_lengths: Sequence[int], seed: int
) -> tuple[list[list[int]], torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(sequences, tokens, real, prompt)``: left-padded sequences, their real-token mask
    and the prompt mask (each row's first ``prompt_lengths`` real tokens)."""
    sequences = random_sequences(list(lengths), vocab=VOCAB, seed=seed)
    tokens, real = left_pad(sequences)
    prompt = real.clone()
    for row, (sequence, length) in enumerate(zip(sequences, prompt_lengths, strict=True)):
        prompt[row, tokens.shape[1] - len(sequence) + length :] = False
    return sequences, tokens, real, prompt


class LayoutContract:
    """The contract; a subclass named ``Test...`` per layout implements the hooks."""

    # ------------------------------------------------------------------ hooks
    def base_model(self, seed: int) -> nn.Module:
        """A tiny random base model (4 layers, vocabulary 97, fp32, eval mode), seeded."""
        raise NotImplementedError

    def patch(self, model: nn.Module, plan: SkipPlan, search: bool | str) -> nn.Module:
        raise NotImplementedError

    def unpatch(self, model: nn.Module) -> nn.Module:
        raise NotImplementedError

    def forced_logits(
        self, model: nn.Module, tokens: torch.Tensor, real: torch.Tensor, prompt: torch.Tensor
    ) -> torch.Tensor:
        """``(B, n, vocab)`` logits of a training-style (teacher-forced) forward of the
        left-padded ``tokens`` whose real tokens are ``real``, with PIA states over the
        prompt tokens ``prompt`` (a prefix of each row's real tokens)."""
        raise NotImplementedError

    def decode(
        self, model: nn.Module, prompts: list[list[int]], steps: int
    ) -> tuple[list[list[int]], torch.Tensor]:
        """Greedy decoding of the left-padded ``prompts``: a prefill, then ``steps - 1``
        decode steps of one token. ``(tokens, logits)``: the ``steps`` new tokens of each
        prompt and the ``(B, steps, vocab)`` logits that chose them."""
        raise NotImplementedError

    def blocks(self, model: nn.Module) -> list[nn.Module]:
        """The decoder blocks, in order (the PIAs are their children)."""
        raise NotImplementedError

    def attention_targets(self, block: nn.Module) -> tuple[nn.Linear, ...]:
        """The query, key and value projections (what a kept layer's or an FFN-skip PIA
        merges into)."""
        raise NotImplementedError

    def ffn_targets(self, block: nn.Module) -> tuple[nn.Linear, ...]:
        """The FFN's gate and up projections (what a skip PIA merges into)."""
        raise NotImplementedError

    def reference_model(self, model: nn.Module) -> nn.Module:
        """A LaVIN-layout model with the weights and PIAs of the patched ``model``, for
        ``tests/reference.py``."""
        raise NotImplementedError

    # ------------------------------------------------------------------ shared helpers
    def patched(self, case: str, *, seed: int, search: str | None = None) -> tuple:
        """``(model, pristine)``: the base model patched for ``case`` (with its plan, or with
        the candidate set ``search`` and ``set_skipped``), PIAs randomised; ``pristine`` is
        the base model's state dict before patching."""
        model = self.base_model(seed)
        pristine = weights_snapshot(model)
        mhas, ffns = ROLE_CASES[case]
        if search is None:
            self.patch(model, plan_of(case), False)
        else:
            self.patch(model, plan_of(case).replace(skipped=[], skipped_ffns=[]), search)
            set_skipped(model, mhas, ffns=ffns)
        assert current_plan(model) == plan_of(case)
        randomize_pias(model, seed=seed + 1)
        ups = [p for n, p in model.named_parameters() if is_pia_parameter(n) and ".up" in n]
        assert ups and all(bool(p.ne(0).all()) for p in ups)
        return model, pristine

    def pia(self, model: nn.Module, layer: int, role: Role) -> nn.Module:
        return getattr(self.blocks(model)[layer], role.pia_name)

    def merged_targets(self, block: nn.Module, role: Role) -> tuple[nn.Linear, ...]:
        """What a merge writes in a layer of ``role`` (EAS_SPEC §4): the FFN's gate and up
        projections when only its MHA is skipped, nothing when the block is skipped whole
        (DAS's adapter is never merged), else the attention's q, k, v projections."""
        if role.skips_mha and role.skips_ffn:
            return ()
        if role.skips_mha:
            return self.ffn_targets(block)
        return self.attention_targets(block)

    # ------------------------------------------------------------------ the contract
    @pytest.mark.parametrize(("case", "search"), PATCH_WAYS)
    def test_every_role_matches_the_spec_reference_in_training(self, case, search):
        """A teacher-forced forward of a left-padded batch with prompt masks: each row's
        logits are those of EAS_SPEC §2-3 and §6 computed on its own, whichever way the
        roles were set (plan, or candidate set + ``set_skipped``)."""
        model, _ = self.patched(case, seed=10, search=search)
        sequences, tokens, real, prompt = prompt_batch([9, 12, 5], [4, 7, 5], seed=11)
        logits = self.forced_logits(model, tokens, real, prompt)
        reference = self.reference_model(model)
        mhas, ffns = ROLE_CASES[case]
        for row, sequence in enumerate(sequences):
            prompt_len = int(prompt[row].sum())
            with torch.no_grad():
                expected = eas_forward_reference(
                    reference, torch.tensor(sequence), prompt_len, set(mhas), set(ffns)
                )
            torch.testing.assert_close(logits[row, real[row]], expected, **REFERENCE_TOLERANCE)

    @pytest.mark.parametrize("mode", MODES)
    @pytest.mark.parametrize("case", CASES)
    def test_teacher_forcing_equals_incremental_decoding(self, case, mode):
        """EAS_SPEC §3: the logits of every step of incremental decoding (prefill, then one
        token at a time with the frozen states) are those of one teacher-forced forward of
        prompt + generated tokens with the prompt mask (a left-padded batch)."""
        model, _ = self.patched(case, seed=20)
        reparameterize(model, mode)
        prompts = random_sequences([4, 9, 6], vocab=VOCAB, seed=21)
        steps = [5, 3, 4]  # answers of different lengths: the prompts end at different places
        generated, decoded = [], []
        for prompt, count in zip(prompts, steps, strict=True):  # merge needs batch size 1
            new, logits = self.decode(model, [prompt], count)
            generated.append(new[0])
            decoded.append(logits[0])
        tokens, real = left_pad([p + g for p, g in zip(prompts, generated, strict=True)])
        prompt_mask = real.clone()
        width = tokens.shape[1]
        for row, count in enumerate(steps):
            prompt_mask[row, width - count :] = False
        forced = self.forced_logits(model, tokens, real, prompt_mask)
        for row, count in enumerate(steps):
            predicting = forced[row, width - count - 1 : width - 1]
            torch.testing.assert_close(decoded[row], predicting, **DECODING_TOLERANCE)

    @pytest.mark.parametrize("case", CASES)
    def test_merge_writes_the_targets_and_restores_them_bitwise(self, case):
        """While merged decoding goes on, exactly the targets of each layer's role differ
        from the pretrained weights; the next prefill, and unpatch, put every base weight
        back bitwise (no added bias left)."""
        model, pristine = self.patched(case, seed=30)
        base = {n: pristine[n] for n in base_parameters(model)}
        roles = roles_of(case)
        names = {id(m): n for n, m in model.named_modules()}
        reparameterize(model, "merge")
        prompts = random_sequences([6, 3], vocab=VOCAB, seed=31)
        for _ in range(2):  # merge, restore at the next prefill, merge again
            self.decode(model, prompts[:1], 3)
            written = 0
            for block, role in zip(self.blocks(model), roles, strict=True):
                merged = self.merged_targets(block, role)
                for linear in self.attention_targets(block) + self.ffn_targets(block):
                    name = names[id(linear)]
                    weight = linear.weight.detach()
                    if any(linear is target for target in merged):
                        assert not torch.equal(weight, pristine[f"{name}.weight"]), name
                        written += 1
                    else:
                        assert same_bits(weight, pristine[f"{name}.weight"]), name
                        bias = pristine.get(f"{name}.bias")
                        assert (linear.bias is None) == (bias is None), name
                        assert bias is None or same_bits(linear.bias.detach(), bias), name
            assert written  # every case has layers whose PIA merges
            self.decode(model, prompts[1:], 1)  # a new prefill: the weights go back
            assert_base_parameters(model, base)
        self.decode(model, prompts[:1], 3)  # merged again, then unpatched
        self.unpatch(model)
        assert_bitwise(model, pristine)
        fresh = self.base_model(30)
        _, tokens, real, prompt = prompt_batch([8, 5], [4, 5], seed=32)
        assert torch.equal(
            self.forced_logits(model, tokens, real, prompt),
            self.forced_logits(fresh, tokens, real, prompt),
        )

    @pytest.mark.parametrize("mode", BATCH_MODES)
    @pytest.mark.parametrize("case", CASES)
    def test_a_batch_gives_each_example_its_alone_result(self, case, mode):
        """A left-padded batch of prompts of different lengths decodes, per example, the
        tokens and logits of that prompt decoded alone (batch size 1)."""
        model, _ = self.patched(case, seed=40)
        reparameterize(model, mode)
        prompts = random_sequences([3, 10, 1], vocab=VOCAB, seed=41)  # a 1-token prompt too
        tokens, logits = self.decode(model, prompts, 8)
        for row, prompt in enumerate(prompts):
            alone_tokens, alone_logits = self.decode(model, [prompt], 8)
            assert tokens[row] == alone_tokens[0], row
            torch.testing.assert_close(logits[row], alone_logits[0], **DECODING_TOLERANCE)

    @pytest.mark.parametrize("mode", MODES)
    @pytest.mark.parametrize("case", CASES)
    def test_a_nan_pia_weight_is_refused_before_anything_changes(self, case, mode):
        """A NaN in the PIA of any layer, whatever its role, is refused (ValueError naming
        the layer and the tensor) at the next prefill, in every mode: the weights — merged
        for the previous example, in merge mode — and the PIAs stay bitwise as they were,
        and the next example decodes as before once the PIA is mended."""
        model, pristine = self.patched(case, seed=50)
        reparameterize(model, mode)
        prompt = random_sequences([5], vocab=VOCAB, seed=51)
        expected = self.decode(model, prompt, 3)  # leaves the mode realised (merged)
        for layer, role in enumerate(roles_of(case)):
            weight = self.pia(model, layer, role).up2.weight
            value = weight[0, 0].item()
            with torch.no_grad():
                weight[0, 0] = float("nan")
            before = clone_all(dict(model.named_parameters()))
            message = rf"layer {layer} {role.label}: up2\.weight holds NaN or Inf"
            with pytest.raises(ValueError, match=message):
                self.decode(model, prompt, 3)
            assert_base_parameters(model, {n: before[n] for n in base_parameters(model)})
            for name, parameter in model.named_parameters():  # the PIAs too
                assert same_bits(parameter.detach(), before[name]), name
            with torch.no_grad():
                weight[0, 0] = value
        tokens, logits = self.decode(model, prompt, 3)
        assert tokens == expected[0]
        torch.testing.assert_close(logits, expected[1], rtol=0, atol=0)
        self.unpatch(model)
        assert_bitwise(model, pristine)

    @pytest.mark.parametrize("mode", MERGING_MODES)
    @pytest.mark.parametrize("case", CASES)
    def test_a_merge_that_would_be_non_finite_is_refused_with_nothing_written(self, case, mode):
        """Finite but huge PIA weights in the last layer (states finite) make its merged
        weights overflow: the first decode step refuses the merge (ValueError), and the
        layers merged before it are put back, so every base weight is pristine."""
        model, pristine = self.patched(case, seed=60)
        base = {n: pristine[n] for n in base_parameters(model)}
        last = NUM_LAYERS - 1
        role = roles_of(case)[last]
        assert self.merged_targets(self.blocks(model)[last], role)
        pia = self.pia(model, last, role)
        saved = clone_all(dict(pia.named_parameters()))
        with torch.no_grad():  # (W W_uᵀ) W_d1 ~ 1e50: inf in fp32
            for linear in (pia.down1, pia.up1, pia.up2):
                linear.weight.mul_(1e25)
        reparameterize(model, mode)
        prompt = random_sequences([6], vocab=VOCAB, seed=61)
        message = rf"layer {last} {role.label}: merging .* NaN or Inf in torch\.float32"
        with pytest.raises(ValueError, match=message):  # the merge's refusal, not the states'
            self.decode(model, prompt, 3)
        assert_base_parameters(model, base)
        with torch.no_grad():
            for name, parameter in pia.named_parameters():
                parameter.copy_(saved[name])
        tokens, logits = self.decode(model, prompt, 3)  # the next example merges and decodes
        assert torch.isfinite(logits).all() and len(tokens[0]) == 3
        self.unpatch(model)
        assert_bitwise(model, pristine)
