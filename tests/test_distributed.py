"""Data-parallel tuning on 2 CPU processes (gloo), against 1 process (issue 18).

Each run starts its ranks as ``torchrun`` would: separate processes with ``RANK``,
``WORLD_SIZE``, ``MASTER_ADDR`` and ``MASTER_PORT`` set, so the tuner initialises the
process group itself (eas_kernels.tuning.distributed.setup_distributed).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.test_tuning import config

ROOT = Path(__file__).resolve().parents[1]

RANK_SCRIPT = """
import json, os, sys
from pathlib import Path
import torch
torch.set_num_threads(1)
sys.path.insert(0, sys.argv[1])
from eas_kernels import SkipPlan, patch_lavin
from eas_kernels.tuning import EASTuner, answer_loss
from eas_kernels.tuning.distributed import full_tensor, setup_distributed
from tests.helpers import tiny_model
from tests.test_tuning import config, examples

spec = json.loads(sys.argv[2])
forwards = 0

def hf_answer_loss(model, batch, per_example=False):  # answer_loss, through HF's forward
    output = model(input_ids=batch.tokens, attention_mask=batch.attention_mask,
                   labels=batch.labels)
    if not per_example:
        return output.loss  # HF's own token mean
    labels = batch.labels[:, 1:]
    terms = torch.nn.functional.cross_entropy(
        output.logits[:, :-1].transpose(1, 2), labels, ignore_index=-100, reduction="none")
    return torch.stack([terms.double().sum(1), (labels != -100).sum(1).double()])


def loss_fn(model, batch, **options):  # answer_loss; "fail_rank" fails its third forward
    global forwards
    forwards += 1
    if int(os.environ.get("RANK", "0")) == spec.get("fail_rank") and forwards == 3:
        raise RuntimeError("injected failure in the third forward")
    return (hf_answer_loss if spec.get("model") == "hf" else answer_loss)(model, batch, **options)

out = Path(spec["out"])
plan = SkipPlan(4, [], skip_rank=spec.get("skip_rank", 4), adapter_rank=2)
if spec.get("model") == "hf":  # a tiny Hugging Face LLaMA
    from transformers import LlamaConfig, LlamaForCausalLM
    import eas_kernels as E
    torch.manual_seed(0)
    model = E.patch_hf(LlamaForCausalLM(LlamaConfig(
        hidden_size=48, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=97, max_position_embeddings=64, pad_token_id=0,
    )), plan, search="mha")
else:
    model = patch_lavin(tiny_model(seed=0), plan, search="mha")
initial = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
tuner = EASTuner(
    model, examples(13, 1), examples(5, 2), config(**spec["config"]), pad_id=0,
    run_dir=spec.get("run_dir"), loss_fn=loss_fn,
    distributed=setup_distributed(spec.get("sharding", "ddp")),
)
result = tuner.run(halt_after_step=spec.get("halt_after_step"))
trainables = {n: full_tensor(p.detach()).clone() for n, p in model.named_parameters()
              if p.requires_grad}  # every rank gathers FSDP2's shards
torch.save(
    {
        "plan": result.plan.skipped,
        "scores": torch.tensor(result.scores, dtype=torch.float64),
        "losses": [s["loss"] for s in result.history["steps"]],
        "trainables": trainables,
        "initial": initial,
        "distributed": result.distributed,
    },
    out / f"rank{tuner.distributed.rank}.pt",
)
"""


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def launch(
    world_size: int, spec: dict, out: Path, script: str = RANK_SCRIPT
) -> list[subprocess.CompletedProcess]:
    """Run ``script`` (argv: the project root, ``spec`` as JSON) on ``world_size``
    processes (1: no distributed environment)."""
    out.mkdir(parents=True, exist_ok=True)
    spec = {**spec, "out": str(out)}
    base = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE")}
    base["OMP_NUM_THREADS"] = "1"
    port = str(free_port())
    processes = []
    for rank in range(world_size):
        env = dict(base)
        if world_size > 1:
            env.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size),
                       MASTER_ADDR="127.0.0.1", MASTER_PORT=port)  # fmt: skip
        processes.append(
            subprocess.Popen(
                [sys.executable, "-c", script, str(ROOT), json.dumps(spec)],
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )  # fmt: skip
        )
    results = []
    for process in processes:
        try:
            stdout, stderr = process.communicate(timeout=600)
        except subprocess.TimeoutExpired:
            for other in processes:
                other.kill()
            raise
        done = subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)
        results.append(done)
    return results


def succeeded(results: list[subprocess.CompletedProcess]) -> None:
    for rank, result in enumerate(results):
        assert result.returncode == 0, f"rank {rank}:\n{result.stderr[-3000:]}"


EXIT_SCRIPT = """
import atexit, sys
import torch
import torch.distributed as dist
sys.path.insert(0, sys.argv[1])
from eas_kernels.tuning.distributed import setup_distributed

