"""Where the loss is: the reference gather cross-entropy and `IGNORE_INDEX`, the chunked linear + cross-entropy, how
a model's forward is made to use it, and the token-weighted train loss the Trainer logs.

May import `lmpipe.errors` and `lmpipe.config` only: the model, data, training and evaluation code all use it.
"""
