"""Shared fixtures: test-only methods registered through the public API."""
from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

import attnproc
from attnproc.kernels import dense_attention
from attnproc.options import option


class Probe(attnproc.Method):
    """Dense attention that records every site it serves (layout, step, kind) for assertions."""

    name = "probe"
    summary = "Test method: dense attention that records each call's site."

    def __init__(self, config=None):
        super().__init__(config)
        self.sites: list[attnproc.Site] = []

    def attention(self, q, k, v, site, *, attn_mask=None, scale=None):
        self.sites.append(site)
        return dense_attention(q, k, v, attn_mask=attn_mask, scale=scale)


@dataclass
class KnobsConfig(attnproc.Schedule):
    strength: float = option(0.5, low=0.0, high=1.0, help="how strong")
    mode: str = option("a", choices=("a", "b"), help="which mode")
    width: int = option(3, low=1, high=9, help="an odd width")

    def validate(self):
        if self.width % 2 == 0:
            raise ValueError(f"width must be odd, got {self.width}")


class Knobs(attnproc.SparseMethod):
    """A sparse-style method (layout required, schedule honoured) whose 'sparse' path is a scaled dense call."""

    name = "knobs"
    summary = "Test method with options of every kind."
    Config = KnobsConfig

    def __init__(self, config=None):
        super().__init__(config)
        self.sparse_calls = 0

    def sparse_attention(self, q, k, v, site, *, attn_mask=None, scale=None):
        self.sparse_calls += 1
        return dense_attention(q, k, v, attn_mask=attn_mask, scale=scale)


attnproc.register(Probe)
attnproc.register(Knobs)


@pytest.fixture(autouse=True, scope="session")
def _backend_cache(tmp_path_factory):
    """Measured backend choices go to a temporary folder, never the user's cache (kernels/autotune.py)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ATTNPROC_CACHE_DIR", str(tmp_path_factory.mktemp("attnproc-cache")))
        mp.delenv("ATTNPROC_BACKEND", raising=False)
        yield


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield
