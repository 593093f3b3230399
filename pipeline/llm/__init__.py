"""LLM backends and their answers cache, subtitle enrichment, and the scores of zero-shot labels."""
