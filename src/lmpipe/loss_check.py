"""The loss check: five computations of the same causal-LM loss must agree on real batches.

Per batch (one optimizer step: `gradient_accumulation_steps` micro-batches, as the Trainer groups them):
1. `model`: the model's own loss (it shifts inside);
2. `manual`: shift, log_softmax, gather, drop -100, average over kept tokens (`loss.reference.shifted_token_nll`);
3. `cross_entropy`: `F.cross_entropy(ignore_index=-100)` on the flattened shifted tensors;
4. `chunked`: the chunked linear + cross-entropy from the final hidden states (`loss.install.ChunkedLoss`);
5. `trainer`: what the Trainer optimises and logs: its own `get_batch_samples` counts `num_items_in_batch`
   and its `training_step` (compute_loss, accumulation scaling, backward) returns the step's loss, chunked or
   not as the recipe's `chunked_loss` says.
Losses (1), (3) and (4) are per-call means; over several micro-batches they are combined weighted by kept tokens.
The gradients of the first micro-batch's loss (lm_head/wte, one attention weight, the final hidden states) are
compared between the chunked loss and the model's own.
Pretraining and QA fine-tuning recipes are checked on the Trainer each would train with (`check_trainer`).

A DPO recipe (`check_preferences`) is checked on the DPOTrainer it would train with: each pair's chosen and
rejected sequence is run alone, unpadded, through the policy and the reference, and its answer log-probability
summed by hand (float64 `log_softmax` + `gather` over the answer tokens and their end marker); then the DPO loss
`-logsigmoid(beta * ((pi_c - ref_c) - (pi_r - ref_r)))`, the rewards and their margin by hand, compared with the
per-sequence log-probabilities TRL gets (the models' `fused_lm_head` forward on the padded batch its collator
builds: lmpipe's chunked one, or TRL's own with `chunked_loss: false`) and with the loss,
rewards and log-probabilities its `compute_loss` returns and logs for the same batch.
"""

from __future__ import annotations

import contextlib
import dataclasses
import tempfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from itertools import islice

import torch
import torch.nn.functional as F
from accelerate.utils import is_peft_model
from transformers import Trainer, set_seed
from trl.trainer.utils import use_adapter

from lmpipe.config.arguments import QAArguments
from lmpipe.config.recipe import Recipe
from lmpipe.errors import LmpipeError
from lmpipe.finetune import build_qa_trainer, check_finetune_arguments
from lmpipe.loss.install import ChunkedLoss, chunked_loss_enabled, chunked_loss_of
from lmpipe.loss.reference import IGNORE_INDEX, shifted_token_nll
from lmpipe.pretrain import build_pretrain_trainer
from lmpipe.run.checkpoints import verified_model_dir
from lmpipe.run.session import check_run

LOSS_NAMES = ("model", "manual", "cross_entropy", "chunked", "trainer")
REFERENCE = "manual"
FP32_TOLERANCE = 1e-5  # every loss is reduced in float32, whatever the weights' dtype
CHUNKED_FP32_TOLERANCE = 1e-6  # the chunked loss reduces exactly what the manual one does, in float32
LOW_PRECISION_TOLERANCE = 1e-2  # bf16 / fp16 weights: about two units of bf16's 8-bit mantissa
GRADIENT_FP32_TOLERANCE = 1e-5  # max |difference| / max |gradient|
GRADIENT_LOW_PRECISION_TOLERANCE = 5e-2


@dataclass
class LossCheckArguments:
    """Flags of `check_loss.py` beyond the recipe's."""

    batches: int = field(
        default=4, metadata={"help": "Batches to compare; each is gradient_accumulation_steps micro-batches."}
    )
    reference_model_name_or_path: str | None = field(
        default=None,
        metadata={"help": "DPO: the frozen reference model (default: the policy as loaded; a DPO run directory: "
                  "the model it started from)."},
    )


@dataclass
class BatchLosses:
    """The five losses of one batch (or of all batches, `batch="all"`), in nats per kept token."""

    batch: str
    kept_tokens: int
    model: float
    manual: float
    cross_entropy: float
    chunked: float
    trainer: float

    def losses(self) -> dict[str, float]:
        return {name: getattr(self, name) for name in LOSS_NAMES}

    def max_abs_diff(self) -> float:
        values = self.losses().values()
        return max(values) - min(values)


