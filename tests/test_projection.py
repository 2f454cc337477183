"""Contract 2: seeded, reproducible, never whole, and inner products preserved (JL)."""

import math

import pytest
import torch

from elrea.projection import CHUNK, PROJECTORS, RademacherProjector, SparseProjector

P = 3 * CHUNK // 2 + 17   # spans chunk boundaries


@pytest.mark.parametrize("name", list(PROJECTORS))
def test_seed_reproducible_and_seed_dependent(name):
    g = torch.randn(2, P)
    a = PROJECTORS[name](P, 128, seed=1).project(g)
    b = PROJECTORS[name](P, 128, seed=1).project(g)
    c = PROJECTORS[name](P, 128, seed=2).project(g)
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)


@pytest.mark.parametrize("name", list(PROJECTORS))
def test_blockwise_equals_whole(name):
    g = torch.randn(3, P)
    proj = PROJECTORS[name](P, 64, seed=0)
    whole = proj.project(g)
    out = torch.zeros(3, 64)
    for s, e in [(0, 1000), (1000, CHUNK + 5), (CHUNK + 5, P)]:
        proj.project_block(g[:, s:e], s, out)
    assert torch.allclose(whole, out, atol=1e-4)


@pytest.mark.parametrize("name", list(PROJECTORS))
def test_inner_products_within_jl_tolerance(name):
    torch.manual_seed(0)
    d, n, p = 2048, 12, 20000
    # correlated vectors with uneven scale across coordinates, like real gradients
    base = torch.randn(n, p) * torch.linspace(0.2, 3.0, p)
    x = base + 0.8 * base[0]
    y = PROJECTORS[name](p, d, seed=5).project(x)
    xn = x / x.norm(dim=1, keepdim=True)
    yn = y / x.norm(dim=1, keepdim=True)
    err = (yn @ yn.T - xn @ xn.T).abs().max().item()
    eps = 4 * math.sqrt(math.log(n * n) / d)  # JL: |<Px,Py> - <x,y>| <= eps for unit x, y w.h.p.
    assert err < eps, (err, eps)
    norms = y.norm(dim=1) / x.norm(dim=1)
    assert (norms - 1).abs().max() < eps


def test_sparse_projection_is_sparse_and_small():
    proj = SparseProjector(P, 8192, seed=0, nnz=4)
    g = torch.zeros(1, P)
    g[0, 123] = 1.0
    y = proj.project(g)
    assert (y != 0).sum() <= 4                      # one coordinate lands on <= nnz rows
    assert math.isclose(y.norm().item(), 1.0, rel_tol=1e-5)
    held = sum(r.numel() + w.numel() for r, w in proj._cache.values())
    assert held <= 2 * 4 * (P + CHUNK)              # O(p * nnz), never p * d


def test_rademacher_never_builds_whole_matrix(monkeypatch):
    proj = RademacherProjector(P, 4096, seed=0)
    biggest = []
    orig = proj._chunk

    def spy(c, device):
        m = orig(c, device)
        biggest.append(m.numel())
        assert bool((m.abs() == 1 / 64).all() and (m > 0).any() and (m < 0).any())   # +-1/sqrt(d)
        return m
    monkeypatch.setattr(proj, "_chunk", spy)
    proj.project(torch.randn(1, P))
    assert max(biggest) <= proj.rows_per_chunk * 4096 < P * 4096


@pytest.mark.parametrize("nnz", [1, 3, 4])
def test_sparse_one_scatter_per_chunk_equals_nnz_scatters_bit_for_bit(nnz):
    """project_block's single index_add_ per chunk adds the same terms in the same order as the
    nnz index_add_ calls it replaced: the features are unchanged bit for bit (CPU, float32)."""
    torch.manual_seed(1)
    g = torch.randn(5, P) * torch.logspace(-4, 2, P)   # wide range: any reordering would show
    proj = SparseProjector(P, 512, seed=7, nnz=nnz)
    for blocks in ([(0, P)], [(0, 4608), (4608, CHUNK + 9), (CHUNK + 9, P)]):
        new, old = torch.zeros(5, 512), torch.zeros(5, 512)
        for s, e in blocks:
            proj.project_block(g[:, s:e], s, new)
            proj.project_block_reference(g[:, s:e], s, old)
        assert torch.equal(new, old)
