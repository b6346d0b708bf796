"""How a causal LM computes its loss: the chunked linear + cross-entropy, wired in with hooks (no forked model class).

Called with `labels`, a model with `ChunkedLoss` installed hands its final hidden states to the chunked loss instead
of its `lm_head` and returns `ChunkedCausalLMOutput(loss, token_nll)`: no `[tokens x vocab]` logits. Called without
labels (generation) it is untouched. The loss is computed inside the model's forward, so DDP and FSDP wrappers see
an ordinary forward whose parameters are live, and the Trainer's own `compute_loss` (num_items_in_batch, accumulation,
ranks) is unchanged.
"""

from __future__ import annotations

import types
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from transformers import PreTrainedModel
from transformers.loss.loss_utils import ForCausalLMLoss
from transformers.utils import ModelOutput

from lmpipe.errors import LmpipeError
from lmpipe.loss.chunked import (
    causal_lm_loss,
    default_chunk_tokens,
    linear_cross_entropy,
    linear_log_probs,
    shifted_targets,
    token_nll,
)
from lmpipe.loss.reference import IGNORE_INDEX

ATTRIBUTE = "lmpipe_chunked_loss"
LOG_PROBS_ATTRIBUTE = "lmpipe_chunked_log_probs"


@dataclass
class ChunkedCausalLMOutput(ModelOutput):
    """`token_nll` [batch, seq]: position t holds the NLL of label t+1 (0 where it is -100 and at the last position)."""

    loss: torch.Tensor | None = None
    token_nll: torch.Tensor | None = None


class ChunkedLoss:
    """Hooks on one model (outermost module: a peft wrapper included) and its inner causal LM's `lm_head`."""

    def __init__(self, model: torch.nn.Module, chunk_tokens: int | None = None):
        self.lm: PreTrainedModel = model.get_base_model() if hasattr(model, "get_base_model") else model
        self.head = self.lm.get_output_embeddings()
        if getattr(self.head, "bias", None) is not None:
            raise LmpipeError("chunked_loss: the model's lm_head has a bias; set chunked_loss: false")
        if chunk_tokens is not None and chunk_tokens < 1:  # a direct caller's argument (recipes: config.rules)
            raise LmpipeError(f"chunked_loss_tokens must be >= 1, got {chunk_tokens}")
        self.chunk_tokens = chunk_tokens
        self.enabled = True
        self._armed = False
        self._hidden: torch.Tensor | None = None
        self._token_nll: torch.Tensor | None = None
        self.model = model
        self._handles = [
            model.register_forward_pre_hook(self._arm, with_kwargs=True),
            self.head.register_forward_pre_hook(self._take_hidden),
            model.register_forward_hook(self._chunked_output),
        ]
        self.lm.loss_function = self._loss
        setattr(model, ATTRIBUTE, self)

    def remove(self) -> None:
        """Back to the model's own loss, as before installation."""
        for handle in self._handles:
            handle.remove()
        del self.lm._loss_function
        delattr(self.model, ATTRIBUTE)

    def chunk_size(self, device: torch.device) -> int:
        if self.chunk_tokens is None:
            self.chunk_tokens = default_chunk_tokens(self.head.weight.shape[0], device)
        return self.chunk_tokens

    def _arm(self, module, args, kwargs):
        self._armed = self.enabled and kwargs.get("labels") is not None
        self._hidden = self._token_nll = None

    def _take_hidden(self, module, args):
        """lm_head's input is kept for the loss; lm_head itself gets no tokens, so it builds no logits."""
        if not self._armed:
            return None
        (hidden,) = args
        self._hidden = hidden
        return (hidden[..., :0, :],)

    def _loss(
        self, logits, labels, vocab_size, num_items_in_batch=None, ignore_index=-100, shift_labels=None, **kwargs
    ):
        """The model's `loss_function`: chunked when armed, else transformers' ForCausalLMLoss on the logits."""
        if self._hidden is None:
            return ForCausalLMLoss(logits, labels, vocab_size, num_items_in_batch, ignore_index, shift_labels, **kwargs)
        hidden, self._hidden = self._hidden, None
        targets = shifted_targets(labels.to(hidden.device), shift_labels)
        total, nll, kept = linear_cross_entropy(hidden, self.head.weight, targets, self.chunk_size(hidden.device))
        self._token_nll = token_nll(nll, kept, targets.shape)
        return causal_lm_loss(total, len(kept), num_items_in_batch)

    def _chunked_output(self, module, args, output):
        if not self._armed:
            return None
        self._armed = False
        token_nll_, self._token_nll = self._token_nll, None
        return ChunkedCausalLMOutput(loss=output["loss"], token_nll=token_nll_)


