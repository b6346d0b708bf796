"""Log-likelihood of continuations: one forward pass per context for all its continuations.

What the harness lacks (it runs context + choice once per choice and computes logits at every position): a row
holds the context once, then every continuation's input tokens, each attending only to the context and to itself
(a 4-D additive mask) with positions that continue the context's; rows are sorted by length and batched; the LM
head runs only at the positions that predict a continuation token. The numbers are the harness's: truncation from
the left to the model's length, log-softmax over the model's whole output row, summed per continuation, and
"greedy" when every continuation token is the argmax.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from accelerate import PartialState
from accelerate.utils import gather_object
from tqdm.auto import tqdm
from transformers import PreTrainedModel

from lmpipe.loss.chunked import default_chunk_tokens
from lmpipe.zero_shot.requests import Request


@dataclass(frozen=True)
class Score:
    """A continuation's summed log-likelihood (nats) and whether greedy decoding would have produced it."""

    logprob: float
    greedy: bool


@dataclass(frozen=True)
class Row:
    """One model input: a context and the continuations it serves, with where each continuation's tokens are read."""

    request_index: int
    continuation_indices: list[int]
    input_ids: list[int]
    position_ids: list[int]
    segments: list[int]  # 0: the shared context; k > 0: continuation k's own tokens (attend to 0 and to k)
    targets: list[list[int]]  # per continuation: its tokens
    target_positions: list[list[int]]  # per continuation: the row positions whose logits predict them


def packed_row(request_index: int, context: list[int], continuations: list[list[int]], indices: list[int]) -> Row:
    """Context once, then each continuation's tokens but its last; continuation k is predicted from the context's
    last position and from its own tokens."""
    input_ids, positions, segments = list(context), list(range(len(context))), [0] * len(context)
    targets, target_positions = [], []
    for segment, continuation in enumerate(continuations, start=1):
        start = len(input_ids)
        own = continuation[:-1]
        input_ids += own
        positions += range(len(context), len(context) + len(own))
        segments += [segment] * len(own)
        targets.append(list(continuation))
        target_positions.append([len(context) - 1, *range(start, start + len(own))])
    return Row(request_index, indices, input_ids, positions, segments, targets, target_positions)


def request_rows(request_index: int, request: Request, max_length: int) -> list[Row]:
    """One packed row when every continuation fits after the whole context in `max_length` positions; otherwise a
    row per continuation, truncated from the left as the harness truncates (`(context + continuation)[-(L+1):]`)."""
    context, continuations = request.context, request.continuations
    for continuation in continuations:
        if not context or not continuation:
            raise ValueError("a request needs a non-empty context and non-empty continuations")
        if len(continuation) > max_length:
            raise ValueError(f"a continuation of {len(continuation)} tokens exceeds the model's {max_length} positions")
    if len(context) + max(map(len, continuations)) - 1 <= max_length:
        return [packed_row(request_index, context, continuations, list(range(len(continuations))))]
    rows = []
    for index, continuation in enumerate(continuations):
        whole = (context + continuation)[-(max_length + 1) :]
        rows.append(packed_row(request_index, whole[: len(whole) - len(continuation)], [continuation], [index]))
    return rows


def additive_mask(rows: list[Row], length: int, dtype: torch.dtype) -> torch.Tensor:
    """[batch, 1, length, length]: 0 where a query may attend to a key (causal, and same segment or the context),
    the dtype's minimum elsewhere; a padding query attends to itself only, so no row of the softmax is empty."""
    allowed = torch.zeros(len(rows), length, length, dtype=torch.bool)
    causal = torch.ones(length, length, dtype=torch.bool).tril()
    for b, row in enumerate(rows):
        n = len(row.input_ids)
        segments = torch.tensor(row.segments)
        same = (segments[None, :] == 0) | (segments[None, :] == segments[:, None])
        allowed[b, :n, :n] = same & causal[:n, :n]
        allowed[b, n:, n:] = torch.eye(length - n, dtype=torch.bool)
    mask = torch.zeros(allowed.shape, dtype=dtype).masked_fill_(~allowed, torch.finfo(dtype).min)
    return mask[:, None]


