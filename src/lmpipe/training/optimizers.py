"""`optimizer: muon` (torch.optim.Muon on the blocks' weight matrices, torch's AdamW on the rest) and the
warmup_stable_decay keys, both handed to the Trainer through its own hooks (`ExactEvalTrainer.create_optimizer`
and `create_scheduler`), so accumulation, clipping, the scheduler, checkpoints and resume are the Trainer's."""

from __future__ import annotations

import re
from collections.abc import Collection
from typing import Any

import torch
from torch import nn
from transformers import SchedulerType, TrainingArguments
from transformers.training_args import OptimizerNames

from lmpipe.config.rules import WSD_KEYS
from lmpipe.errors import LmpipeError

# GPT-2's hidden weight matrices, by name: an ndim test alone would also take the embeddings (wte, wpe).
BLOCK_MATRIX = re.compile(r"(?:^|\.)h\.\d+\.(?:attn\.c_attn|attn\.c_proj|mlp\.c_fc|mlp\.c_proj)\.weight$")
FUSED_QKV = re.compile(r"\.attn\.c_attn\.weight$")  # Conv1D (in, out): Q | K | V side by side along dim 1


class SplitMuon(torch.optim.Muon):
    """torch.optim.Muon that orthogonalises a group's fused matrices (`split: k`) as their k column blocks.

    Written because torch's Muon orthogonalises whole tensors and GPT-2 fuses Q, K and V into one `c_attn`;
    `_init_group` is where Muon gathers the tensors of a step, so the blocks are views of the parameter, its gradient
    and its momentum buffer (the state stays one tensor per parameter). Update scaling: adjust_lr_fn
    "match_rms_adamw" (0.2 sqrt(max(A, B))) is symmetric in the two sides, so Conv1D's (in, out) layout needs no
    transposing, and Muon's learning rate is on AdamW's scale.
    """

    def _init_group(self, group, params_with_grad, grads, muon_momentum_bufs):
        has_complex = super()._init_group(group, params_with_grad, grads, muon_momentum_bufs)
        pieces = group.get("split", 1)
        if pieces > 1:
            for tensors in (params_with_grad, grads, muon_momentum_bufs):
                tensors[:] = [block for tensor in tensors for block in tensor.chunk(pieces, dim=1)]
        return has_complex


class MuonWithAdamW(torch.optim.Optimizer):
    """One optimizer for the Trainer made of torch's AdamW and Muon (torch has none that runs two algorithms).

    Both inner optimizers step this optimizer's own param groups (AdamW's first, so the learning rate the Trainer
    logs is `learning_rate`'s) and its one `state`: torch's own `state_dict` / `load_state_dict` save and restore
    them, and a scheduler scales every group.
    """

    def __init__(self, adamw: torch.optim.AdamW, muon: SplitMuon):
        self.adamw, self.muon = adamw, muon
        super().__init__([*adamw.param_groups, *muon.param_groups], {})
        self._share()

    def _share(self) -> None:
        count = len(self.adamw.param_groups)
        self.adamw.param_groups, self.muon.param_groups = self.param_groups[:count], self.param_groups[count:]
        self.adamw.state = self.muon.state = self.state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)  # replaces param_groups and state: hand the new ones on
        self._share()

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self.adamw.step()
        self.muon.step()
        return loss


