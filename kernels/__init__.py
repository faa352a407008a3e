"""Attention kernels: dense oracle and block-sparse attention behind one function each.

Imports torch (and triton, lazily) only: kernels know nothing of methods or pipelines.
"""
from .blockmask import (
    block_mask_to_index,
    block_to_token_mask,
    index_to_block_mask,
    normalize_block_size,
    num_blocks,
    pad_to_blocks,
    token_to_block_mask,
)
from .autotune import AutotuneCacheWarning, BackendTuner
from .dense import dense_attention
from .merge import linear_attention, merge_attention, resolve_feature_map
from .sparse import (
    AUTO_FLEX_MIN_PAIRS,
    BACKENDS,
    BackendFallbackWarning,
    block_sparse_attention,
    select_backend,
)
from .record import record_kernel_calls

__all__ = [
    "dense_attention",
    "block_sparse_attention",
    "select_backend",
    "BACKENDS",
    "AUTO_FLEX_MIN_PAIRS",
    "BackendFallbackWarning",
    "BackendTuner",
    "AutotuneCacheWarning",
    "record_kernel_calls",
    "block_mask_to_index",
    "index_to_block_mask",
    "token_to_block_mask",
    "block_to_token_mask",
    "normalize_block_size",
    "num_blocks",
    "pad_to_blocks",
    "merge_attention",
    "linear_attention",
    "resolve_feature_map",
]
