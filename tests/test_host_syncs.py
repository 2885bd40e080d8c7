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
