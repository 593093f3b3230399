"""Ingest (MER2025 layout -> manifest), corpus adapters (`mer convert`), group-aware splits, media decoding."""
