"""Seeded random projections of per-example gradients: delta = P g (docs/method.md, step 2).

P maps p LoRA-gradient coordinates to d dimensions with E[<Pg, Ph>] = <g, h>. Neither
projector ever holds the whole p x d matrix: both generate P from the seed in fixed chunks of
input coordinates, so that projecting the whole vector or its blocks one at a time (the way
features are streamed, parameter by parameter) gives the same result.

- `SparseProjector` ("sjlt", default): a sparse Johnson-Lindenstrauss transform. Each input
  coordinate j goes to `nnz` output rows h_k(j) with signs s_k(j) and weight 1/sqrt(nnz):
  (P g)_i = sum_k sum_{j: h_k(j)=i} s_k(j) g_j / sqrt(nnz). Cost O(n p nnz), against O(n p d)
  for a dense matrix, so it is ~1000x cheaper at d = 8192.
- `RademacherProjector` ("rademacher"): the dense P_ji = +-1/sqrt(d) of LESS/TRAK, generated
  chunk by chunk from the seed. Exact reference; slow for large adapters on a CPU.
"""

from __future__ import annotations

import torch

CHUNK = 1 << 16  # input coordinates per generated chunk of P


class SparseProjector:
    """Sparse JL transform with `nnz` signed entries per input coordinate."""

    def __init__(self, num_params: int, dim: int, seed: int, nnz: int = 4, cache: bool = True):
        self.num_params, self.dim, self.seed, self.nnz = num_params, dim, seed, nnz
        self._cache: dict[int, tuple[torch.Tensor, torch.Tensor]] | None = {} if cache else None

    def _chunk(self, c: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(rows [nnz, CHUNK] int64, signed weights [nnz, CHUNK]) for input chunk c."""
        if self._cache is not None and c in self._cache:
            return self._cache[c]
        gen = torch.Generator().manual_seed(_chunk_seed(self.seed, c))
        rows = torch.randint(0, self.dim, (self.nnz, CHUNK), generator=gen)
        signs = torch.randint(0, 2, (self.nnz, CHUNK), generator=gen, dtype=torch.int8)
        weights = (signs.float() * 2 - 1) / self.nnz ** 0.5
        if self._cache is not None:
            self._cache[c] = (rows, weights)
        return rows, weights

    def project_block(self, g: torch.Tensor, offset: int, out: torch.Tensor) -> torch.Tensor:
        """out += P[offset:offset+L]^T-applied block: g [n, L] are coordinates offset..offset+L-1."""
        g = g.float()
        for start, stop, c, lo in _chunks(offset, g.shape[1]):
            rows, weights = self._chunk(c)
            part = g[:, start:stop]                                  # (n, m)
            for k in range(self.nnz):
                out.index_add_(1, rows[k, lo:lo + stop - start], part * weights[k, lo:lo + stop - start])
        return out

    def project(self, g: torch.Tensor) -> torch.Tensor:
        """delta = P g for g [n, p] -> [n, d]."""
        out = torch.zeros(g.shape[0], self.dim, dtype=torch.float32)
        return self.project_block(g, 0, out)


class RademacherProjector:
    """Dense Rademacher projection, P_ji = +-1/sqrt(d), generated chunk by chunk from the seed."""

    def __init__(self, num_params: int, dim: int, seed: int, **_):
        self.num_params, self.dim, self.seed = num_params, dim, seed
        self._last: tuple = (None, None)

    rows_per_chunk = 1024  # 1024 x 8192 floats = 32 MiB generated at a time

    def _chunk(self, c: int) -> torch.Tensor:
        # keep the last chunk: streamed blocks that straddle a chunk boundary reuse it
        if self._last[0] == c:
            return self._last[1]
        gen = torch.Generator().manual_seed(_chunk_seed(self.seed, c))
        bits = torch.randint(0, 2, (self.rows_per_chunk, self.dim), generator=gen, dtype=torch.int8)
        self._last = (c, (bits.float() * 2 - 1) / self.dim ** 0.5)   # (rows, d)
        return self._last[1]

    def project_block(self, g: torch.Tensor, offset: int, out: torch.Tensor) -> torch.Tensor:
        g = g.float()
        for start, stop, c, lo in _chunks(offset, g.shape[1], self.rows_per_chunk):
            out.addmm_(g[:, start:stop], self._chunk(c)[lo:lo + stop - start])
        return out

    def project(self, g: torch.Tensor) -> torch.Tensor:
        out = torch.zeros(g.shape[0], self.dim, dtype=torch.float32)
        return self.project_block(g, 0, out)


PROJECTORS = {"sjlt": SparseProjector, "rademacher": RademacherProjector}


def make_projector(name: str, num_params: int, dim: int, seed: int, nnz: int = 4):
    from .errors import unknown_name

    if name not in PROJECTORS:
        raise unknown_name("projection", name, PROJECTORS)
    return PROJECTORS[name](num_params=num_params, dim=dim, seed=seed, nnz=nnz)


def _chunk_seed(seed: int, c: int) -> int:
    return (seed * 1_000_003 + c * 7919 + 12345) % (2 ** 63 - 1)


def _chunks(offset: int, length: int, size: int = CHUNK):
    """Split coordinates [offset, offset+length) at chunk boundaries (chunks of `size`).

    Yields (start, stop) within the block, the chunk index c, and the position lo inside c.
    """
    pos = 0
    while pos < length:
        c, lo = divmod(offset + pos, size)
        stop = min(length, pos + size - lo)
        yield pos, stop, c, lo
        pos = stop
