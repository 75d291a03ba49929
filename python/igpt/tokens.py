"""Where the token cache was before it moved to ``igpt.data.cache``: its names, re-exported
(new code imports from ``igpt.data`` or ``igpt.data.cache``)."""

from igpt.data.cache import (
    CHUNK,
    PARTS,
    READ_ERRORS,
    TOKENS_VERSION,
    base_record,
    build_entry,
    cache_key,
    entry_lock,
    palette_hash,
    read_chunk,
    read_entry,
    source_fingerprint,
    spec_key,
)

__all__ = [
    "CHUNK",
    "PARTS",
    "READ_ERRORS",
    "TOKENS_VERSION",
    "base_record",
    "build_entry",
    "cache_key",
    "entry_lock",
    "palette_hash",
    "read_chunk",
    "read_entry",
    "source_fingerprint",
    "spec_key",
]