@dataclass
class LossCheck:
    """Per-batch rows, their token-weighted total, and the relative tolerance they must agree within."""

    rows: list[BatchLosses]
    total: BatchLosses
    relative_tolerance: float
    dtype: str
    micro_batches_per_batch: int
    gradients: dict[str, float]  # relative max difference, chunked vs the model's own loss, per tensor
    gradient_tolerance: float
    trainer_chunked: bool

    def tolerance(self, name: str) -> float:
        return min(self.relative_tolerance, CHUNKED_FP32_TOLERANCE) if name == "chunked" else self.relative_tolerance

    def first_disagreement(self) -> str | None:
        """`batch B: X vs manual (...)` for the first loss that differs from the manual one beyond tolerance,
        else the first gradient of the chunked loss that differs from the model's own."""
        for row in [*self.rows, self.total]:
            reference = row.manual
            for name, value in row.losses().items():
                difference = abs(value - reference) / max(abs(reference), 1e-12)
                if not difference <= self.tolerance(name):  # also catches NaN
                    return (
                        f"batch {row.batch}: {name} loss {value:.6f} vs {REFERENCE} loss {reference:.6f} "
                        f"(relative difference {difference:.1e} > {self.tolerance(name):.0e})"
                    )
        for name, difference in self.gradients.items():
            if not difference <= self.gradient_tolerance:
                return (
                    f"gradient of {name}: chunked vs the model's own loss differ by {difference:.1e} relative "
                    f"(> {self.gradient_tolerance:.0e})"
                )
        return None


def relative_tolerance(dtype: torch.dtype) -> float:
    return LOW_PRECISION_TOLERANCE if dtype in (torch.bfloat16, torch.float16) else FP32_TOLERANCE


def gradient_tolerance(dtype: torch.dtype) -> float:
    return GRADIENT_LOW_PRECISION_TOLERANCE if dtype in (torch.bfloat16, torch.float16) else GRADIENT_FP32_TOLERANCE


