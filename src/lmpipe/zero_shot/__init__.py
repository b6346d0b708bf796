"""Zero-shot benchmarks scored as lm-evaluation-harness scores them: multiple choice, last word, rolling perplexity
(and the `perplexity` command, the rolling task under its older flags).

requests (text -> token requests, the harness's split) -> scoring (one forward per context) -> tasks (metrics)
-> report (results.json, samples.jsonl, table); data reads and adapts the rows; run wires them together. May import
`lmpipe.errors`, `config`, `loss`, `model`, `data` and `run`; training may call it, so it never imports training.
"""
