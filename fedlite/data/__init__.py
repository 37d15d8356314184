"""Multimodal case data: the manifest format, the synthetic generator, site partitioning, loading."""
