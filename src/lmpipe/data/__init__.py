"""Data: sources (what to read), packing (causal-LM blocks), collate (batches)."""
