"""The examples a run trains and evaluates on: sources (local files, Hub datasets, Python's docs), packed causal-LM
blocks (in memory or streamed), QA prompt/answer rows and chat conversations with -100 on what is not learned,
weighted mixtures, and the collators that batch them.

May import `lmpipe.errors`, `lmpipe.config`, `lmpipe.loss` (IGNORE_INDEX) and `lmpipe.model` (the tokenizer).
"""
