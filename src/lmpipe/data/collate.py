"""Collators for packed causal-LM blocks."""

from __future__ import annotations

import numpy as np
import torch


def collate_blocks(features: list[dict]) -> dict[str, torch.Tensor]:
    """Stack equal-length blocks; labels are the inputs unshifted (the model shifts inside).

    Not DataCollatorForLanguageModeling: it masks every label equal to pad_token_id, and GPT-2 pads with EOS.
    No attention mask: blocks carry no padding, and without one SDPA takes its fast causal path.
    """
    input_ids = torch.from_numpy(np.stack([np.asarray(f["input_ids"]) for f in features]).astype(np.int64))
    return {"input_ids": input_ids, "labels": input_ids.clone()}