# registered first, so it runs after every handler registered later (last in, first out)
atexit.register(lambda: print("initialised at exit:", dist.is_initialized(), flush=True))
distributed = setup_distributed()
total = torch.ones(1)
dist.all_reduce(total)
print("world", distributed.world_size, "sum", int(total), flush=True)
"""


def test_a_group_it_initialised_is_destroyed_at_exit(tmp_path):
    """gloo aborts a process (SIGABRT, "terminate called without an active exception")
    now and then when the interpreter's finalisation destroys a live process group
    (pytorch/pytorch#190489): setup_distributed destroys the group it initialised at exit."""
    results = launch(2, {}, tmp_path, script=EXIT_SCRIPT)
    succeeded(results)
    for result in results:
        assert result.stdout.split("\n")[:2] == ["world 2 sum 2", "initialised at exit: False"], (
            result.stdout
        )


SETTINGS = {  # 13 examples in batches of 3: the last global batch leaves rank 1 empty
    "paper": {"estimator": "paper", "warmup_ramp": False, "batch_size": 3},
    "greedy": {"estimator": "greedy", "search_epochs": 0, "batch_size": 3},
    "stable": {"estimator": "stable", "search_epochs": 0, "batch_size": 3},  # per example
}


@pytest.mark.parametrize(
    ("model", "sharding"), [("lavin", "ddp"), ("lavin", "fsdp2"), ("hf", "ddp"), ("hf", "fsdp2")]
)
@pytest.mark.parametrize("estimator", SETTINGS)
def test_two_ranks_give_one_process_plan_and_weights(tmp_path, estimator, model, sharding):
    """DDP, and FSDP2 with every decoder block (frozen weights and PIAs) sharded, on the
    tiny LaVIN-layout model and on a tiny Hugging Face LLaMA (``patch_hf``)."""
    if model == "hf":
        pytest.importorskip("transformers")
    spec = {"config": SETTINGS[estimator], "sharding": sharding, "model": model}
    succeeded(launch(1, spec, tmp_path / "one"))
    succeeded(launch(2, spec, tmp_path / "two"))
    one = torch.load(tmp_path / "one" / "rank0.pt")
    ranks = [torch.load(tmp_path / "two" / f"rank{r}.pt") for r in range(2)]
    assert one["distributed"] == {"world_size": 1, "backend": None, "strategy": "single"}
    assert ranks[0]["distributed"] == {"world_size": 2, "backend": "gloo", "strategy": sharding}
    # lockstep: every rank ends with bitwise the same preferences, plan and weights
    assert torch.equal(ranks[0]["scores"], ranks[1]["scores"])
    assert ranks[0]["plan"] == ranks[1]["plan"]
    for name, value in ranks[0]["trainables"].items():
        assert torch.equal(value, ranks[1]["trainables"][name]), name
    # and the result of one process, up to float summation order
    assert ranks[0]["plan"] == one["plan"]
    torch.testing.assert_close(ranks[0]["scores"], one["scores"], rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(
        torch.tensor(ranks[0]["losses"]), torch.tensor(one["losses"]), rtol=1e-4, atol=1e-5
    )
    assert_same_training(ranks[0], one)


def assert_same_training(ours: dict, reference: dict) -> None:
    """Two runs trained the same weights up to float summation order: every weight agrees
    to 1 % of one AdamW step (AdamW moves a weight by about lr per step, so summation-order
    noise stays far below it; a wrong gradient weighting moves weights by whole steps).
    Training moved the weights by at least one step, 100 times that tolerance (a PIA whose
    arm was never skipped stays as it started)."""
    step = config().lr
    moved = 0.0
    for name, value in reference["trainables"].items():
        moved = max(moved, (value - reference["initial"][name]).abs().max().item())
        difference = (ours["trainables"][name] - value).abs().max().item()
        assert difference <= 0.01 * step, (name, difference)
    assert moved >= step, moved


@pytest.mark.parametrize("sharding", ["ddp", "fsdp2"])
def test_a_killed_two_rank_run_resumes_to_the_same_result(tmp_path, sharding):
    """Under FSDP2 the checkpoint holds the gathered weights and optimizer state."""
    spec = {"config": SETTINGS["paper"], "sharding": sharding}
    succeeded(launch(2, spec, tmp_path / "whole"))
    folder = tmp_path / "run"
    killed = launch(2, {**spec, "run_dir": str(folder), "halt_after_step": 7}, tmp_path / "a")
    assert all(result.returncode == -9 for result in killed), [r.returncode for r in killed]
    assert (folder / "tuner_checkpoint.pt").is_file()
    succeeded(launch(2, {**spec, "run_dir": str(folder)}, tmp_path / "b"))
    whole, resumed = (torch.load(tmp_path / d / "rank0.pt") for d in ("whole", "b"))
    assert resumed["plan"] == whole["plan"]
    assert torch.equal(resumed["scores"], whole["scores"])
    for name, value in whole["trainables"].items():
        assert torch.equal(resumed["trainables"][name], value), name


def test_a_two_rank_checkpoint_resumes_in_one_process(tmp_path):
    """The global batch does not depend on the world size, so a run killed on 2 ranks
    continues on 1 to the result of an uninterrupted run (up to float summation order)."""
    spec = {"config": SETTINGS["paper"]}
    succeeded(launch(1, spec, tmp_path / "whole"))
    folder = tmp_path / "run"
    launch(2, {**spec, "run_dir": str(folder), "halt_after_step": 7}, tmp_path / "a")
    succeeded(launch(1, {**spec, "run_dir": str(folder)}, tmp_path / "b"))
    whole, resumed = (torch.load(tmp_path / d / "rank0.pt") for d in ("whole", "b"))
    assert resumed["plan"] == whole["plan"]
    torch.testing.assert_close(resumed["scores"], whole["scores"], rtol=1e-4, atol=1e-6)
    assert_same_training(resumed, whole)


def test_a_rank_patched_differently_is_refused_on_every_rank(tmp_path):
    """Rank 1 patches with another PIA rank: both ranks stop with one clear error."""
    out = tmp_path / "out"
    out.mkdir()
    spec = json.dumps({"config": SETTINGS["paper"], "out": str(out)})
    other = json.dumps({"config": SETTINGS["paper"], "out": str(out), "skip_rank": 3})
    port = str(free_port())
    processes = []
    for rank, argument in enumerate((spec, other)):
        env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2",
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port, "OMP_NUM_THREADS": "1"}  # fmt: skip
        processes.append(
            subprocess.Popen(
                [sys.executable, "-c", RANK_SCRIPT, str(ROOT), argument],
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )  # fmt: skip
        )
    for process in processes:
        _, stderr = process.communicate(timeout=300)
        assert process.returncode != 0
        assert "ValueError: the ranks of this run differ in configuration" in stderr, stderr[-2000:]
        assert "ranks [0]" in stderr and "ranks [1]" in stderr
    assert not list(out.iterdir())


@pytest.mark.parametrize("failing", [0, 1])
def test_a_failing_rank_ends_every_rank_with_its_message(tmp_path, failing):
    """Rank ``failing`` raises in its third forward: it ends with its own error, the other
    rank with ``rank <failing> of 2 failed: <its message>`` (here: in seconds, not after
    the collectives' 10-minute timeout). When rank 0 fails, its store may leave with it
    before rank 1 reads the message (the known limit under gloo in
    ``Distributed.failures_shared``): rank 1 then ends with the RankFailed that says so."""
    results = launch(2, {"config": SETTINGS["paper"], "fail_rank": failing}, tmp_path)
    other = 1 - failing
    assert results[failing].returncode != 0 and results[other].returncode != 0
    assert "RuntimeError: injected failure in the third forward" in results[failing].stderr
    expected = [f"rank {failing} of 2 failed: RuntimeError: injected failure in the third forward"]
    if failing == 0:
        expected.append("RankFailed: rank 0 of 2 ended before this rank (rank 1) could read why")
    both = f"rank {other}:\n{results[other].stderr[-3000:]}\nrank {failing}:\n"
    assert any(e in results[other].stderr for e in expected), both + results[failing].stderr[-3000:]


TRAINER_SCRIPT = """
import sys
from pathlib import Path
import torch
torch.set_num_threads(1)
sys.path.insert(0, sys.argv[1])
from transformers import Trainer, TrainingArguments
import eas_kernels as E
from tests.test_hf import reversal_rows, tiny_llama

model = tiny_llama()
E.patch_hf(model, E.SkipPlan(4, [2], skip_rank=8, adapter_rank=4))
rows = reversal_rows()
arguments = TrainingArguments(
    output_dir=sys.argv[2], max_steps=30, per_device_train_batch_size=4, learning_rate=1e-2,
    report_to=[], use_cpu=True, ddp_backend="gloo", save_strategy="no", logging_steps=5,
)
trainer = Trainer(model=model, args=arguments, train_dataset=rows)
trainer.train()
assert trainer.args.world_size == 2, trainer.args.world_size
losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
if trainer.is_world_process_zero():
    E.save_pretrained(model, Path(sys.argv[2]) / "pias")
    torch.save({"losses": losses, "weights": {n: p.detach().clone()
                for n, p in model.named_parameters() if p.requires_grad}},
               Path(sys.argv[2]) / "trained.pt")
# accelerate initialised the group and leaves it: destroy it before the interpreter's
# shutdown, or gloo may abort the finished rank (setup_distributed's exit hook says why)
torch.distributed.destroy_process_group()
"""


def test_an_hf_trainer_on_two_processes_trains_pias_that_load_back(tmp_path):
    """``Trainer`` under ``torchrun`` (DDP through accelerate, gloo): the PIAs learn, rank
    0 saves them, and ``from_pretrained`` puts exactly those weights into a fresh model."""
    pytest.importorskip("transformers")
    import eas_kernels as E
    from tests.test_hf import tiny_llama

    environment = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
         "--no-python", sys.executable, "-c", TRAINER_SCRIPT, str(ROOT), str(tmp_path)],
        capture_output=True, text=True, env=environment, cwd=ROOT, timeout=900,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-4000:]
    trained = torch.load(tmp_path / "trained.pt")
    assert trained["losses"][-1] < trained["losses"][0]
    loaded = E.from_pretrained(tiny_llama(), tmp_path / "pias")
    weights = {n: p for n, p in loaded.named_parameters() if ".attn_adapter." in n or
               ".skip_pia." in n}  # fmt: skip
    assert set(weights) == set(trained["weights"])
    for name, value in trained["weights"].items():
        assert torch.equal(weights[name], value), name


def test_a_rank_that_finds_the_store_gone_says_so_with_its_own_error(monkeypatch):
    """Rank 0 failed and ended before rank 1 read its message (rank 0 hosts the store):
    rank 1 ends with RankFailed saying so, not with the store's network error."""
    from eas_kernels.tuning import distributed as module

    class GoneStore:
        def __getattr__(self, name):
            def gone(*args, **kwargs):
                raise torch.distributed.DistNetworkError("Broken pipe")

            return gone

    monkeypatch.setattr(module, "_default_store", GoneStore)
    with pytest.raises(module.RankFailed) as caught:
        with module.Distributed(rank=1, world_size=2).failures_shared():
            raise RuntimeError("Connection closed by peer")
    message = str(caught.value)
    assert message.startswith("rank 0 of 2 ended before this rank (rank 1) could read why")
    assert "Broken pipe" in message and "RuntimeError: Connection closed by peer" in message
