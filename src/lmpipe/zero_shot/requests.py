"""Token requests built exactly as lm-evaluation-harness builds them (`_encode_pair`, rolling windows).

Reimplemented rather than imported: `lm_eval` is a heavy optional install, and these few rules are the definition
our numbers must match (`tests/test_lm_eval_agreement.py` checks them against the installed harness).
"""

from __future__ import annotations

from dataclasses import dataclass

from transformers import PreTrainedTokenizerBase


@dataclass(frozen=True)
class Request:
    """One context and the continuations scored after it; each continuation's tokens are scored given the context."""

    context: list[int]
    continuations: list[list[int]]


def encode(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    """The harness's `tok_encode` for a causal model without `add_bos_token`: the tokenizer's own `encode`."""
    return tokenizer.encode(text)


def prefix_token_id(tokenizer: PreTrainedTokenizerBase) -> int:
    """What an empty context conditions on: BOS, else EOS (GPT-2: `<|endoftext|>`)."""
    return tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id


def encode_pair(tokenizer: PreTrainedTokenizerBase, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """Context and continuation ids as the harness splits them.

    Trailing whitespace of the context moves to the continuation; the pair is tokenised whole and cut after the
    context's own token count (even where a token merges across the boundary). An empty context is the
    prefix token (or, when the continuation already starts with it, the continuation's first token).
    """
    if context == "":
        continuation_ids = tokenizer.encode(continuation, add_special_tokens=False)
        prefix = prefix_token_id(tokenizer)
        if continuation_ids[0] != prefix:
            return [prefix], continuation_ids
        return continuation_ids[:1], continuation_ids[1:]
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
    whole = encode(tokenizer, context + continuation)
    context_ids = encode(tokenizer, context)
    return context_ids, whole[len(context_ids) :]


def choice_request(tokenizer: PreTrainedTokenizerBase, context: str, continuations: list[str]) -> Request:
    """One request for a context and its choices; the pairs are encoded one by one, as the harness does.

    The context ids of every pair are the same (the context is tokenised alone), which is what lets one forward
    pass serve every choice.
    """
    pairs = [encode_pair(tokenizer, context, continuation) for continuation in continuations]
    return Request(context=pairs[0][0], continuations=[continuation for _, continuation in pairs])


def rolling_windows(token_ids: list[int], prefix: int, max_length: int, stride: int | None = None) -> list[Request]:
    """The harness's `get_rolling_token_windows` + `make_disjoint_window` as requests: every token scored once.

    The first window predicts the first `max_length` tokens after the prefix token; each later one predicts the
    next `stride` tokens (default `max_length`, the harness's `context_len=1`) with the most context the window
    allows, the last one included.
    """
    stride = max_length if stride is None else stride
    if not token_ids:
        return []
    first = min(max_length, len(token_ids))
    windows = [Request(context=[prefix], continuations=[token_ids[:first]])] if first > 0 else []
    predicted = first
    while predicted < len(token_ids):
        length = min(len(token_ids) - predicted, stride)
        end = predicted + length
        inputs = token_ids[max(0, end - max_length - 1) : end - 1]
        context = inputs[: len(inputs) - (length - 1)]
        windows.append(Request(context=context, continuations=[token_ids[end - length : end]]))
        predicted = end
    return windows
