"""Chained content hashes of full KV blocks, the keys of the prefix cache.

Block ``i`` of a sequence is identified by a hash of block ``i - 1``'s hash
and its own token ids, so equal hashes mean equal token prefixes: the K/V of
a block depends on every token before it. The chain starts from a root that
hashes ``extra_key``, for anything besides the tokens that changes K/V (none
today: the cache belongs to one model). SHA-256 because a collision would
silently hand one request another's K/V.
"""

from __future__ import annotations

import hashlib
from array import array
from collections.abc import Sequence


def root_hash(extra_key: bytes = b"") -> bytes:
    """The parent hash of a sequence's first block."""
    return hashlib.sha256(b"chitu-kv-root\0" + extra_key).digest()


def block_hash(parent_hash: bytes, token_ids: Sequence[int]) -> bytes:
    """The 32-byte key of a full block holding ``token_ids`` after the block ``parent_hash``."""
    digest = hashlib.sha256(parent_hash)
    digest.update(array("q", token_ids).tobytes())
    return digest.digest()
