"""The network and its vocabulary: build a GPT-2 or load one from safetensors, check a saved model loads whole, the
byte-level BPE tokenizer, LoRA adapters, and finding NaN or inf in weights.

May import `lmpipe.errors`, `lmpipe.config` and `lmpipe.loss`.
"""
