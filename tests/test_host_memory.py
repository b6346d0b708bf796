"""`host_memory_reuse`: glibc keeps freed large blocks for reuse (checked with glibc's own accounting), and CPU
training turns it on unless the recipe says false."""

from __future__ import annotations

import ctypes
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from datasets import Dataset
from transformers import GPT2Config, GPT2LMHeadModel

import lmpipe.training.trainer
from lmpipe.config.arguments import RunTrainingArguments
from lmpipe.training.trainer import build_trainer

GLIBC_MALLINFO2 = sys.platform.startswith("linux") and hasattr(ctypes.CDLL(None), "mallinfo2")

# A fresh process (the setting is process-wide): where a 100 MB tensor's memory comes from, before and after.
ALLOCATIONS = """
import ctypes, json
import torch
from lmpipe.training.host_memory import keep_freed_host_memory

class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()]

mallinfo2 = ctypes.CDLL(None).mallinfo2
mallinfo2.restype = MallInfo2
SIZE = 100_000_000
tensor = torch.empty(SIZE, dtype=torch.uint8)
mapped_before = mallinfo2().hblkhd
del tensor
took = keep_freed_host_memory()
tensor = torch.empty(SIZE, dtype=torch.uint8)
mapped_after = mallinfo2().hblkhd
del tensor
print(json.dumps({"took": took, "mapped_before": mapped_before, "mapped_after": mapped_after,
                  "free_kept": mallinfo2().fordblks}))
"""


@pytest.mark.slow
@pytest.mark.skipif(not GLIBC_MALLINFO2, reason="glibc's mallinfo2 (Linux) reports where memory comes from")
def test_large_blocks_come_from_the_heap_and_stay_there_once_freed():
    size = 100_000_000
    out = subprocess.run([sys.executable, "-c", ALLOCATIONS], capture_output=True, text=True, check=True)
    seen = json.loads(out.stdout)
    assert seen["took"] is True
    assert seen["mapped_before"] >= size  # glibc's default: a fresh mmap for a large block
    assert seen["mapped_after"] < size  # now served from the heap
    assert seen["free_kept"] >= size  # and kept after free, for the next step


def tiny_trainer(tmp_path, **arguments):
    model = GPT2LMHeadModel(GPT2Config(vocab_size=50, n_positions=8, n_embd=16, n_layer=1, n_head=2))
    dataset = Dataset.from_dict({"input_ids": [[1, 2, 3, 4]] * 4, "labels": [[1, 2, 3, 4]] * 4})
    args = RunTrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True, **arguments)
    collate = lambda rows: {k: torch.tensor([r[k] for r in rows]) for k in ("input_ids", "labels")}  # noqa: E731
    return build_trainer(model, args, dataset, dataset, collate, None, np.ones(50, dtype=np.int64))


@pytest.mark.parametrize("reuse", [True, False])
def test_cpu_training_keeps_freed_memory_unless_the_recipe_says_not(tmp_path, monkeypatch, reuse):
    calls = []
    monkeypatch.setattr(lmpipe.training.trainer, "keep_freed_host_memory", lambda: calls.append(1) or True)
    tiny_trainer(tmp_path, host_memory_reuse=reuse)
    assert len(calls) == (1 if reuse else 0)
