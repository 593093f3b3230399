"""MER pipeline: ingest, extract, enrich, refine, fuse, report."""

__version__ = "0.1.0"
