"""Causal-LM cross-entropy straight from the final hidden states, a chunk of tokens at a time.

The `[tokens x vocab]` logits are never held whole: each chunk's logits give that chunk's NLL and, in training, its
share of the gradients, and are freed before the next chunk. Our own because cut-cross-entropy's kernels need CUDA
(Triton) and its portable `torch_compile` path still builds the full logits.
"""

from __future__ import annotations

import os

import torch

from lmpipe.loss.reference import IGNORE_INDEX

# Bytes of float32 logits one chunk may hold: this, or 1/64 of the device's memory if less.
MAX_CHUNK_BYTES = 128 * 2**20
MIN_CHUNK_TOKENS = 64


def device_memory_bytes(device: torch.device) -> int:
    """The device's total memory (the machine's RAM on CPU).

    Total, not free: the same machine then always cuts the same chunks, so reruns stay bit-identical.
    """
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 64 * MAX_CHUNK_BYTES


def default_chunk_tokens(vocab_size: int, device: torch.device) -> int:
    """Tokens per chunk so that one chunk's float32 logits take min(MAX_CHUNK_BYTES, device memory / 64)."""
    budget = min(MAX_CHUNK_BYTES, device_memory_bytes(device) // 64)
    return max(MIN_CHUNK_TOKENS, budget // (4 * vocab_size))


def even_chunk_tokens(tokens: int, most: int) -> int:
    """The fewest chunks of at most `most` tokens, as even as they go: a short last chunk still reads the whole
    weight and its gradient for a few rows (2,040 tokens as 4 x 510, not 3 x 667 + 39; benchmarks/README.md)."""
    chunks = max(1, -(-tokens // most))
    return max(1, -(-tokens // chunks))


def compute_dtype(hidden: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    """The dtype the model's own `lm_head` would multiply in: autocast's when it is on, else the weight's."""
    device_type = hidden.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return weight.dtype


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 for bf16/fp16/fp32 matmuls (float64 stays float64)."""
    return torch.promote_types(dtype, torch.float32)


class ChunkWorkspace:
    """The buffers one call reuses for every chunk, and the chunk's softmax done a few rows at a time.

    No chunk allocates a logits-sized tensor (on CPU each would be fresh pages from the kernel: page faults and
    zeroing, every chunk, every step). `product` holds a chunk's logits as the matmul gives them (the compute
    dtype) and then the gradient of the logits for the two gradient matmuls; the log-sum-exp and softmax are
    float32, done on `block_rows` rows at a time, which on a CPU fit in its cache (the element-wise passes then
    never go to memory) and on a GPU are the whole chunk.
    """

    CPU_BLOCK_BYTES = 4 * 2**20

    def __init__(self, rows: int, weight_shape: torch.Size, dtype, accumulate, device: torch.device):
        vocab, dim = weight_shape
        self.same_dtype = dtype == accumulate
        self.product = torch.empty(rows, vocab, dtype=dtype, device=device)
        on_cpu = device.type == "cpu"
        self.block_rows = max(1, self.CPU_BLOCK_BYTES // (4 * vocab)) if on_cpu else rows
        self.weight_rows = max(1, self.CPU_BLOCK_BYTES // (4 * dim)) if on_cpu else vocab
        self.block = None if self.same_dtype else torch.empty(self.block_rows, vocab, dtype=accumulate, device=device)
        self.weight_product = None

    def _row_blocks(self, hidden_c: torch.Tensor, weight_c: torch.Tensor, targets_c: torch.Tensor):
        """The chunk's logits (into `product`), then per `block_rows` rows: their offset, their rows of `product`,
        the same rows in the accumulation dtype (`block`: the rows themselves when the dtypes match), their targets,
        the target logits and the row maxima."""
        product = torch.mm(hidden_c, weight_c.T, out=self.product[: len(hidden_c)])
        for start in range(0, len(product), self.block_rows):
            rows = product[start : start + self.block_rows]
            block = rows if self.same_dtype else self.block[: len(rows)].copy_(rows)
            targets = targets_c[start : start + self.block_rows]
            yield start, rows, block, targets, block.gather(1, targets[:, None]).squeeze(1), block.amax(1, keepdim=True)

    def nll_and_logit_gradient(
        self, hidden_c: torch.Tensor, weight_c: torch.Tensor, targets_c: torch.Tensor, nll: torch.Tensor, grad: bool
    ) -> torch.Tensor:
        """Writes the chunk's NLL into `nll`; returns the chunk's softmax - one-hot (when `grad`) in the compute
        dtype, in `product`."""
        for start, rows, block, targets, target_logits, row_max in self._row_blocks(hidden_c, weight_c, targets_c):
            exp_sums = block.sub_(row_max).exp_().sum(1, keepdim=True)  # one exp per logit, in place
            nll[start : start + len(rows)] = (row_max + exp_sums.log()).squeeze(1) - target_logits
            if grad:
                block.div_(exp_sums)[torch.arange(len(block), device=block.device), targets] -= 1.0
                if not self.same_dtype:
                    rows.copy_(block)
        return self.product[: len(hidden_c)]

    def log_probs_and_statistics(
        self, hidden_c: torch.Tensor, weight_c: torch.Tensor, targets_c: torch.Tensor, out: torch.Tensor
    ) -> None:
        """Writes the chunk's target log-probability, entropy, mean logit and whether the target is the top logit
        into the columns of `out` [tokens, 4] (the accumulation dtype; no gradient)."""
        for start, rows, block, _, target_logits, row_max in self._row_blocks(hidden_c, weight_c, targets_c):
            result = out[start : start + len(rows)]
            result[:, 2] = block.mean(1)
            result[:, 3] = (target_logits >= row_max.squeeze(1)).float()
            shifted = block.sub_(row_max)
            exps = shifted.exp()  # one exp per logit
            exp_sums = exps.sum(1)
            log_sums = exp_sums.log()
            result[:, 0] = target_logits - row_max.squeeze(1) - log_sums
            result[:, 1] = log_sums - exps.mul_(shifted).sum(1) / exp_sums  # entropy: sum p (log-sum - z)

    def add_weight_gradient(self, grad_weight: torch.Tensor, grad_logits: torch.Tensor, hidden_c: torch.Tensor) -> None:
        """grad_weight (float32) += grad_logits.T @ hidden_c, the matmul in the compute dtype."""
        if self.same_dtype:
            grad_weight.addmm_(grad_logits.T, hidden_c)
            return
        if self.weight_product is None:
            self.weight_product = torch.empty(grad_weight.shape, dtype=hidden_c.dtype, device=hidden_c.device)
        product = torch.mm(grad_logits.T, hidden_c, out=self.weight_product)
        # on CPU, float32 += bf16 first converts the whole bf16 operand into a new tensor: in row blocks it stays small
        for start in range(0, len(grad_weight), self.weight_rows):
            grad_weight[start : start + self.weight_rows].add_(product[start : start + self.weight_rows])


class LinearCrossEntropy(torch.autograd.Function):
    """Summed NLL of `targets` under `hidden @ weight.T`, chunked over tokens (every target a real id), and the
    per-token NLL as a second, non-differentiable output.

    The loss is a sum, so every token's NLL gets the same gradient: while a chunk's logits are at hand, the forward
    also turns them into that chunk's gradients for the hidden states and the weight (softmax - one-hot), and the
    backward only scales them. The logits are computed once, as in the unchunked loss, and never recomputed.
    Matmuls run in `dtype` (the model's compute dtype); log-sum-exp, softmax and the weight gradient's sum over
    chunks are float32. `with_grad` (hidden, weight): which gradients to prepare (none under no_grad).
    """

    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk_tokens: int, dtype: torch.dtype, with_grad: tuple[bool, bool]):
        accumulate = accumulation_dtype(dtype)
        chunk_tokens = even_chunk_tokens(len(targets), chunk_tokens)
        grad_hidden = torch.empty_like(hidden) if with_grad[0] else None
        grad_weight = torch.zeros(weight.shape, dtype=accumulate, device=weight.device) if with_grad[1] else None
        nll = hidden.new_empty(len(targets), dtype=accumulate)
        workspace = ChunkWorkspace(min(chunk_tokens, len(targets)), weight.shape, dtype, accumulate, hidden.device)
        with torch.autocast(hidden.device.type, enabled=False):
            weight_c = weight.to(dtype)
            for start in range(0, len(targets), chunk_tokens):
                end = start + chunk_tokens
                hidden_c = hidden[start:end].to(dtype)
                grad_logits = workspace.nll_and_logit_gradient(
                    hidden_c, weight_c, targets[start:end], nll[start:end], any(with_grad)
                )
                if with_grad[0]:
                    grad_hidden[start:end] = grad_logits @ weight_c
                if with_grad[1]:
                    workspace.add_weight_gradient(grad_weight, grad_logits, hidden_c)
        ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.weight_dtype = weight.dtype
        ctx.mark_non_differentiable(nll)
        return nll.sum(), nll

    @staticmethod
    def backward(ctx, grad_total, grad_nll_unused):
        grad_hidden, grad_weight = ctx.saved_tensors
        need_hidden, need_weight = ctx.needs_input_grad[:2]
        if need_hidden:
            grad_hidden = grad_hidden * grad_total.to(grad_hidden.dtype)
        if need_weight:
            grad_weight = (grad_weight * grad_total.to(grad_weight.dtype)).to(ctx.weight_dtype)
        return (grad_hidden if need_hidden else None), (grad_weight if need_weight else None), None, None, None, None


class LinearLogProbs(torch.autograd.Function):
    """Each target's log-probability under `hidden @ weight.T`, chunked over tokens, differentiable token by token,
    with each token's entropy, mean logit and top-1 flag as non-differentiable outputs.

    For losses whose gradient differs per token or sequence (DPO's log-ratios), which `LinearCrossEntropy` cannot
    serve: it prepares its gradients in the forward for one scalar. Here the backward recomputes each chunk's logits
    (one more matmul per chunk) and scales each token's softmax - one-hot by its own upstream gradient. The same
    `ChunkWorkspace`: no chunk allocates a logits-sized tensor beyond the one buffer.
    """

    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk_tokens: int, dtype: torch.dtype):
        accumulate = accumulation_dtype(dtype)
        chunk_tokens = even_chunk_tokens(len(targets), chunk_tokens)
        out = torch.empty(len(targets), 4, dtype=accumulate, device=hidden.device)
        workspace = ChunkWorkspace(min(chunk_tokens, len(targets)), weight.shape, dtype, accumulate, hidden.device)
        with torch.no_grad(), torch.autocast(hidden.device.type, enabled=False):
            weight_c = weight.to(dtype)
            for start in range(0, len(targets), chunk_tokens):
                end = start + chunk_tokens
                workspace.log_probs_and_statistics(hidden[start:end].to(dtype), weight_c, targets[start:end],
                                                   out[start:end])
        ctx.save_for_backward(hidden, weight, targets)
        ctx.chunk_tokens, ctx.dtype = chunk_tokens, dtype
        log_probs, entropy, mean_logits, is_top1 = out.unbind(1)
        ctx.mark_non_differentiable(entropy, mean_logits, is_top1)
        return log_probs.clone(), entropy.clone(), mean_logits.clone(), is_top1.bool()

    @staticmethod
    def backward(ctx, grad_log_probs, *unused):
        hidden, weight, targets = ctx.saved_tensors
        need_hidden, need_weight = ctx.needs_input_grad[:2]
        dtype, chunk_tokens = ctx.dtype, ctx.chunk_tokens
        accumulate = accumulation_dtype(dtype)
        grad_hidden = torch.empty_like(hidden) if need_hidden else None
        grad_weight = torch.zeros(weight.shape, dtype=accumulate, device=weight.device) if need_weight else None
        workspace = ChunkWorkspace(min(chunk_tokens, len(targets)), weight.shape, dtype, accumulate, hidden.device)
        nll = hidden.new_empty(min(chunk_tokens, len(targets)), dtype=accumulate)
        with torch.no_grad(), torch.autocast(hidden.device.type, enabled=False):
            weight_c = weight.to(dtype)
            for start in range(0, len(targets), chunk_tokens):
                end = start + chunk_tokens
                hidden_c = hidden[start:end].to(dtype)
                grad_logits = workspace.nll_and_logit_gradient(  # softmax - one-hot: d NLL / d logits
                    hidden_c, weight_c, targets[start:end], nll[: len(hidden_c)], True
                )
                grad_logits.mul_(grad_log_probs[start:end, None].neg().to(dtype))  # d log p = -d NLL
                if need_hidden:
                    grad_hidden[start:end] = grad_logits @ weight_c
                if need_weight:
                    workspace.add_weight_gradient(grad_weight, grad_logits, hidden_c)
        return (
            grad_hidden if need_hidden else None,
            grad_weight.to(weight.dtype) if need_weight else None,
            None, None, None,
        )


def linear_log_probs(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk_tokens: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per position of `targets` ([...], -100 where not scored): the target's log-probability (differentiable),
    entropy, mean logit (float32; float64 for float64 weights) and top-1 flag, 0 / False where not scored.
    Positions with target -100 are never multiplied by the weight."""
    flat = targets.reshape(-1)
    kept = (flat != IGNORE_INDEX).nonzero().squeeze(1)
    hidden_kept = hidden.reshape(-1, hidden.shape[-1]).index_select(0, kept)
    target_ids = flat.index_select(0, kept).to(hidden.device)
    values = LinearLogProbs.apply(hidden_kept, weight, target_ids, chunk_tokens, compute_dtype(hidden, weight))
    placed = []
    for value in values:
        full = value.new_zeros(flat.shape)
        placed.append(full.index_copy(0, kept, value).view(targets.shape))  # index_copy keeps the gradient
    return tuple(placed)


def shifted_targets(labels: torch.Tensor, shift_labels: torch.Tensor | None = None) -> torch.Tensor:
    """Position t's target is label t+1, the last one -100: transformers' ForCausalLMLoss shift, same shape."""
    if shift_labels is not None:
        return shift_labels
    return torch.nn.functional.pad(labels, (0, 1), value=IGNORE_INDEX)[..., 1:]


def linear_cross_entropy(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk_tokens: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(summed NLL of the kept targets, their per-token NLL (not differentiable), flat indices of the kept
    positions) for `hidden` [..., D] and `targets` [...] with -100 for positions not scored. Positions with
    target -100 are never multiplied by the weight."""
    kept = (targets.reshape(-1) != IGNORE_INDEX).nonzero().squeeze(1)
    hidden_kept = hidden.reshape(-1, hidden.shape[-1]).index_select(0, kept)
    target_ids = targets.reshape(-1).index_select(0, kept).to(hidden.device)
    grad = torch.is_grad_enabled()
    with_grad = (grad and hidden_kept.requires_grad, grad and weight.requires_grad)
    total, nll = LinearCrossEntropy.apply(
        hidden_kept, weight, target_ids, chunk_tokens, compute_dtype(hidden, weight), with_grad
    )
    return total, nll, kept


def causal_lm_loss(
    total: torch.Tensor, kept_tokens: int, num_items_in_batch: torch.Tensor | int | None = None
) -> torch.Tensor:
    """ForCausalLMLoss's reduction: the sum over `num_items_in_batch` when given (token-weighted over accumulation
    steps and ranks), else the mean over kept tokens (NaN when there are none, as F.cross_entropy gives)."""
    if num_items_in_batch is None:
        return total / kept_tokens
    if torch.is_tensor(num_items_in_batch):
        num_items_in_batch = num_items_in_batch.to(total.device)
    return total / num_items_in_batch


def token_nll(nll: torch.Tensor, kept: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """The kept tokens' NLL back at their positions (0 elsewhere): per-row sums for exact evaluation."""
    flat = torch.zeros(shape.numel(), dtype=torch.float32, device=nll.device)
    return flat.index_copy_(0, kept, nll.float()).view(shape)
