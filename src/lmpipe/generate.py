"""Text continuations with `model.generate`: greedy or sampled (temperature, top-k, top-p), stopping at EOS.

Used by `pipelines/generate.py` and by the QA evaluation, so a question is answered the same way in both.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch.nn.utils.rnn import pad_sequence
from transformers import (
    GenerationConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    StoppingCriteria,
    StoppingCriteriaList,
)

from lmpipe.config.arguments import TokenizerArguments
from lmpipe.config.rules import check_values
from lmpipe.data.chat import ChatFormat, chat_format, resolve_chat_template
from lmpipe.errors import LmpipeError
from lmpipe.model.build import load_pretrained
from lmpipe.model.checks import check_model_files, check_vocab
from lmpipe.model.tokenizer import load_tokenizer, plain_text_ids
from lmpipe.run.checkpoints import verified_model_dir

# The sampling knobs and the values that switch them off.
SAMPLING_OFF = {"temperature": 1.0, "top_k": 0, "top_p": 1.0}


@dataclass
class GenerateArguments:
    """What `pipelines/generate.py` continues: a saved model (safetensors) and one prompt."""

    # Optional to the parser (a recipe is parsed alone first); generate_from_pretrained requires them.
    model_name_or_path: str | None = field(default=None, metadata={"help": "Saved model directory or Hub id."})
    prompt: str | None = field(default=None, metadata={"help": "Text to continue."})
    chat: list[str] | None = field(
        default=None,
        metadata={"help": "User messages instead of --prompt: each is answered in turn, rendered with the model's "
                  "saved chat template (lmpipe's plain one if it has none); "
                  "a reply stops at the assistant turn's end."},
    )
    system: str | None = field(default=None, metadata={"help": "A system message before the --chat turns."})


@dataclass
class GenerationSettings:
    """How to continue a prompt; greedy unless `do_sample` (the sampling knobs are refused without it)."""

    max_new_tokens: int = field(default=32, metadata={"help": "Tokens to generate at most (fewer at EOS)."})
    do_sample: bool = field(default=False, metadata={"help": "Sample from the distribution (default: greedy)."})
    temperature: float = field(default=1.0, metadata={"help": "Sampling temperature, > 0 (needs --do_sample)."})
    top_k: int = field(default=0, metadata={"help": "Sample among the k likeliest; 0 = off (needs --do_sample)."})
    top_p: float = field(
        default=1.0, metadata={"help": "Nucleus sampling mass in (0, 1]; 1 = off (needs --do_sample)."}
    )
    seed: int = field(default=0, metadata={"help": "Seed of the sampling (the same seed gives the same text)."})
    greedy: bool = field(default=False, metadata={"help": "Greedy decoding (the default); contradicts --do_sample."})

    def check(self) -> None:
        """Raise LmpipeError on a value `generate` would reject or silently ignore (ranges: `config.rules`)."""
        check_values(self)
        if self.greedy and self.do_sample:
            raise LmpipeError("--greedy and --do_sample contradict each other: choose one")
        if self.do_sample and not self.temperature > 0:
            raise LmpipeError(f"temperature must be > 0 when sampling, got {self.temperature}")
        ignored = [f"{name}={getattr(self, name)}" for name, off in SAMPLING_OFF.items() if getattr(self, name) != off]
        if ignored and not self.do_sample:
            raise LmpipeError(f"sampling settings without --do_sample (greedy ignores them): {', '.join(ignored)}")


def generation_config(
    settings: GenerationSettings,
    tokenizer: PreTrainedTokenizerBase,
    model_vocab: int,
    stop_ids: list[int] | None = None,
) -> GenerationConfig:
    """The library's config: stop at EOS, pad with EOS (GPT-2 has no pad token), cache on (training turns it off).

    Token ids from len(tokenizer) up to the model's padded vocabulary have no text: they are suppressed.
    """
    sampling = {name: getattr(settings, name) for name in SAMPLING_OFF} if settings.do_sample else {}
    unused_rows = list(range(len(tokenizer), model_vocab))
    return GenerationConfig(
        max_new_tokens=settings.max_new_tokens,
        do_sample=settings.do_sample,
        eos_token_id=stop_ids or tokenizer.eos_token_id,
        pad_token_id=tokenizer.eos_token_id,
        use_cache=True,
        suppress_tokens=unused_rows or None,
        **sampling,
    )


def check_prompt_ids(encoded: list[list[int]], max_new_tokens: int, max_positions: int | None) -> None:
    """An empty prompt, or one with no room for the new tokens in the model's positions, is an error."""
    for row, ids in enumerate(encoded):
        if not ids:
            raise LmpipeError(f"prompt {row}: empty (nothing to continue)")
        if max_positions and len(ids) + max_new_tokens > max_positions:
            raise LmpipeError(
                f"prompt {row}: {len(ids)} tokens + max_new_tokens={max_new_tokens} exceed the model's "
                f"{max_positions} positions"
            )


