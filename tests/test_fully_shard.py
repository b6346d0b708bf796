"""FSDP on CPU, for real: torch's `fully_shard` (one unit per GPT2Block, plus the root) on 2 gloo ranks, with the
chunked loss, gives the losses of one process training on the same global batches.

Why not the Trainer: on CPU (`use_cpu: true`) transformers 5 / accelerate 1.15 accept `fsdp: full_shard` (or the
FSDP accelerate config) and then train with plain DDP (`accelerator.distributed_type` MULTI_CPU, the model wrapped in
`DistributedDataParallel`), so a Trainer run would not test FSDP. This file is also the worker torchrun starts.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

pytestmark = pytest.mark.slow  # a torchrun subprocess of two ranks

STEPS, ROWS, LENGTH = 3, 8, 16


def tiny_chunked_model():
    from transformers import GPT2Config, GPT2LMHeadModel

    from lmpipe.loss.install import install_chunked_loss

    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=101, n_positions=LENGTH, n_embd=32, n_layer=2, n_head=2,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0,
    )
    model = GPT2LMHeadModel(config)
    model.config.use_cache = False
    install_chunked_loss(model, True, chunk_tokens=7)  # 7 divides neither a rank's nor the global token count
    return model


def global_batches() -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(0, 101, (STEPS, ROWS, LENGTH), generator=torch.Generator().manual_seed(1))
    labels = ids.clone()
    labels[:, 1, :10] = -100  # ranks score different numbers of tokens
    labels[:, 6, :] = -100
    return ids, labels


def train(rank: int, world: int, model) -> list[float]:
    """AdamW steps on each rank's share of the global batch; the loss is divided by the global token count (as the
    Trainer's num_items_in_batch) and multiplied by the world size, because FSDP averages gradients over ranks."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    ids, labels = global_batches()
    losses = []
    for step in range(STEPS):
        count = (labels[step, :, 1:] != -100).sum()
        outputs = model(
            input_ids=ids[step].chunk(world)[rank], labels=labels[step].chunk(world)[rank], num_items_in_batch=count
        )
        (outputs.loss * world).backward()
        optimizer.step()
        optimizer.zero_grad()
        loss = outputs.loss.detach().clone()
        if world > 1:
            torch.distributed.all_reduce(loss)
        losses.append(loss.item())
    return losses


def worker() -> None:
    """Run under torchrun: shard, train, print rank 0's losses as one JSON line."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import FSDPModule, fully_shard

    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    model = tiny_chunked_model()
    for block in model.transformer.h:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    assert isinstance(model, FSDPModule)
    losses = train(dist.get_rank(), dist.get_world_size(), model)
    if dist.get_rank() == 0:
        shard_rows = model.transformer.wte.weight.to_local().shape[0]
        print(json.dumps({"losses": losses, "wte_rows_on_rank0": shard_rows}), flush=True)
    dist.destroy_process_group()


def test_two_fully_sharded_ranks_give_the_single_process_losses():
    single = train(0, 1, tiny_chunked_model())
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", __file__],
        capture_output=True, text=True, env=env, timeout=300,
    )
    lines = result.stdout.strip().splitlines()
    # Once in a clean-clone CI run both ranks aborted with "terminate called without an active exception"
    # (SIGABRT, torch's gloo teardown; not reproduced in 8 reruns). A rank 0 that printed its result finished
    # training; an abort before that, or any other failure, still fails here.
    finished = (bool(lines) and lines[-1].startswith("{")
                and "terminate called without an active exception" in result.stderr)
    assert result.returncode == 0 or finished, result.stderr[-3000:]
    sharded = json.loads(lines[-1])
    assert sharded["wte_rows_on_rank0"] == 51  # the tied wte/lm_head really is split: 101 rows over 2 ranks
    assert sharded["losses"] == pytest.approx(single, rel=1e-5)
    assert single[-1] != single[0]  # the steps trained


if __name__ == "__main__":
    worker()
