"""The Trainer lmpipe runs: its subclass with exact token-weighted evaluation, the callbacks that stop on NaN and log
at checkpoints, the training loop's call and what follows it (final evaluation, saved model, metrics, plot, card),
model FLOP/s, host memory reuse on CPU, and the QA exact-match / F1 scores.

May import every package but the commands: `lmpipe.errors`, `config`, `loss`, `model`, `data`, `run`, `zero_shot`.
"""
