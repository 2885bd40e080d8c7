"""What data-parallel tuning adds to a training step (issue 18): DDP's graph traversal and
the bytes it all-reduces.

Scaling over CPU processes means nothing on a 2-core machine, so this measures what one
rank pays and what the ranks exchange:

* **the cost of ``find_unused_parameters=True``**, the option :class:`EASTuner` uses: one
  training step (forward, backward, AdamW) of a LaVIN-layout model (d = 512, 8 layers,
  MHAs 2 and 5 skipped), plain and in DDP, on a 1-rank ``gloo`` group (its collectives
  are no-ops, so the difference is DDP's own bookkeeping). Two models: the search's
  supernet (every layer holds its kept adapter and its skipped PIA, so a step leaves
  parameters unused and DDP needs the option), and the fine-tuning model of the same plan
  (every PIA used), where DDP also runs without the option: the difference between the two
  DDP variants there is the traversal's cost alone.
* **the bytes per step** at LLaMA-7B shapes (d = 4096, 32 layers, fp32 PIAs): the
  gradients DDP all-reduces, for the search's supernet (32 kept adapters of rank 8 and 32
  skipped-MHA PIAs of rank 32) and for EAS-12 fine-tuning; plus what the tuner itself adds
  (module :mod:`eas_kernels.tuning.distributed`).

``pytest benchmarks/test_distributed.py --benchmark-only``; ``extra_info`` holds the
ratios, the byte counts, shapes, device and versions. Nothing is asserted about speed.
"""

from __future__ import annotations

import datetime
import tempfile
from collections.abc import Callable

import pytest
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from benchmarks.roofline import machine, paired_medians, randomize_trainables
from eas_kernels import SkipPlan, patch_lavin, set_skipped
from eas_kernels.models.lavin import ModelArgs, Transformer
from eas_kernels.pia import PIA
from eas_kernels.tuning import Example, answer_loss, collate

ARGS = dict(dim=512, n_layers=8, n_heads=8, n_kv_heads=8, vocab_size=1000, multiple_of=64,
            max_seq_len=128, max_batch_size=8)  # fmt: skip
BATCH, PROMPT, ANSWER = 8, 48, 2


@pytest.fixture(scope="module")
def process_group():
    """A 1-rank gloo group for this process (restored to none afterwards)."""
    if dist.is_initialized():
        pytest.skip("a process group is already initialised")
    with tempfile.NamedTemporaryFile() as store_file:
        store = dist.FileStore(store_file.name, 1)
        dist.init_process_group(
            "gloo", store=store, rank=0, world_size=1, timeout=datetime.timedelta(minutes=5)
        )
        yield
        dist.destroy_process_group()


SKIPPED = [2, 5]


def model_for(search: bool) -> torch.nn.Module:
    """The supernet (search) or the fine-tuning model of MHAs 2 and 5 skipped."""
    torch.manual_seed(0)
    base = Transformer(ModelArgs(**ARGS))
    if search:
        model = patch_lavin(base, SkipPlan(ARGS["n_layers"], []), search="mha")
        set_skipped(model, SKIPPED)
    else:
        model = patch_lavin(base, SkipPlan(ARGS["n_layers"], SKIPPED))
    randomize_trainables(model, seed=1)
    return model


def batch():
    generator = torch.Generator().manual_seed(2)
    examples = [
        Example(
            tuple(torch.randint(1, 900, (PROMPT,), generator=generator).tolist()),
            tuple(torch.randint(1, 900, (ANSWER,), generator=generator).tolist()),
        )
        for _ in range(BATCH)
    ]
    return collate(examples, 0)


VARIANTS = {  # (find_unused_parameters, or None: no DDP; the search's supernet)
    "search_plain": (None, True),
    "search_ddp_find_unused": (True, True),
    "finetune_plain": (None, False),
    "finetune_ddp_find_unused": (True, False),
    "finetune_ddp_all_used": (False, False),
}


def training_step(find_unused: bool | None, search: bool) -> Callable[[], None]:
    """One training step of a fresh model of the variant (module docstring)."""
    model = model_for(search)
    trainable = [p for p in model.parameters() if p.requires_grad]
    wrapped = model
    if find_unused is not None:
        frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
        frozen += [n for n, _ in model.named_buffers()]
        DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, frozen)
        wrapped = DistributedDataParallel(
            model, find_unused_parameters=find_unused, broadcast_buffers=False
        )
    optimizer = torch.optim.AdamW(trainable, lr=1e-4)
    data = batch()
    model.train()

    def step() -> None:
        loss = answer_loss(wrapped, data)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


def test_ddp_step_cost(benchmark, process_group):
    """Median step of every variant, interleaved round by round (one run: the ratios)."""
    steps = {name: training_step(*VARIANTS[name]) for name in VARIANTS}
    medians = benchmark.pedantic(lambda: paired_medians(steps, rounds=25), rounds=1, iterations=1)
    ms = {name: round(1e3 * value, 2) for name, value in medians.items()}
    benchmark.extra_info.update(
        median_step_ms=ms,
        ratios={
            "search: ddp find_unused / plain": medians["search_ddp_find_unused"]
            / medians["search_plain"],
            "finetune: ddp find_unused / plain": medians["finetune_ddp_find_unused"]
            / medians["finetune_plain"],
            "finetune: ddp all used / plain": medians["finetune_ddp_all_used"]
            / medians["finetune_plain"],
            "finetune: find_unused / all used": medians["finetune_ddp_find_unused"]
            / medians["finetune_ddp_all_used"],
        },
        skipped=SKIPPED,
        shape=dict(ARGS, batch=BATCH, prompt=PROMPT, answer=ANSWER),
        trainable_params={
            "search": sum(p.numel() for p in model_for(True).parameters() if p.requires_grad),
            "finetune": sum(p.numel() for p in model_for(False).parameters() if p.requires_grad),
        },
        date=datetime.date.today().isoformat(),
        **machine(),
    )


def pia_bytes(dim: int, rank: int, token_mixing: bool) -> int:
    return 4 * sum(p.numel() for p in PIA(dim, rank, token_mixing=token_mixing).parameters())


def test_bytes_per_step_at_llama_7b_shapes(benchmark):
    """The gradient bytes DDP all-reduces per step (fp32 PIAs), and the tuner's own
    collectives; timed: building the PIAs whose sizes are counted."""
    dim, layers, skipped = 4096, 32, 12
    kept = benchmark.pedantic(lambda: pia_bytes(dim, 8, False), rounds=1, iterations=1)
    skip = pia_bytes(dim, 32, True)
    benchmark.extra_info.update(
        shape=dict(dim=dim, layers=layers, kept_adapter_rank=8, skipped_pia_rank=32),
        kept_adapter_bytes=kept,
        skipped_pia_bytes=skip,
        search_supernet_gradient_bytes=layers * (kept + skip),
        eas12_finetune_gradient_bytes=(layers - skipped) * kept + skipped * skip,
        tuner_collectives=dict(
            per_step="1 all-reduce of 2 float64 (loss sum, answer tokens) + 1 of 1 float64 "
            "(SIGINT stop flag)",
            per_search_round="1 all-reduce of 2m float64 (m measurements, their weights; "
            "a cosine round: arms + 1)",
            per_checkpoint="all_gather_object of a 16-character digest + 1 barrier",
        ),
        date=datetime.date.today().isoformat(),
        **machine(),
    )
