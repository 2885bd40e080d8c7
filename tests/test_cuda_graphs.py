"""A decode step captured in a CUDA graph replays bit-exactly (issue 16; GPU only).

After the prefill and the first decode step (which realises the mode: the merge writes the
PIAs into the weights, the low-rank path installs its factors), decode steps are pure
device work — no host synchronisation, no allocation that depends on data — so a step at
a fixed position can be captured with ``torch.cuda.graph`` and replayed. The replay must
give the eager step's logits bitwise, and leave the merged weights as the eager step did.
"""

from __future__ import annotations

import pytest
import torch

from eas_kernels import reparameterize
from tests.helpers import patched

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU"),
]
PROMPT = 11


def decode_step(model: torch.nn.Module, token: torch.Tensor) -> torch.Tensor:
    """One decode step that always writes position PROMPT (replayable)."""
    model._num_real.fill_(PROMPT)
    return model(token, start_pos=PROMPT)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize(("mode", "batch"), [("merge", 1), ("eager", 1), ("lowrank", 3)])
def test_a_graphed_decode_step_is_bit_exact(dtype, mode, batch):
    model = patched([1, 2], dtype=dtype, seed=5).cuda()
    reparameterize(model, mode)
    generator = torch.Generator().manual_seed(0)
    prompt = torch.randint(1, 97, (batch, PROMPT), generator=generator).cuda()
    token = torch.full((batch, 1), 7, device="cuda")
    with torch.no_grad():
        model(prompt, start_pos=0)
        model(token, start_pos=PROMPT)  # realises the mode
        eager = decode_step(model, token).clone()
        weights = {name: p.detach().clone() for name, p in model.named_parameters()}
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up on a side stream, as capture requires
            for _ in range(2):
                decode_step(model, token)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static = decode_step(model, token)
        for _ in range(3):
            graph.replay()
        torch.cuda.synchronize()
    assert torch.equal(static, eager)
    for name, parameter in model.named_parameters():
        assert torch.equal(parameter, weights[name]), name
