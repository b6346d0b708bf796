"""A run's lifecycle around the Trainer: the start of every training run (`session`: check, hold the output
directory, a finished run or train), the output-dir lock, the run's files, checkpoints and what may resume them
(`identity`), saving on a signal, a full disk, several processes and their launcher, the model card and the Hub push.

May import `lmpipe.errors`, `lmpipe.config`, `lmpipe.loss`, `lmpipe.model` and `lmpipe.data`, never the Trainer
code in `lmpipe.training` (which calls it) or the commands.
"""
