"""Host synchronisations in the hot path (issue 15: validate once, at the root).

On a GPU every ``bool(tensor)``, ``.item()``, ``.tolist()`` or ``nonzero`` waits for the
device. The patch may sync only at a model call's entry — the prompt mask's check, the
PIA weights' finite check when they changed — and at the first decode step (the frozen
states' finite check, the merge's refusal check): never per layer, and never in a steady
decode step. Counted here on the CPU with a ``TorchFunctionMode`` that records such calls
made from this package's code (the model's own argument checks, in ``eas_kernels.models``,
are the unpatched model's and not counted).
"""

from __future__ import annotations

import collections
import traceback
import warnings
from pathlib import Path

import pytest
import torch
from torch.overrides import TorchFunctionMode

import eas_kernels as E
from tests.helpers import patched

PACKAGE = Path(E.__file__).parent
SYNCING = {"__bool__", "item", "tolist", "nonzero", "__int__", "__float__", "__index__"}
SYNCING |= {"masked_select", "unique", "argwhere", "numpy"}


TORCH = Path(torch.__file__).parent


class HostSyncs(TorchFunctionMode):
    """Counts the syncing tensor calls made by this package's code: the first frame below
    the call that is not torch's own is in eas_kernels, outside eas_kernels/models (a sync
    inside transformers' generate() is transformers')."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: collections.Counter = collections.Counter()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name in SYNCING:
            caller = next(
                frame
                for frame in reversed(traceback.extract_stack()[:-1])
                if not frame.filename.startswith(str(TORCH))
            )
            inside = caller.filename.startswith(str(PACKAGE))
            if inside and not caller.filename.startswith(str(PACKAGE / "models")):
                where = Path(caller.filename).relative_to(PACKAGE)
                self.calls[f"{where}:{caller.name}:{name}"] += 1
        return func(*args, **(kwargs or {}))


def syncs(call) -> int:
    with HostSyncs() as counter:
        call()
    return sum(counter.calls.values())


@pytest.mark.parametrize("layers", [4, 8])
def test_lavin_layout_syncs_only_at_the_root(layers):
    model = patched([1], n_layers=layers, seed=3)
    tokens = torch.randint(1, 90, (2, 7), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(2, 7, dtype=torch.bool)
    mask[0, :2] = False
    # training forward: the mask's check and the weights' finite check, whatever the depth
    assert syncs(lambda: model(tokens, prompt_mask=mask)) == 2
    assert syncs(lambda: model(tokens, prompt_mask=mask)) == 1  # weights unchanged
    for mode in ("eager", "merge", "lowrank"):
        E.reparameterize(model, mode)
        batch = tokens[:1] if mode == "merge" else tokens
        with torch.no_grad():
            assert syncs(lambda b=batch: model(b, start_pos=0)) == 0
            step = batch[:, :1]
            first = syncs(lambda s=step: model(s, start_pos=7))
            assert first == 1, first  # the frozen states' finite check (all sites at once)
            assert syncs(lambda s=step: model(s, start_pos=8)) == 0
            assert syncs(lambda s=step: model(s, start_pos=9)) == 0


def test_hugging_face_layout_syncs_only_at_the_root():
    pytest.importorskip("transformers")
    from tests.test_hf import patched_tiny

    model = patched_tiny()
    ids = torch.randint(3, 64, (2, 7), generator=torch.Generator().manual_seed(0))
    labels = ids.clone()
    labels[:, :4] = -100
    # the labels' prompt mask is checked once, the weights once
    assert syncs(lambda: model(input_ids=ids, labels=labels)) == 2
    with torch.no_grad():
        # the prefill: at most the attention mask's check (some releases pass one)
        prefill = syncs(lambda: model.generate(ids[:1], max_new_tokens=1, do_sample=False))
        assert prefill <= 1
        # then one sync at the first decode step (the states' check), none after it
        for new_tokens in (5, 9):
            generate = lambda n=new_tokens: model.generate(
                ids[:1], max_new_tokens=n, do_sample=False
            )  # noqa: E731
            assert syncs(generate) == prefill + 1


def cuda_syncs_below_the_root(model: torch.nn.Module, call) -> int:
    """Synchronising CUDA calls that ``torch.cuda.set_sync_debug_mode("warn")`` reports
    between the first block's pre-hooks — after the patch's root checks, the weights' and
    states' checks and the merge, which run in the patch's own earlier hooks — and the last
    block's output."""

    def start(*_: object) -> None:
        torch.cuda.set_sync_debug_mode("warn")

    def stop(*_: object) -> None:
        torch.cuda.set_sync_debug_mode(0)

    handles = [
        model.layers[0].register_forward_pre_hook(start),
        model.layers[-1].register_forward_hook(stop),
    ]
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            call()
    finally:
        torch.cuda.set_sync_debug_mode(0)
        for handle in handles:
            handle.remove()
    return sum("synchroniz" in str(warning.message) for warning in caught)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("mode", ["eager", "merge", "lowrank"])
def test_on_a_gpu_the_patch_adds_no_sync_below_the_root(mode):
    """On a GPU, with the sync debug mode: a training forward and every decode step of a
    patched model synchronise below the root exactly as often as the unpatched model."""
    from tests.helpers import tiny_model

    base = tiny_model(seed=3).cuda()
    model = patched([1], n_layers=4, seed=3).cuda()
    E.reparameterize(model, mode)
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(1, 90, (1 if mode == "merge" else 2, 7), generator=generator).cuda()
    mask = torch.ones_like(tokens, dtype=torch.bool)
    mask[0, :2] = False
    # the counter works: a deliberate sync in the window is seen
    probe = base.layers[1].register_forward_hook(lambda *_: torch.ones(1, device="cuda").item())
    assert cuda_syncs_below_the_root(base, lambda: base(tokens)) >= 1
    probe.remove()
    expected = cuda_syncs_below_the_root(base, lambda: base(tokens))
    assert cuda_syncs_below_the_root(model, lambda: model(tokens, prompt_mask=mask)) == expected
    with torch.no_grad():
        expected = cuda_syncs_below_the_root(base, lambda: base(tokens, start_pos=0))
        assert cuda_syncs_below_the_root(model, lambda: model(tokens, start_pos=0)) == expected
        step = tokens[:, :1]
        for position in (7, 8, 9):  # the first step (states checked, merged) and steady ones
            expected = cuda_syncs_below_the_root(base, lambda p=position: base(step, start_pos=p))
            found = cuda_syncs_below_the_root(model, lambda p=position: model(step, start_pos=p))
            assert found == expected, (position, found, expected)