def muon_with_adamw(model: nn.Module, args: TrainingArguments, decay_names: Collection[str]) -> MuonWithAdamW:
    """The optimizer of `optimizer: muon` for `model`'s trainable parameters: Muon on every block's c_attn (as Q, K,
    V), attn.c_proj, mlp.c_fc and mlp.c_proj weights; AdamW on the rest (wte, wpe, LayerNorms, biases, an untied
    head), weight decay on `decay_names` only, as the Trainer's own AdamW groups them."""
    named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    matrices = {name for name, p in named if BLOCK_MATRIX.search(name) and p.ndim == 2}
    if not matrices:
        raise LmpipeError("optimizer: muon found no GPT-2 block matrices (h.N.attn.c_attn.weight, ...) to train")
    for name, p in named:
        if FUSED_QKV.search(name) and p.shape[1] != 3 * p.shape[0]:
            raise LmpipeError(f"optimizer: muon: {name} is {tuple(p.shape)}, not GPT-2's (n_embd, 3 n_embd)")
    others = [(name, p) for name, p in named if name not in matrices]
    adamw = torch.optim.AdamW(
        [
            {"params": [p for name, p in others if name in decay_names], "weight_decay": args.weight_decay},
            {"params": [p for name, p in others if name not in decay_names], "weight_decay": 0.0},
        ],
        lr=args.learning_rate,
        betas=(args.adam_beta1, args.adam_beta2),
        eps=args.adam_epsilon,
        fused=OptimizerNames(args.optim) == OptimizerNames.ADAMW_TORCH_FUSED,
    )
    options = {"momentum": args.muon_momentum, "nesterov": args.muon_nesterov, "ns_steps": args.muon_ns_steps}
    muon = SplitMuon(
        [
            {"params": [p for name, p in named if name in matrices and FUSED_QKV.search(name)], "split": 3},
            {"params": [p for name, p in named if name in matrices and not FUSED_QKV.search(name)]},
        ],
        lr=args.learning_rate if args.muon_learning_rate is None else args.muon_learning_rate,
        weight_decay=args.weight_decay if args.muon_weight_decay is None else args.muon_weight_decay,
        adjust_lr_fn="match_rms_adamw",
        **{key: value for key, value in options.items() if value is not None},  # unset: torch's defaults
    )
    return MuonWithAdamW(adamw, muon)


def schedule_kwargs(args: TrainingArguments, num_training_steps: int) -> dict[str, Any]:
    """The `lr_scheduler_kwargs` that warmup_stable_decay's recipe keys stand for, once the steps are known:
    `decay_fraction` becomes `num_decay_steps` = round(decay_fraction x steps), at least 1. Warmup and decay longer
    than the run are refused (transformers would make the stable phase negative), unless both are shares of the
    run that fit in it (`warmup_steps` < 1, its ratio, plus `decay_fraction` at most 1): then only rounding up
    overflowed a short run (a smoke run of a recipe with `--max_steps 1`), and the decay gets the steps warmup
    leaves, none when warmup takes the whole run."""
    if SchedulerType(args.lr_scheduler_type) != SchedulerType.WARMUP_STABLE_DECAY:
        return {}
    kwargs = {WSD_KEYS[key]: getattr(args, key, None) for key in WSD_KEYS}
    if kwargs["num_decay_steps"] is not None:
        kwargs["num_decay_steps"] = max(1, round(kwargs["num_decay_steps"] * num_training_steps))
    given = args.lr_scheduler_kwargs or {}
    decay = kwargs["num_decay_steps"] or given.get("num_decay_steps", 0)
    warmup = args.get_warmup_steps(num_training_steps)
    overflow = "num_stable_steps" not in given and warmup + decay > num_training_steps
    shares_that_fit = kwargs["num_decay_steps"] is not None and 0 < args.warmup_steps < 1 and (
        args.warmup_steps + args.decay_fraction <= 1
    )
    if overflow and shares_that_fit:
        kwargs["num_decay_steps"] = num_training_steps - warmup
    elif overflow:
        decay_key = "decay_fraction" if kwargs["num_decay_steps"] else "lr_scheduler_kwargs' num_decay_steps"
        raise LmpipeError(
            f"lr_scheduler_type warmup_stable_decay: warmup_steps ({warmup} steps) + {decay_key} ({decay} steps) is"
            f" more than the run's {num_training_steps} steps: lower warmup_steps or {decay_key}"
        )
    return {key: value for key, value in kwargs.items() if value is not None}