def score_batch(model: PreTrainedModel, rows: list[Row]) -> list[list[Score]]:
    """Forward the rows through the transformer body, then the LM head at the target positions only."""
    device = model.device
    length = max(len(row.input_ids) for row in rows)
    input_ids = torch.zeros(len(rows), length, dtype=torch.long)
    position_ids = torch.zeros(len(rows), length, dtype=torch.long)
    for b, row in enumerate(rows):
        input_ids[b, : len(row.input_ids)] = torch.tensor(row.input_ids)
        position_ids[b, : len(row.position_ids)] = torch.tensor(row.position_ids)
    mask = additive_mask(rows, length, model.dtype)
    hidden = model.base_model(
        input_ids=input_ids.to(device), attention_mask=mask.to(device), position_ids=position_ids.to(device),
        use_cache=False,
    ).last_hidden_state
    batch_index = [b for b, row in enumerate(rows) for positions in row.target_positions for _ in positions]
    positions = [p for row in rows for group in row.target_positions for p in group]
    targets = torch.tensor([t for row in rows for group in row.targets for t in group], device=device)
    selected = hidden[torch.tensor(batch_index, device=device), torch.tensor(positions, device=device)]
    head = model.get_output_embeddings()
    logprobs, greedy = [], []
    per_call = default_chunk_tokens(head.weight.shape[0], device)  # the chunked loss's budget of logits at once
    for chunk, chunk_targets in zip(selected.split(per_call), targets.split(per_call)):
        log_softmax = torch.log_softmax(head(chunk).float(), dim=-1)
        logprobs.append(log_softmax.gather(-1, chunk_targets[:, None])[:, 0].double())
        greedy.append(log_softmax.argmax(-1) == chunk_targets)
    logprobs, greedy = torch.cat(logprobs).cpu().tolist(), torch.cat(greedy).cpu().tolist()
    scores, start = [], 0
    for row in rows:
        row_scores = []
        for group in row.targets:
            end = start + len(group)
            row_scores.append(Score(sum(logprobs[start:end]), all(greedy[start:end])))
            start = end
        scores.append(row_scores)
    return scores


def batches_by_length(rows: list[Row], batch_size: int) -> list[list[Row]]:
    """Longest rows first, `batch_size` rows a pass: little padding, and an out-of-memory error comes at once."""
    ordered = sorted(rows, key=lambda row: (-len(row.input_ids), row.request_index, row.continuation_indices))
    return [ordered[i : i + batch_size] for i in range(0, len(ordered), batch_size)]


def score_requests(
    model: PreTrainedModel, requests: list[Request], max_length: int, batch_size: int, progress: str | None = None
) -> list[list[Score]]:
    """Scores of every continuation of every request, on every rank (each rank scores every n-th batch).

    `progress`: the label of a progress bar on the main rank, counting its own share of the continuations.
    """
    rows = [row for index, request in enumerate(requests) for row in request_rows(index, request, max_length)]
    state = PartialState()
    batches = batches_by_length(rows, batch_size)[state.process_index :: state.num_processes]
    total = sum(len(row.continuation_indices) for batch in batches for row in batch)
    bar = tqdm(total=total, desc=progress, unit="continuation", disable=not (progress and state.is_main_process))
    mine: list[tuple[int, int, Score]] = []
    with torch.inference_mode(), bar:
        for batch in batches:
            for row, row_scores in zip(batch, score_batch(model, batch)):
                mine += [(row.request_index, i, s) for i, s in zip(row.continuation_indices, row_scores)]
            bar.update(sum(len(row.continuation_indices) for row in batch))
    gathered = gather_object(mine) if state.num_processes > 1 else mine
    results: list[list[Score | None]] = [[None] * len(request.continuations) for request in requests]
    for request_index, continuation_index, score in gathered:
        results[request_index][continuation_index] = score
    return results  # type: ignore[return-value]

