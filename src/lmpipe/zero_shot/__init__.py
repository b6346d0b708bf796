"""Zero-shot benchmarks scored as lm-evaluation-harness scores them: multiple choice, last word, rolling perplexity.

requests (text -> token requests, the harness's split) -> scoring (one forward per context) -> tasks (metrics)
-> report (results.json, samples.jsonl, table); data reads and adapts the rows; run wires them together.
"""