def left_padded(encoded: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask) padded on the left with `pad_id`; the mask marks padding by position.

    Not `tokenizer.pad`: it needs a pad token, and setting one would change the caller's tokenizer.
    """
    rows = [torch.tensor(ids) for ids in encoded]
    input_ids = pad_sequence(rows, batch_first=True, padding_value=pad_id, padding_side="left")
    mask = pad_sequence([torch.ones_like(r) for r in rows], batch_first=True, padding_value=0, padding_side="left")
    return input_ids, mask


class StopAfterText(StoppingCriteria):
    """Stop a row once its generated text contains `text`. Our own: transformers' `stop_strings` also match text
    that begins in the prompt (a header ending in a newline and an end marker starting with one would stop at once)."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, text: str, prompt_width: int):
        self.tokenizer, self.text, self.prompt_width = tokenizer, text, prompt_width

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs) -> torch.BoolTensor:
        generated = self.tokenizer.batch_decode(input_ids[:, self.prompt_width :], skip_special_tokens=False)
        return torch.tensor([self.text in text for text in generated], dtype=torch.bool, device=input_ids.device)


def continuation_text(
    tokenizer: PreTrainedTokenizerBase, new_ids: torch.Tensor, stop_ids: list[int] | None = None,
    stop_text: str | None = None,
) -> str:
    """The generated ids up to (not including) the first EOS (or stop id), and the text before `stop_text`; later
    positions are EOS padding."""
    ids = new_ids.tolist()
    stops = set(stop_ids or [tokenizer.eos_token_id])
    ids = ids[: next((i for i, token in enumerate(ids) if token in stops), len(ids))]
    text = tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)
    return text.split(stop_text, 1)[0] if stop_text else text


def generate_completions(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[str],
    settings: GenerationSettings,
    batch_size: int = 16,
) -> list[str]:
    """The continuation of each prompt text (without the prompt), in the order given."""
    encoded = plain_text_ids(tokenizer, list(prompts))  # a prompt quoting <|endoftext|> is text
    return generate_from_ids(model, tokenizer, encoded, settings, batch_size)


