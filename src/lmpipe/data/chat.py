"""Conversations for causal-LM fine-tuning: every turn tokenised apart, the loss on assistant contents + end markers.

The chat template (Jinja, as transformers stores it) is asked once per role how it renders a lone turn: the text
before the content (header) and after it (end marker). A row is then header ids + content ids + end ids per turn,
so what is learned is known by position, never found by searching the rendered text. Each row's full render is
still compared with its turn-by-turn text, so a template that does not render turn by turn is refused by name.
Headers and end markers are template text (special tokens recognised); contents are plain text, so a message
quoting `<|endoftext|>` or the assistant header cannot end or open a turn.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from datasets import Dataset, DatasetDict
from jinja2 import TemplateError
from transformers import PreTrainedTokenizerBase

from lmpipe.config.arguments import QAArguments
from lmpipe.data.fingerprint import map_tokenized
from lmpipe.data.qa import COUNTING_COLUMNS, QACounts, counts_of
from lmpipe.errors import LmpipeError
from lmpipe.loss.reference import IGNORE_INDEX
from lmpipe.model.tokenizer import plain_text_ids

ROLES = ("system", "user", "assistant")
# GPT-2 has no chat template: plain-text role markers, EOS after every assistant turn, no new tokens. Each header
# ends in a newline, so a content's first word is tokenised as at the start of a line (no lone space token).
DEFAULT_CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{%- if message['role'] == 'system' %}{{ 'System:\\n' + message['content'] + '\\n\\n' }}"
    "{%- elif message['role'] == 'user' %}{{ 'User:\\n' + message['content'] + '\\n\\n' }}"
    "{%- elif message['role'] == 'assistant' %}{{ 'Assistant:\\n' + message['content'] + eos_token }}"
    "{%- else %}{{ raise_exception('unknown role: ' + message['role']) }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{ 'Assistant:\\n' }}{%- endif %}"
)
PROBE = "\ue000"  # a private-use character: stands for the content when asking the template where it goes


def resolve_chat_template(recipe_template: str | None, tokenizer: PreTrainedTokenizerBase) -> str:
    """The recipe's template (its text, or a `.jinja` file), else the tokenizer's own, else lmpipe's default."""
    if recipe_template:
        if recipe_template.endswith(".jinja"):
            path = Path(recipe_template)
            if not path.is_file():
                raise LmpipeError(f"chat_template: {recipe_template}: file not found")
            return path.read_text(encoding="utf-8")
        return recipe_template
    own = tokenizer.chat_template
    if isinstance(own, dict):  # several named templates: transformers' convention is "default"
        own = own.get("default")
    return own or DEFAULT_CHAT_TEMPLATE


def render(tokenizer: PreTrainedTokenizerBase, template: str, conversations: list[list[dict]], **options) -> list[str]:
    """Each conversation rendered to text by transformers' Jinja environment (special-token names available)."""
    try:
        return tokenizer.apply_chat_template(conversations, chat_template=template, tokenize=False, **options)
    except TemplateError as e:
        raise LmpipeError(f"chat_template: {str(e).strip().splitlines()[0]}") from None


@dataclass(frozen=True)
class ChatFormat:
    """Per role, the header and end-marker text a lone turn renders around its content, and their ids."""

    template: str
    texts: dict[str, tuple[str, str]]
    headers: dict[str, list[int]]
    ends: dict[str, list[int]]

    def turn_text(self, role: str, content: str) -> str:
        header, end = self.texts[role]
        return header + content + end

    def generation_prompt_ids(self, tokenizer: PreTrainedTokenizerBase, messages: list[dict]) -> list[int]:
        """The ids of `messages` turn by turn, then the assistant header: what a chat model continues."""
        ids = []
        contents = plain_text_ids(tokenizer, [m["content"] for m in messages])
        for role, content in zip((m["role"] for m in messages), contents):
            ids += self.headers[role] + content + self.ends[role]
        return ids + self.headers["assistant"]


