"""The argument groups a recipe is made of: one dataclass per concern, plus `TrainingArguments`.

Each field's `help` is what `lmpipe COMMAND --help` prints for that key. A task's groups are named (`model`,
`tokenizer`, `data`, `lora`, `training`) so code reads `recipe.training`, never a position.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from transformers import TrainingArguments
from transformers.activations import ACT2FN
from trl import DPOConfig


@dataclass
class ModelArguments:
    """The network: built from scratch from these sizes, or loaded from `model_name_or_path`."""

    model_name_or_path: str | None = field(
        default=None, metadata={"help": "Pretrained model directory or Hub id; unset builds a new GPT-2."}
    )
    n_layer: int = field(default=4, metadata={"help": "Transformer blocks (from scratch)."})
    n_embd: int = field(default=128, metadata={"help": "Hidden size (from scratch)."})
    n_head: int = field(default=4, metadata={"help": "Attention heads (from scratch)."})
    n_positions: int = field(default=256, metadata={"help": "Maximum sequence length (from scratch)."})
    dropout: float = field(default=0.0, metadata={"help": "Residual, embedding and attention dropout."})
    pad_vocab_to_multiple_of: int = field(
        default=64, metadata={"help": "Round the embedding rows up to a multiple of this (matmul-friendly)."}
    )
    resize_embeddings: bool = field(
        default=False, metadata={"help": "Allow growing a pretrained model's embeddings to fit the tokenizer."}
    )
    attn_implementation: str = field(default="sdpa", metadata={"help": "sdpa or eager."})
    activation_function: str = field(
        default="gelu_pytorch_tanh",
        metadata={
            "help": "MLP activation (from scratch). GPT-2's tanh GELU in one kernel; gelu_new: the same in 6 ops.",
            "choices": sorted(ACT2FN),
        },
    )
    trust_remote_code: bool = field(default=False, metadata={"help": "Run code shipped with a Hub model."})
    chunked_loss: bool = field(
        default=True,
        metadata={"help": "Loss from the hidden states a chunk of tokens at a time, never the full logits; "
                  "false: the model's own (DPO: TRL's fused LM head)."},
    )
    chunked_loss_tokens: int | None = field(
        default=None,
        metadata={"help": "Tokens per loss chunk (default: 128 MiB of float32 logits, less on small machines)."},
    )


@dataclass
class TokenizerArguments:
    """Where the byte-level BPE comes from: a Hub id/directory, vocab+merges files, or trained on the corpus."""

    tokenizer_name_or_path: str | None = field(
        default=None, metadata={"help": "Tokenizer directory or Hub id (default: model_name_or_path)."}
    )
    vocab_file: str | None = field(default=None, metadata={"help": "GPT-2 vocab.json or encoder.json."})
    merges_file: str | None = field(default=None, metadata={"help": "GPT-2 merges.txt or vocab.bpe."})
    train_tokenizer: bool = field(default=False, metadata={"help": "Train a byte-level BPE on the train split."})
    tokenizer_vocab_size: int = field(default=4096, metadata={"help": "Vocabulary size of a trained BPE."})


@dataclass
class DataArguments:
    """The corpus: a Hub dataset, local files, or `builtin:pydoc` (Python's own documentation text)."""

    dataset_name: str | None = field(
        default="builtin:pydoc", metadata={"help": "Hub dataset id, or builtin:pydoc (no download)."}
    )
    dataset_config_name: str | None = field(default=None, metadata={"help": "Hub dataset configuration."})
    train_file: str | None = field(default=None, metadata={"help": "Local .txt/.json/.jsonl/.csv/.parquet."})
    validation_file: str | None = field(default=None, metadata={"help": "Local validation file."})
    text_column: str = field(default="text", metadata={"help": "Column holding the documents."})
    sample_by: str = field(
        default="paragraph",
        metadata={"help": "How a .txt file splits into documents.", "choices": ["line", "paragraph", "document"]},
    )
    validation_split_percentage: float = field(
        default=10.0, metadata={"help": "Without a validation split: the last this-% of documents."}
    )
    block_size: int = field(default=128, metadata={"help": "Tokens per packed training block."})
    max_train_documents: int | None = field(default=None, metadata={"help": "Keep only the first N documents."})
    preprocessing_num_workers: int | None = field(default=None, metadata={"help": "Processes for map()."})
    document_attention: bool = field(
        default=False,
        metadata={"help": "Tokens attend only within their own document of a packed block: position ids restart "
                  "after every EOS (training and evaluation); the saved model stays a plain GPT-2."},
    )
    streaming: bool = field(
        default=False, metadata={"help": "Read, tokenise and pack the train corpus lazily (needs max_steps)."}
    )
    datasets: list[str] | None = field(
        default=None,
        metadata={
            "help": "A weighted mixture instead of train_file/dataset_name: a list of {path, weight, split, config, "
            "text_column} (JSON per source on the command line); weight > 1 repeats documents, < 1 subsamples them; "
            "with streaming, the weights are the sources' probabilities (interleaved, normalised)."
        },
    )
    streaming_validation_documents: int = field(
        default=1000,
        metadata={
            "help": "Streaming, no validation split: hold out the stream's first N documents (of each source of a "
            "mixture)."
        },
    )


@dataclass
class RunTrainingArguments(TrainingArguments):
    """`TrainingArguments` plus the output-directory guard that transformers 5 dropped (run_clm users know the flag)."""

    overwrite_output_dir: bool = field(
        default=False,
        metadata={"help": "Replace another run (a different recipe.yaml) in output_dir; "
                  "the same recipe always resumes."},
    )
    final_evaluation: bool = field(
        default=True,
        metadata={"help": "Evaluate the validation split exactly when training ends; false: no evaluation at all "
                          "(metrics.json then has training figures only), like run_clm without --do_eval."},
    )
    host_memory_reuse: bool = field(
        default=True,
        metadata={"help": "Training on a CPU under Linux: freed memory stays in the process for the next step "
                          "instead of going back to the OS (no page faults on every step's large tensors; RSS stays "
                          "at its peak, a higher one with chunked_loss: false); false: the C library's defaults."},
    )
    optimizer: str = field(
        default="adamw",
        metadata={"help": "adamw: the Trainer's `optim`; muon: torch.optim.Muon on the transformer blocks' weight "
                          "matrices (c_attn as Q, K, V), torch's AdamW (learning_rate, adam_*, weight_decay) on "
                          "embeddings, LayerNorms and biases.", "choices": ["adamw", "muon"]},
    )
    muon_learning_rate: float | None = field(
        default=None,
        metadata={"help": "Muon's peak learning rate (default: learning_rate; updates are scaled to AdamW's RMS, "
                          "adjust_lr_fn match_rms_adamw); the schedule scales it as it scales learning_rate."},
    )
    muon_momentum: float | None = field(default=None, metadata={"help": "Muon's momentum (default: torch's, 0.95)."})
    muon_weight_decay: float | None = field(
        default=None, metadata={"help": "Muon's decoupled weight decay (default: weight_decay)."}
    )
    muon_nesterov: bool | None = field(
        default=None, metadata={"help": "Muon's Nesterov momentum (default: torch's, true)."}
    )
    muon_ns_steps: int | None = field(
        default=None, metadata={"help": "Muon's Newton-Schulz iterations per step (default: torch's, 5)."}
    )
    decay_fraction: float | None = field(
        default=None,
        metadata={"help": "lr_scheduler_type warmup_stable_decay: the share of training steps spent decaying "
                          "(rounded to whole steps); its stable phase is what warmup and decay leave."},
    )
    min_lr_ratio: float | None = field(
        default=None,
        metadata={"help": "lr_scheduler_type warmup_stable_decay: the final learning rate over the peak one "
                          "(default: transformers', 0); warmup also starts from it."},
    )
    decay_type: str | None = field(
        default=None,
        metadata={"help": "lr_scheduler_type warmup_stable_decay: the decay's shape (default: transformers', "
                          "cosine).", "choices": ["linear", "cosine", "1-sqrt"]},
    )
    zero_shot_tasks: list[str] | None = field(
        default=None,
        metadata={
            "help": "`lmpipe evaluate` tasks scored at every evaluation, exactly as that command scores them: a list "
            "of {task, data, name (default: the data file's stem), and any other of its flags: limit, batch_size, "
            "split, ...} (JSON per task on the command line); to the logs, TensorBoard, metrics.json, loss.png."
        },
    )


PRETRAIN_GROUPS = {
    "model": ModelArguments, "tokenizer": TokenizerArguments, "data": DataArguments, "training": RunTrainingArguments,
}


@dataclass
class QAArguments:
    """Question-answer pairs for fine-tuning: where they are, how a prompt is written, how rows are batched."""

    dataset_name: str | None = field(default=None, metadata={"help": "Hub dataset id."})
    dataset_config_name: str | None = field(default=None, metadata={"help": "Hub dataset configuration."})
    train_file: str | None = field(default=None, metadata={"help": "Local .json/.jsonl/.csv/.parquet."})
    validation_file: str | None = field(default=None, metadata={"help": "Local validation file."})
    question_column: str = field(default="question", metadata={"help": "Column holding the question."})
    answer_column: str = field(
        default="answer", metadata={"help": "Column holding the answer or a list of accepted answers."}
    )
    context_column: str | None = field(default=None, metadata={"help": "Optional column holding a passage."})
    prompt_template: str | None = field(
        default=None,
        metadata={"help": "Python format string with {question} (and {context}); "
                  "default 'Question: {question}\\nAnswer:'."},
    )
    answer_prefix: str = field(default=" ", metadata={"help": "Text put before the answer (GPT-2 BPE: a space)."})
    max_length: int = field(
        default=128, metadata={"help": "Tokens per example: prompt (left-truncated) + answer + EOS."}
    )
    validation_split_percentage: float = field(
        default=10.0, metadata={"help": "Without a validation split: the last this-% of examples."}
    )
    batching: str = field(
        default="padded",
        metadata={"help": "padded: dynamic padding per batch; packed: padding-free rows.",
                  "choices": ["padded", "packed"]},
    )
    generation_max_new_tokens: int = field(default=16, metadata={"help": "Greedy answer length for exact match / F1."})
    preprocessing_num_workers: int | None = field(default=None, metadata={"help": "Processes for map()."})
    messages_column: str | None = field(
        default=None,
        metadata={"help": "Column of conversations ([{role, content}, ...]) to learn instead of question/answer."},
    )
    chat_template: str | None = field(
        default=None,
        metadata={"help": "Jinja chat template (text or a .jinja file); "
                  "default: the tokenizer's, else lmpipe's plain one."},
    )
    learn_assistant_turns: str = field(
        default="all",
        metadata={"help": "Assistant turns whose content + end marker are learned.", "choices": ["all", "last"]},
    )
    max_dropped_share: float = field(
        default=0.1,
        metadata={"help": "Stop when more than this share of a file's conversations has no learned token left."},
    )
    datasets: list[str] | None = field(
        default=None,
        metadata={
            "help": "A weighted mixture instead of train_file/dataset_name: a list of {path, weight, split, config, "
            "and column keys} (JSON per source on the command line); weight > 1 repeats rows, < 1 subsamples them."
        },
    )


@dataclass
class LoraArguments:
    """Low-rank adapters through peft instead of full fine-tuning."""

    use_lora: bool = field(default=False, metadata={"help": "Train LoRA adapters; the base weights stay frozen."})
    lora_r: int = field(default=8, metadata={"help": "Adapter rank."})
    lora_alpha: float = field(default=16.0, metadata={"help": "Adapter scale numerator (scale = alpha / r)."})
    lora_dropout: float = field(default=0.05, metadata={"help": "Dropout on the adapter input."})
    lora_target_modules: list[str] = field(
        default_factory=lambda: ["c_attn", "c_proj", "c_fc"],
        metadata={"help": "Module names to adapt (GPT-2: attention c_attn/c_proj, MLP c_fc/c_proj)."},
    )
    merge_lora: bool = field(
        default=False, metadata={"help": "Also save the adapter merged into a plain model under OUTPUT_DIR/merged."}
    )


FINETUNE_QA_GROUPS = {
    "model": ModelArguments, "tokenizer": TokenizerArguments, "data": QAArguments, "lora": LoraArguments,
    "training": RunTrainingArguments,
}


@dataclass
class PreferenceArguments:
    """Preference pairs for DPO: a prompt and a chosen and a rejected answer, as text or as conversations."""

    dataset_name: str | None = field(default=None, metadata={"help": "Hub dataset id."})
    dataset_config_name: str | None = field(default=None, metadata={"help": "Hub dataset configuration."})
    train_file: str | None = field(default=None, metadata={"help": "Local .json/.jsonl/.csv/.parquet."})
    validation_file: str | None = field(default=None, metadata={"help": "Local validation file."})
    prompt_column: str = field(
        default="prompt",
        metadata={"help": "Column holding the prompt: text, or the conversation so far ([{role, content}, ...])."},
    )
    chosen_column: str = field(
        default="chosen",
        metadata={"help": "Column holding the preferred answer: text, or one assistant turn [{role, content}]."},
    )
    rejected_column: str = field(
        default="rejected", metadata={"help": "Column holding the dispreferred answer, shaped like the chosen one."}
    )
    max_length: int = field(
        default=128,
        metadata={"help": "Tokens per sequence: prompt (left-truncated) + the longer answer + its end marker."},
    )
    validation_split_percentage: float = field(
        default=10.0, metadata={"help": "Without a validation split: the last this-% of pairs."}
    )
    chat_template: str | None = field(
        default=None,
        metadata={"help": "Jinja chat template for conversation pairs (text or a .jinja file); "
                  "default: the tokenizer's, else lmpipe's plain one."},
    )
    max_dropped_share: float = field(
        default=0.1,
        metadata={"help": "Stop when more than this share of a file's pairs has an answer too long for max_length."},
    )
    preprocessing_num_workers: int | None = field(default=None, metadata={"help": "Processes for map()."})
    datasets: list[str] | None = field(
        default=None,
        metadata={
            "help": "A weighted mixture instead of train_file/dataset_name: a list of {path, weight, split, config, "
            "and column keys} (JSON per source on the command line); weight > 1 repeats pairs, < 1 subsamples them."
        },
    )


@dataclass
class DPOTrainingArguments(RunTrainingArguments, DPOConfig):
    """`TrainingArguments` with lmpipe's keys and TRL's `DPOConfig` keys (beta, loss_type, ...); TRL's keys that
    lmpipe sets itself are not recipe keys (`init=False`). Defaults are TrainingArguments', not TRL's."""

    max_length: int | None = field(default=None, init=False)  # the data's max_length: lmpipe cuts the rows
    trust_remote_code: bool = field(default=False, init=False)  # the model's trust_remote_code
    truncation_mode: str = field(default="keep_start", init=False)  # rows arrive fitting: prompt cut from the left
    padding_free: bool = field(default=False, init=False)  # TRL 1.16 ignores it
    dataset_num_proc: int | None = field(default=None, init=False)  # lmpipe tokenises: preprocessing_num_workers
    model_init_kwargs: dict | str | None = field(default=None, init=False)  # lmpipe loads the model
    pad_token: str | None = field(default=None, init=False)  # deprecated by TRL; GPT-2 pads with EOS by position


DPO_GROUPS = {
    "model": ModelArguments, "tokenizer": TokenizerArguments, "data": PreferenceArguments, "lora": LoraArguments,
    "training": DPOTrainingArguments,
}
# The training tasks a recipe's `task` key names, and their groups.
TASKS = {"pretrain": PRETRAIN_GROUPS, "qa": FINETUNE_QA_GROUPS, "dpo": DPO_GROUPS}
