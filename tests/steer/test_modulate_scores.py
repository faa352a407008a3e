"""modulate_scores: the DenseDiffusion formula, exactly, and its properties (hypothesis)."""
import torch
from hypothesis import given, settings, strategies as st

from attnproc.steer.maskmod import modulate_scores


def reference(S, M, strength, area=None):
    """The formula as written: S + c·M⊙(max − S) − c·(1 − M)⊙(S − min), c = strength·(1 − area)."""
    c = torch.as_tensor(strength, dtype=S.dtype)
    if area is not None:
        c = c * (1 - area)[..., None]
    c = c.clamp(0, 1)
    M = M.to(S.dtype)
    rmax, rmin = S.amax(-1, keepdim=True), S.amin(-1, keepdim=True)
    return S + c * M * (rmax - S) - c * (1 - M) * (S - rmin)


shapes = st.tuples(st.integers(1, 3), st.integers(1, 6), st.integers(2, 9))
seeds = st.integers(0, 2**31 - 1)


def draw(shape, seed, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    S = torch.randn(*shape, generator=g, dtype=torch.float64) * scale
    M = torch.rand(shape[-2], shape[-1], generator=g) > 0.5
    return S, M, g


@settings(max_examples=60, deadline=None)
@given(shapes, seeds)
def test_identity_at_strength_zero(shape, seed):
    S, M, g = draw(shape, seed)
    assert torch.equal(modulate_scores(S, M, 0.0), S)
    assert torch.equal(modulate_scores(S, M, 0.7, area=torch.ones(shape[-2], dtype=S.dtype)), S)  # σ = 0


@settings(max_examples=60, deadline=None)
@given(shapes, seeds, st.floats(0, 3), st.booleans())
def test_row_range_preserved(shape, seed, strength, soft):
    S, M, g = draw(shape, seed)
    if soft:
        M = torch.rand(shape[-2], shape[-1], generator=g, dtype=torch.float64)
    area = torch.rand(shape[-2], generator=g, dtype=torch.float64)
    out = modulate_scores(S, M, strength, area=area)
    assert (out >= S.amin(-1, keepdim=True)).all() and (out <= S.amax(-1, keepdim=True)).all()


@settings(max_examples=60, deadline=None)
@given(shapes, seeds, st.floats(0, 1), st.booleans())
def test_matches_direct_formula(shape, seed, strength, with_area):
    S, M, g = draw(shape, seed)
    area = torch.rand(shape[-2], generator=g, dtype=torch.float64) if with_area else None
    torch.testing.assert_close(modulate_scores(S, M, strength, area=area), reference(S, M, strength, area),
                               rtol=0, atol=1e-12)


@settings(max_examples=60, deadline=None)
@given(shapes, seeds, st.lists(st.floats(0, 1), min_size=2, max_size=6))
def test_mass_inside_mask_grows_monotonically(shape, seed, strengths):
    S, M, g = draw(shape, seed)
    M[..., 0] = True  # every row has a key inside and one outside the mask
    M[..., 1] = False
    shares = [(torch.softmax(modulate_scores(S, M, s), -1) * M).sum(-1) for s in sorted(strengths)]
    for lo, hi in zip(shares, shares[1:]):
        assert (hi >= lo - 1e-12).all()


def test_full_strength_hits_the_row_extremes():
    S = torch.tensor([[0.0, 1.0, 2.0, 5.0]])
    M = torch.tensor([[True, False, True, False]])
    assert modulate_scores(S, M, 1.0).tolist() == [[5.0, 0.0, 5.0, 0.0]]
    assert modulate_scores(S, M, 0.5).tolist() == [[2.5, 0.5, 3.5, 2.5]]


def test_masked_entries_stay_masked_and_do_not_set_the_range():
    S = torch.tensor([[float("-inf"), 1.0, 2.0, 3.0]])
    M = torch.tensor([[True, True, False, False]])
    out = modulate_scores(S, M, 1.0)
    assert out[0, 0] == float("-inf")
    assert out[0, 1:].tolist() == [3.0, 1.0, 1.0]


def test_per_query_strength_and_area_broadcast():
    S = torch.randn(2, 4, 6, dtype=torch.float64)
    M = torch.rand(4, 6) > 0.5
    strength = torch.tensor([0.0, 0.2, 0.5, 1.0], dtype=torch.float64)[:, None]
    out = modulate_scores(S, M, strength)
    assert torch.equal(out[:, 0], S[:, 0])
    torch.testing.assert_close(out, reference(S, M, strength), rtol=0, atol=1e-12)