@torch.no_grad()
def generate_from_ids(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    encoded: list[list[int]],
    settings: GenerationSettings,
    batch_size: int = 16,
    stop_ids: list[int] | None = None,
    stop_text: str | None = None,
) -> list[str]:
    """The continuation of each prompt, given as token ids (e.g. exactly the ids a QA row was trained on).

    Prompts are batched by length and padded on the left with an attention mask, so every row's last prompt token
    sits at the end and batched greedy output equals one-at-a-time output. Sampling is seeded with `settings.seed`
    inside `fork_rng`, so the global RNG is left as it was (a Trainer's data order is not disturbed).
    """
    settings.check()
    if batch_size < 1:
        raise LmpipeError(f"batch_size must be >= 1, got {batch_size}")
    check_prompt_ids(encoded, settings.max_new_tokens, getattr(model.config, "max_position_embeddings", None))
    config = generation_config(settings, tokenizer, model.config.vocab_size, stop_ids)
    order = sorted(range(len(encoded)), key=lambda row: len(encoded[row]))  # similar lengths share a batch
    completions: list[str] = [""] * len(encoded)
    was_training = model.training
    model.eval()
    try:
        with torch.random.fork_rng(devices=[model.device] if model.device.type == "cuda" else []):
            torch.manual_seed(settings.seed)
            for start in range(0, len(order), batch_size):
                rows = order[start : start + batch_size]
                input_ids, attention_mask = left_padded([encoded[row] for row in rows], tokenizer.eos_token_id)
                output = model.generate(
                    input_ids=input_ids.to(model.device),
                    attention_mask=attention_mask.to(model.device),
                    generation_config=config,
                    stopping_criteria=StoppingCriteriaList(
                        [StopAfterText(tokenizer, stop_text, input_ids.shape[1])] if stop_text else []
                    ),
                )
                for row, new_ids in zip(rows, output[:, input_ids.shape[1] :]):
                    completions[row] = continuation_text(tokenizer, new_ids, stop_ids, stop_text)
    finally:
        model.train(was_training)
    return completions


def generate_from_pretrained(args: GenerateArguments, settings: GenerationSettings) -> str:
    """The continuation of `args.prompt` by a saved model with its own tokenizer; settings checked before loading."""
    for name in ("model_name_or_path", "prompt"):
        if getattr(args, name) is None:
            raise LmpipeError(f"--{name} is required")
    settings.check()
    model, tokenizer = load_for_generation(args.model_name_or_path)
    return generate_completions(model, tokenizer, [args.prompt], settings, batch_size=1)[0]


def load_for_generation(name: str) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """A saved model and its own tokenizer, its files checked first (a model that fails verification is replaced by
    its newest checkpoint that passes) and its vocabulary against the embeddings."""
    name = verified_model_dir(name)
    check_model_files(name, ("config", "weights", "tokenizer"))
    model = load_pretrained(name)
    tokenizer = load_tokenizer(TokenizerArguments(), name)
    check_vocab(model, tokenizer, allow_resize=False, name=name)
    return model, tokenizer


def chat_stops(tokenizer: PreTrainedTokenizerBase, fmt: ChatFormat) -> tuple[list[int], str | None]:
    """Where a reply ends: EOS, and the assistant end marker's first token when that is a special token (ChatML's
    <|im_end|>), else the end marker's text once the reply contains it (a plain-text template's "\n### End")."""
    eos, end_ids, end_text = tokenizer.eos_token_id, fmt.ends["assistant"], fmt.texts["assistant"][1]
    if end_ids and end_ids[0] in set(tokenizer.all_special_ids):
        return sorted({eos, end_ids[0]}), None
    return [eos], end_text or None


def chat_from_pretrained(args: GenerateArguments, settings: GenerationSettings) -> list[dict[str, str]]:
    """Answer each `--chat` user message in turn; returns the conversation (system, user and assistant turns)."""
    if args.model_name_or_path is None:
        raise LmpipeError("--model_name_or_path is required")
    if args.prompt is not None:
        raise LmpipeError("--prompt and --chat exclude each other: continue a text or answer messages")
    settings.check()
    model, tokenizer = load_for_generation(args.model_name_or_path)
    fmt = chat_format(tokenizer, resolve_chat_template(None, tokenizer))
    stop_ids, stop_text = chat_stops(tokenizer, fmt)
    messages = [{"role": "system", "content": args.system}] if args.system is not None else []
    for text in args.chat:
        messages.append({"role": "user", "content": text})
        prompt_ids = fmt.generation_prompt_ids(tokenizer, messages)
        reply = generate_from_ids(model, tokenizer, [prompt_ids], settings, 1, stop_ids, stop_text)[0]
        messages.append({"role": "assistant", "content": reply})
    return messages
