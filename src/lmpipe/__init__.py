"""lmpipe: pretrain and fine-tune GPT-2 style causal language models on the Hugging Face stack."""

__version__ = "0.1.0"