def template_ids(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    """Template text (headers, end markers): its special tokens are real control tokens."""
    return tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"] if text else []


def chat_format(tokenizer: PreTrainedTokenizerBase, template: str) -> ChatFormat:
    """Ask the template how it renders a lone turn of each role; a role it cannot render alone is left out."""
    texts = {}
    for role in ROLES:
        try:
            (text,) = render(tokenizer, template, [[{"role": role, "content": PROBE}]])
        except LmpipeError:
            continue  # e.g. a template that refuses a lone system turn: rows using the role are named later
        if text.count(PROBE) != 1:
            raise LmpipeError(f"chat_template: a {role} turn must show its content exactly once")
        header, end = text.split(PROBE)
        texts[role] = (header, end)
    if "assistant" not in texts:
        raise LmpipeError("chat_template: cannot render a lone assistant turn")
    return ChatFormat(
        template=template,
        texts=texts,
        headers={role: template_ids(tokenizer, header) for role, (header, _) in texts.items()},
        ends={role: template_ids(tokenizer, end) for role, (_, end) in texts.items()},
    )


def check_messages_column(corpus: DatasetDict, column: str, source: str) -> None:
    """The conversations column exists in every split (its rows are checked one by one as they are tokenised)."""
    for name, split in corpus.items():
        if column not in split.column_names:
            raise LmpipeError(f"{source} ({name}): no column '{column}'; columns are {', '.join(split.column_names)}")


def check_conversation(value, column: str, row: str, fmt: ChatFormat) -> list[tuple[str, str]]:
    """(role, content) of each turn; any malformed or empty (whitespace-only) turn is one error naming the row and
    turn."""
    if not isinstance(value, list):
        raise LmpipeError(f"{row}: column '{column}' is {type(value).__name__}, not a list of turns")
    if not value:
        raise LmpipeError(f"{row}: the conversation is empty")
    turns = []
    for number, turn in enumerate(value, start=1):
        if not isinstance(turn, dict) or "role" not in turn:
            raise LmpipeError(f"{row}: turn {number} is not a {{role, content}} mapping")
        role, content = turn["role"], turn.get("content")
        if role not in ROLES:
            raise LmpipeError(f"{row}: turn {number} has role {role!r}; roles are {', '.join(ROLES)}")
        if role not in fmt.texts:
            raise LmpipeError(f"{row}: turn {number}: the chat template cannot render a lone {role} turn")
        if not isinstance(content, str):
            raise LmpipeError(f"{row}: turn {number} ({role}) content is {type(content).__name__}, not text")
        if not content.strip():  # the rule for empty content, as for QA: an empty answer would teach a bare EOS
            raise LmpipeError(f"{row}: turn {number} ({role}) content is empty")
        turns.append((role, content))
    if not any(role == "assistant" for role, _ in turns):
        raise LmpipeError(f"{row}: no assistant turn (nothing to learn)")
    return turns


def learned_turns(roles: list[str], learn: str) -> set[int]:
    """Indices of the assistant turns whose content + end marker are learned: all, or only the last."""
    assistant = [i for i, role in enumerate(roles) if role == "assistant"]
    return set(assistant[-1:] if learn == "last" else assistant)


def conversation_example(
    roles: list[str], contents: list[list[int]], fmt: ChatFormat, learn: str, max_length: int
) -> tuple[list[int], list[int], bool] | None:
    """(input_ids, labels, truncated) of one conversation, or None when no learned token fits `max_length`.

    Too long: whole turns are cut from the left, a leading system message kept, so that the kept part starts at a
    user turn (an answer without its question teaches nothing). The longest such suffix that fits is kept.
    """
    learned = learned_turns(roles, learn)
    pieces = []
    for index, (role, content) in enumerate(zip(roles, contents)):
        header, end = fmt.headers[role], fmt.ends[role]
        target = content + end
        labels = target if index in learned else [IGNORE_INDEX] * len(target)
        pieces.append((header + target, [IGNORE_INDEX] * len(header) + labels))
    first = 1 if roles[0] == "system" else 0
    starts = [first] + [i for i in range(first + 1, len(roles)) if roles[i] == "user"]
    for start in starts:
        kept = pieces[:first] + pieces[start:]
        if sum(len(ids) for ids, _ in kept) > max_length:
            continue
        labels = [label for _, piece_labels in kept for label in piece_labels]
        if all(label == IGNORE_INDEX for label in labels):
            return None  # a later start keeps even less
        return [i for ids, _ in kept for i in ids], labels, start > first
    return None


def tokenize_conversations(
    split: Dataset, tokenizer: PreTrainedTokenizerBase, qa: QAArguments, fmt: ChatFormat, source: str
) -> tuple[Dataset, QACounts]:
    """Rows of `input_ids` and `labels` (-100 but on learned assistant turns) and `COUNTING_COLUMNS`, with kept /
    truncated / dropped counts.

    A row with no learned token is dropped and counted; more than `max_dropped_share` dropped stops the run.
    """
    column = qa.messages_column

    def encode(batch, indices):
        rows = [f"{source} row {index + 1}" for index in indices]
        conversations = [check_conversation(value, column, row, fmt) for value, row in zip(batch[column], rows)]
        messages = [[{"role": role, "content": content} for role, content in turns] for turns in conversations]
        rendered = render(tokenizer, fmt.template, messages)
        for row, turns, text in zip(rows, conversations, rendered):
            if text != "".join(fmt.turn_text(role, content) for role, content in turns):
                raise LmpipeError(
                    f"{row}: the chat template does not render this conversation as its turns one after another"
                    " (header + content + end marker each); lmpipe learns turn by turn and needs such a template"
                )
        content_ids = iter(plain_text_ids(tokenizer, [content for turns in conversations for _, content in turns]))
        out = {key: [] for key in ("input_ids", "labels", *COUNTING_COLUMNS)}
        for index, turns in zip(indices, conversations):
            roles = [role for role, _ in turns]
            contents = [next(content_ids) for _ in turns]
            example = conversation_example(roles, contents, fmt, qa.learn_assistant_turns, qa.max_length)
            if example is not None:
                for key, value in zip(out, (*example, index)):
                    out[key].append(value)
        return out

    encoded = map_tokenized(
        split, encode, tokenizer, qa.preprocessing_num_workers, "Tokenising conversations", __file__, fmt, repr(qa)
    )
    dropped = len(split) - len(encoded)
    if dropped > qa.max_dropped_share * len(split) or len(encoded) == 0:
        raise LmpipeError(
            f"{source}: {dropped} of {len(split)} conversations ({dropped / len(split):.1%}) have no learned token "
            f"within max_length={qa.max_length} (max_dropped_share={qa.max_dropped_share}); raise max_length"
        )
    return encoded, counts_of(encoded, dropped)