def install_chunked_loss(model: torch.nn.Module, enabled: bool, chunk_tokens: int | None = None) -> None:
    """The recipe's `chunked_loss` / `chunked_loss_tokens`; off leaves the model's own loss untouched."""
    if enabled:
        ChunkedLoss(model, chunk_tokens)


def chunked_loss_of(model: torch.nn.Module) -> ChunkedLoss | None:
    """The installed ChunkedLoss, looking through DDP/FSDP/compile wrappers."""
    while model is not None:
        found = getattr(model, ATTRIBUTE, None)
        if found is not None:
            return found
        model = getattr(model, "module", None) or getattr(model, "_orig_mod", None)
    return None


@contextmanager
def chunked_loss_enabled(model: torch.nn.Module, enabled: bool):
    """Within it the installed chunked loss is on or off (off: the model builds its logits and its own ForCausalLM
    loss, the reference the chunked one must match)."""
    chunked = chunked_loss_of(model)
    if chunked is None:
        if enabled:
            raise ValueError("no chunked loss is installed on this model")
        yield
        return
    before, chunked.enabled = chunked.enabled, enabled
    try:
        yield
    finally:
        chunked.enabled = before


def token_scores(model: torch.nn.Module, input_ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """What `training.exact_eval.NllStatistics` reduces.

    Per-token NLL from the chunked loss, or else the full logits."""
    chunked = chunked_loss_of(model)
    if chunked is not None and chunked.enabled:
        return model(input_ids=input_ids, labels=labels).token_nll
    return model(input_ids=input_ids).logits


@dataclass
class ChunkedLogProbOutput(ModelOutput):
    """What TRL's DPOTrainer reads from `model(..., labels=..., fused_lm_head=True)` (the fields of its
    `FusedCausalLMOutput`), each [batch, seq - 1], 0 where the label is -100."""

    loss: torch.Tensor | None = None
    log_probs: torch.Tensor | None = None
    entropy: torch.Tensor | None = None
    mean_logits: torch.Tensor | None = None
    is_top1: torch.Tensor | None = None
    label_mask: torch.Tensor | None = None
    log_sum_sq_probs: torch.Tensor | None = None
    aux_loss: torch.Tensor | None = None


def install_chunked_log_probs(model: torch.nn.Module, chunk_tokens: int | None = None) -> None:
    """A call with `fused_lm_head=True` (TRL's DPOTrainer asks its models so for per-token log-probabilities) runs
    the backbone, then `loss.chunked.linear_log_probs` on the positions whose shifted label is not -100 only; any
    other call goes to the forward the model had. Installed after TRL's own fused head, which it replaces: on a
    machine without Triton that one scores every position, prompt and padding included, and makes several float32
    copies of each [4,096 x 32,768] tile. No effect on a model it is installed on already."""
    lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    if getattr(lm, LOG_PROBS_ATTRIBUTE, False):
        return
    head = lm.get_output_embeddings()
    if getattr(head, "bias", None) is not None:
        raise LmpipeError("chunked_loss: the model's lm_head has a bias; set chunked_loss: false")
    previous = lm.forward

    def forward(self, *args, fused_lm_head=False, labels=None, shift_labels=None, num_items_in_batch=None, **kwargs):
        if not fused_lm_head:
            extra = {"labels": labels, "shift_labels": shift_labels, "num_items_in_batch": num_items_in_batch}
            return previous(*args, **{k: v for k, v in extra.items() if v is not None}, **kwargs)
        kwargs["use_cache"] = False
        hidden = self.base_model(*args, **kwargs).last_hidden_state
        targets = shifted_targets(labels.to(hidden.device), shift_labels)
        chunk = chunk_tokens or default_chunk_tokens(head.weight.shape[0], hidden.device)
        values = linear_log_probs(hidden, head.weight, targets, chunk)
        if shift_labels is None:  # the last position predicts nothing: TRL's outputs are [batch, seq - 1]
            targets, values = targets[:, :-1], [value[:, :-1] for value in values]
        log_probs, entropy, mean_logits, is_top1 = values
        mask = targets != IGNORE_INDEX
        count = mask.sum().clamp(min=1) if num_items_in_batch is None else num_items_in_batch
        return ChunkedLogProbOutput(
            loss=-log_probs.sum() / count, log_probs=log_probs, entropy=entropy, mean_logits=mean_logits,
            is_top1=is_top1, label_mask=mask,
        )

    lm.forward = types.MethodType(forward, lm)
    setattr(lm, LOG_PROBS_ATTRIBUTE, True)