def disable_dropout(model: torch.nn.Module) -> None:
    """`training_step` puts the model in train mode: with dropout at 0 its forward equals the eval one."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0


def _batch_losses(
    trainer: Trainer, micro_batches: list[dict], num_items_in_batch, name: str, trainer_chunked: bool
) -> BatchLosses:
    """The five losses of one optimizer step, from the micro-batches `get_batch_samples` returned."""
    model = trainer.model
    model.eval()
    nll_sum, kept_total, model_sum, cross_entropy_sum, chunked_sum = 0.0, 0, 0.0, 0.0, 0.0
    with torch.no_grad():
        for batch in micro_batches:
            inputs = trainer._prepare_inputs(batch)  # the Trainer's own move to device
            with chunked_loss_enabled(model, True):
                chunked_loss = model(**inputs).loss
            with chunked_loss_enabled(model, False):
                outputs = model(**inputs)
            nll, kept = shifted_token_nll(outputs.logits, inputs["labels"])
            kept_tokens = int(kept.sum())
            shifted_logits = outputs.logits[:, :-1, :].float()
            cross_entropy = F.cross_entropy(
                shifted_logits.reshape(-1, shifted_logits.shape[-1]),
                inputs["labels"][:, 1:].reshape(-1),
                ignore_index=IGNORE_INDEX,
            )
            nll_sum += nll.double().sum().item()
            kept_total += kept_tokens
            model_sum += outputs.loss.item() * kept_tokens
            cross_entropy_sum += cross_entropy.item() * kept_tokens
            chunked_sum += chunked_loss.item() * kept_tokens
    if kept_total == 0:
        raise LmpipeError(f"loss check: batch {name} has no scored label (every shifted label is -100)")
    trainer.current_gradient_accumulation_steps = len(micro_batches)  # set by the training loop before each step
    with chunked_loss_enabled(model, trainer_chunked):
        trainer_loss = sum(trainer.training_step(model, batch, num_items_in_batch).item() for batch in micro_batches)
    model.zero_grad(set_to_none=True)
    model.eval()
    return BatchLosses(
        batch=name,
        kept_tokens=kept_total,
        model=model_sum / kept_total,
        manual=nll_sum / kept_total,
        cross_entropy=cross_entropy_sum / kept_total,
        chunked=chunked_sum / kept_total,
        trainer=trainer_loss,
    )


def _gradients(model: torch.nn.Module, inputs: dict, names: list[str]) -> dict[str, torch.Tensor]:
    """Gradients of one micro-batch's loss for the named parameters and the final hidden states (lm_head's input)."""
    model.zero_grad(set_to_none=True)
    captured = {}
    head = chunked_loss_of(model).head
    handle = head.register_forward_pre_hook(lambda module, args: captured.setdefault("h", args[0]), prepend=True)
    try:
        outputs = model(**inputs)
    finally:
        handle.remove()
    captured["h"].retain_grad()
    outputs.loss.backward()
    parameters = dict(model.named_parameters())
    gradients = {name: parameters[name].grad.detach().clone() for name in names}
    gradients["final hidden states"] = captured["h"].grad.detach().clone()
    model.zero_grad(set_to_none=True)
    return gradients


def gradient_agreement(model: torch.nn.Module, batch: dict) -> dict[str, float]:
    """max |chunked - own| / max |own| per tensor: lm_head (tied: wte) when it trains, the first trainable
    attention weight whose gradient is not zero (LoRA's A starts with none: B is zero), the final hidden states."""
    head_weight = chunked_loss_of(model).head.weight
    trainable = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    head = [name for name, p in trainable if p is head_weight]
    attention = [name for name, _ in trainable if ".attn." in name and name.endswith("weight")]
    gradients = {}
    for enabled in (True, False):
        with chunked_loss_enabled(model, enabled):
            gradients[enabled] = _gradients(model, batch, head + attention)
    model.eval()
    own = gradients[False]
    shown = head + [name for name in attention if own[name].abs().max() > 0][:1] + ["final hidden states"]
    return {
        name: ((gradients[True][name] - own[name]).abs().max() / own[name].abs().max()).item() for name in shown
    }


def check_losses(trainer: Trainer, micro_batches: Iterable[dict]) -> LossCheck:
    """Compare the five losses on `micro_batches` (dicts with input_ids, labels, optional attention_mask and
    position_ids, as a collator yields them), grouped into optimizer steps by the Trainer's own code.

    Takes the Trainer, not just the model: a wrong count lives in the Trainer (e.g. a model whose `loss_type` is
    None makes it count unshifted labels). The model's dropout is turned off (see `disable_dropout`).
    """
    disable_dropout(trainer.model)
    installed = chunked_loss_of(trainer.model)
    trainer_chunked = installed is not None and installed.enabled
    chunked = installed or ChunkedLoss(trainer.model)  # only for the check: removed again below
    accumulation = trainer.args.gradient_accumulation_steps
    iterator: Iterator[dict] = iter(micro_batches)
    rows, gradients = [], {}
    try:
        while True:
            step, num_items_in_batch = trainer.get_batch_samples(iterator, accumulation, trainer.args.device)
            if not step:
                break
            if not rows:
                gradients = gradient_agreement(trainer.model, trainer._prepare_inputs(step[0]))
            rows.append(_batch_losses(trainer, step, num_items_in_batch, str(len(rows) + 1), trainer_chunked))
    finally:
        if installed is None:
            chunked.remove()
    if not rows:
        raise LmpipeError("loss check: no batches to compare")
    kept = sum(row.kept_tokens for row in rows)
    weighted = {name: sum(getattr(row, name) * row.kept_tokens for row in rows) / kept for name in LOSS_NAMES}
    dtype = next(trainer.model.parameters()).dtype
    return LossCheck(
        rows=rows,
        total=BatchLosses(batch="all", kept_tokens=kept, **weighted),
        relative_tolerance=relative_tolerance(dtype),
        dtype=str(dtype).removeprefix("torch."),
        micro_batches_per_batch=accumulation,
        gradients=gradients,
        gradient_tolerance=gradient_tolerance(dtype),
        trainer_chunked=trainer_chunked,
    )


def format_table(check: LossCheck) -> str:
    """The table `check_loss.py` prints: one row per batch, then the total over all batches."""
    header = f"{'batch':>5} {'kept tokens':>11} " + " ".join(f"{n:>13}" for n in LOSS_NAMES) + f" {'max abs diff':>12}"
    lines = [
        f"loss check: {len(check.rows)} batches (gradient_accumulation_steps={check.micro_batches_per_batch}), "
        f"{check.dtype}, relative tolerance {check.relative_tolerance:.0e}, losses in nats per kept token",
        header,
    ]
    for row in [*check.rows, check.total]:
        losses = " ".join(f"{value:>13.6f}" for value in row.losses().values())
        lines.append(f"{row.batch:>5} {row.kept_tokens:>11,} {losses} {row.max_abs_diff():>12.1e}")
    trainer_loss = "the chunked one" if check.trainer_chunked else "the model's own"
    lines.append(f"the trainer's loss is {trainer_loss}; chunked within {check.tolerance('chunked'):.0e} of manual")
    lines.append(
        f"gradients of batch 1's first micro-batch, chunked vs the model's own loss (max |diff| / max |grad|, "
        f"tolerance {check.gradient_tolerance:.0e}):"
    )
    lines += [f"  {name:<40} {difference:.1e}" for name, difference in check.gradients.items()]
    return "\n".join(lines)


def check_trainer(recipe: Recipe, output_dir: str) -> Trainer:
    """The Trainer the recipe would train with: pretraining (from scratch or `model_name_or_path`) or QA fine-tuning.

    It writes nothing of the run's: `output_dir` replaces the recipe's, with no reporting and no Hub push; and it
    evaluates nothing, so the recipe's `zero_shot_tasks` are not prepared.
    """
    fine_tuning = isinstance(recipe.data, QAArguments)
    check = (lambda: check_finetune_arguments(recipe.model, recipe.data, recipe.lora)) if fine_tuning else lambda: None
    template = check_run(recipe, check)
    training = dataclasses.replace(
        recipe.training, output_dir=output_dir, report_to="none", push_to_hub=False, zero_shot_tasks=None
    )
    set_seed(training.seed)
    if fine_tuning:
        return build_qa_trainer(recipe, training, template)[0]
    return build_pretrain_trainer(recipe, training)[0]


def run_loss_check(recipe: Recipe) -> LossCheck | PreferenceCheck:
    """The check on the first `batches` training batches of the recipe, drawn by the Trainer's own dataloader (a
    DPO recipe: its first `batches` batches of pairs, in order); a saved model that fails verification is replaced
    by its newest checkpoint that passes (`verified_model_dir`)."""
    check_args = recipe.groups["loss_check"]
    if recipe.model.model_name_or_path:
        recipe.model.model_name_or_path = verified_model_dir(recipe.model.model_name_or_path)
    if recipe.task == "dpo":
        return run_preference_check(recipe)
    with tempfile.TemporaryDirectory(prefix="lmpipe-check-loss-") as output_dir:
        trainer = check_trainer(recipe, output_dir)
        count = check_args.batches * trainer.args.gradient_accumulation_steps
        return check_losses(trainer, islice(trainer.get_train_dataloader(), count))


# The DPO check ---------------------------------------------------------------------------------------------------

PREFERENCE_VALUES = ("loss", "reward_chosen", "reward_rejected", "reward_margin", "logps_chosen", "logps_rejected")


@dataclass
class PreferenceBatch:
    """One batch of pairs: the hand-computed values, TRL's, and the largest per-sequence log-probability gap."""

    batch: str
    pairs: int
    scored_tokens: int
    manual: dict[str, float]
    trl: dict[str, float]
    reward_accuracy: float
    sequence_difference: float  # max |TRL's - manual| over the batch's policy and reference sequence log-probs


@dataclass
class PreferenceCheck:
    """Per-batch rows and the relative tolerance (of the value, or of 1 for values near 0) they must agree within."""

    rows: list[PreferenceBatch]
    relative_tolerance: float
    dtype: str
    beta: float

    def first_disagreement(self) -> str | None:
        for row in self.rows:
            for name in PREFERENCE_VALUES:
                manual, trl = row.manual[name], row.trl[name]
                difference = abs(trl - manual) / max(abs(manual), 1.0)
                if not difference <= self.relative_tolerance:
                    return (
                        f"batch {row.batch}: TRL's {name} {trl:.6f} vs manual {manual:.6f} "
                        f"(relative difference {difference:.1e} > {self.relative_tolerance:.0e})"
                    )
            scale = max(1.0, max(abs(row.manual["logps_chosen"]), abs(row.manual["logps_rejected"])))
            if not row.sequence_difference / scale <= self.relative_tolerance:
                return (
                    f"batch {row.batch}: a sequence's answer log-probability differs by {row.sequence_difference:.1e}"
                    f" between the model's fused_lm_head forward (what TRL trains on) and the manual one"
                )
        return None


def sequence_log_prob(model: torch.nn.Module, prompt: list[int], answer: list[int]) -> float:
    """log p(answer | prompt) by hand: the sequence alone (no padding), float64 log_softmax, gather the answer's
    tokens (its end marker included) at the positions before each."""
    ids = torch.tensor([prompt + answer], device=next(model.parameters()).device)
    logits = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[0, len(prompt) - 1 : -1].double()
    return torch.log_softmax(logits, dim=-1).gather(1, ids[0, len(prompt):, None]).sum().item()


def hand_values(beta: float, policy: list[tuple[float, float]], reference: list[tuple[float, float]]
                ) -> tuple[dict[str, float], float]:
    """The batch means of the DPO values (and the reward accuracy) from each pair's (chosen, rejected) sums."""
    chosen = torch.tensor([beta * (p[0] - r[0]) for p, r in zip(policy, reference)], dtype=torch.float64)
    rejected = torch.tensor([beta * (p[1] - r[1]) for p, r in zip(policy, reference)], dtype=torch.float64)
    values = {
        "loss": -F.logsigmoid(chosen - rejected).mean().item(),
        "reward_chosen": chosen.mean().item(),
        "reward_rejected": rejected.mean().item(),
        "reward_margin": (chosen - rejected).mean().item(),
        "logps_chosen": sum(p[0] for p in policy) / len(policy),
        "logps_rejected": sum(p[1] for p in policy) / len(policy),
    }
    return values, (chosen > rejected).double().mean().item()


def reference_context(trainer) -> tuple[torch.nn.Module, Callable[[], contextlib.AbstractContextManager]]:
    """The model that scores the reference and (a maker of) the context it needs: TRL's reference model, else the
    policy with its adapters disabled (new LoRA) or its frozen `ref` adapter, else the policy itself (precomputed
    reference log-probabilities: before any step, the policy is the reference)."""
    if trainer.ref_model is not None:
        return trainer.ref_model, contextlib.nullcontext
    model = trainer.model
    if is_peft_model(model):
        return model, lambda: use_adapter(model, "ref" if "ref" in model.peft_config else None)
    return model, contextlib.nullcontext


def check_preferences(trainer, pairs: list[dict], batch_size: int) -> PreferenceCheck:
    """Compare TRL's DPO values with the hand-computed ones on `pairs` (prompt_ids / chosen_ids / rejected_ids
    rows, in order), `batch_size` pairs per batch collated by the trainer's own collator."""
    args = trainer.args
    if (list(args.loss_type) != ["sigmoid"] or args.f_divergence_type != "reverse_kl" or args.ld_alpha is not None
            or args.use_weighting):
        raise LmpipeError(
            "check-loss checks the DPO sigmoid loss: loss_type sigmoid, f_divergence_type reverse_kl, no ld_alpha, "
            "no use_weighting"
        )
    model = trainer.model
    disable_dropout(model)
    reference_model, reference = reference_context(trainer)
    disable_dropout(reference_model)
    beta, rows = args.beta, []
    model.eval()
    for start in range(0, len(pairs), batch_size):
        batch_pairs = pairs[start : start + batch_size]
        with torch.no_grad():
            policy = [tuple(sequence_log_prob(model, p["prompt_ids"], p[k]) for k in ("chosen_ids", "rejected_ids"))
                      for p in batch_pairs]
            with reference():
                ref = [tuple(sequence_log_prob(reference_model, p["prompt_ids"], p[k])
                             for k in ("chosen_ids", "rejected_ids")) for p in batch_pairs]
            manual, accuracy = hand_values(beta, policy, ref)
            inputs = trainer._prepare_inputs(trainer.data_collator(batch_pairs))  # the Trainer's own move to device
            trl_policy, trl_ref = fused_sequence_log_probs(trainer, model, inputs, reference_model, reference)
            model.train()  # TRL logs the values of a training step under "train"
            trl_loss = trainer.compute_loss(model, inputs).item()
            model.eval()
        logged = {key: values[-1] for key, values in trainer._metrics["train"].items()}
        trl = {
            "loss": trl_loss,
            "reward_chosen": logged["rewards/chosen"],
            "reward_rejected": logged["rewards/rejected"],
            "reward_margin": logged["rewards/margins"],
            "logps_chosen": logged["logps/chosen"],
            "logps_rejected": logged["logps/rejected"],
        }
        hand = torch.tensor([v for pair in policy + ref for v in pair], dtype=torch.float64)
        fused = torch.tensor([*_pairs(trl_policy), *_pairs(trl_ref)], dtype=torch.float64)
        rows.append(PreferenceBatch(
            batch=str(len(rows) + 1),
            pairs=len(batch_pairs),
            scored_tokens=sum(len(p["chosen_ids"]) + len(p["rejected_ids"]) for p in batch_pairs),
            manual=manual,
            trl=trl,
            reward_accuracy=accuracy,
            sequence_difference=(fused - hand).abs().max().item(),
        ))
    for values in trainer._metrics.values():
        values.clear()
    dtype = next(model.parameters()).dtype
    return PreferenceCheck(rows, relative_tolerance(dtype), str(dtype).removeprefix("torch."), beta)


def _pairs(sums: torch.Tensor) -> list[float]:
    """[chosen..., rejected...] sums as (chosen, rejected) pairs, flattened like the manual ones."""
    chosen, rejected = sums.double().chunk(2)
    return [v for pair in zip(chosen.tolist(), rejected.tolist()) for v in pair]


def fused_sequence_log_probs(trainer, model, inputs, reference_model, reference) -> tuple[torch.Tensor, torch.Tensor]:
    """Each sequence's answer log-probability through TRL's fused LM head on the collated batch (chosen rows first,
    then rejected), for the policy and the reference (or the precomputed reference values)."""
    labels = inputs["input_ids"].masked_fill(inputs["completion_mask"] == 0, IGNORE_INDEX)
    model_inputs = {"input_ids": inputs["input_ids"], "attention_mask": inputs["attention_mask"]}
    policy = model(**model_inputs, labels=labels, fused_lm_head=True).log_probs.sum(1)
    if "ref_chosen_logps" in inputs:
        return policy, torch.cat([inputs["ref_chosen_logps"], inputs["ref_rejected_logps"]])
    with reference():
        ref = reference_model(**model_inputs, labels=labels, fused_lm_head=True).log_probs.sum(1)
    return policy, ref


def format_preference_table(check: PreferenceCheck) -> str:
    """The DPO check's table: per batch, each value by hand and by TRL."""
    lines = [
        f"DPO loss check: {len(check.rows)} batches, beta {check.beta:g}, {check.dtype}, relative tolerance "
        f"{check.relative_tolerance:.0e}; manual = each sequence alone, float64 log_softmax + gather",
        f"{'batch':>5} {'pairs':>5} {'scored':>6} {'value':<15} {'manual':>13} {'TRL':>13} {'abs diff':>9}",
    ]
    for row in check.rows:
        for name in PREFERENCE_VALUES:
            manual, trl = row.manual[name], row.trl[name]
            lines.append(
                f"{row.batch:>5} {row.pairs:>5} {row.scored_tokens:>6} {name:<15} {manual:>13.6f} {trl:>13.6f} "
                f"{abs(trl - manual):>9.1e}"
            )
        lines.append(
            f"{row.batch:>5} reward accuracy (manual) {row.reward_accuracy:.3f}; per-sequence log-probs, the "
            f"fused_lm_head forward TRL calls vs manual: max |diff| {row.sequence_difference:.1e}"
        )
    return "\n".join(lines)


def run_preference_check(recipe: Recipe) -> PreferenceCheck:
    """The DPO check on the recipe's first `batches` x per_device_train_batch_size training pairs, in order."""
    from lmpipe.dpo import build_dpo_trainer, check_dpo, load_reference

    check_args = recipe.groups["loss_check"]
    config_dir = check_run(recipe, lambda: check_dpo(recipe))
    with tempfile.TemporaryDirectory(prefix="lmpipe-check-loss-") as output_dir:
        training = dataclasses.replace(recipe.training, output_dir=output_dir, report_to="none", push_to_hub=False)
        set_seed(training.seed)
        reference = None
        if check_args.reference_model_name_or_path:
            reference = load_reference(recipe, check_args.reference_model_name_or_path)
        trainer = build_dpo_trainer(recipe, training, config_dir, reference)[0]
        batch_size = training.per_device_train_batch_size
        dataset = trainer.train_dataset
        pairs = [dataset[i] for i in range(min(len(dataset), check_args.batches * batch_size))]
        return check_preferences(trainer, pairs, batch_size)
