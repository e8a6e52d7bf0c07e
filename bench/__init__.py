"""attn_fast benchmarks: ``python -m bench`` (``make bench``)."""
