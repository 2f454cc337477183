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

P is always generated on the CPU from the seed (torch's CPU generator), then moved to the
device of the output buffer, so that features computed on a GPU and routing features
computed on a CPU use the same P. Projection accumulates in float32.
"""

from __future__ import annotations

from typing import Protocol

import torch

from .registry import PROJECTORS  # re-exported: the projectors by name

CHUNK = 1 << 16  # input coordinates per generated chunk of P


class Projector(Protocol):
    """delta = P g for a seeded p x d matrix P that is never materialised whole."""

    num_params: int
    dim: int

    def project_block(self, g: torch.Tensor, offset: int, out: torch.Tensor) -> torch.Tensor:
        """out [n, d] += the projection of coordinates offset..offset+L-1 given as g [n, L]."""
        ...

    def project(self, g: torch.Tensor) -> torch.Tensor:
        """P g for g [n, p] -> [n, d] (float32, on g's device)."""
        ...


class SparseProjector:
    """Sparse JL transform with `nnz` signed entries per input coordinate."""

    def __init__(self, num_params: int, dim: int, seed: int, nnz: int = 4, cache: bool = True):
        self.num_params, self.dim, self.seed, self.nnz = num_params, dim, seed, nnz
        # (chunk, device) -> (rows, weights): 12 bytes per coordinate and non-zero
        self._cache: dict[tuple[int, torch.device], tuple[torch.Tensor, torch.Tensor]] | None = \
            {} if cache else None

    def _chunk(self, c: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """(rows [nnz, CHUNK] int64, signed weights [nnz, CHUNK] float32) for input chunk c."""
        key = (c, torch.device(device))
        if self._cache is not None and key in self._cache:
            return self._cache[key]
        gen = torch.Generator(device="cpu").manual_seed(_chunk_seed(self.seed, c))
        rows = torch.randint(0, self.dim, (self.nnz, CHUNK), generator=gen, device="cpu")
        signs = torch.randint(0, 2, (self.nnz, CHUNK), generator=gen, dtype=torch.int8, device="cpu")
        weights = (signs.float() * 2 - 1) / self.nnz ** 0.5
        # int64 rows: index_add_ with int32 indices is ~10x slower on the CPU (measured)
        rows, weights = rows.to(device), weights.to(device)
        if self._cache is not None:
            self._cache[key] = (rows, weights)
        return rows, weights

    def project_block(self, g: torch.Tensor, offset: int, out: torch.Tensor) -> torch.Tensor:
        """out += P[offset:offset+L]^T-applied block: g [n, L] are coordinates offset..offset+L-1.

        One scatter per chunk: the nnz copies of the chunk, each scaled by its signed weights,
        side by side k-major ([n, nnz * m]), added at their rows by a single index_add_. The
        CPU kernel adds an index list in order, so every output gets the same terms in the same
        order as nnz separate index_add_ calls, k = 0 first: the same float32 result, bit for bit.
        """
        g = g.float()
        n = g.shape[0]
        for start, stop, c, lo in _chunks(offset, g.shape[1]):
            rows, weights = self._chunk(c, out.device)
            hi = lo + stop - start
            part = g[:, None, start:stop] * weights[None, :, lo:hi]  # (n, nnz, m)
            out.index_add_(1, rows[:, lo:hi].reshape(-1), part.reshape(n, -1))
        return out

    def project_block_reference(self, g: torch.Tensor, offset: int, out: torch.Tensor) -> torch.Tensor:
        """project_block as first written, one index_add_ per non-zero k (for tests and timing)."""
        g = g.float()
        for start, stop, c, lo in _chunks(offset, g.shape[1]):
            rows, weights = self._chunk(c, out.device)
            part = g[:, start:stop]                                  # (n, m)
            for k in range(self.nnz):
                out.index_add_(1, rows[k, lo:lo + stop - start], part * weights[k, lo:lo + stop - start])
        return out

    def project(self, g: torch.Tensor) -> torch.Tensor:
        """delta = P g for g [n, p] -> [n, d]."""
        out = torch.zeros(g.shape[0], self.dim, dtype=torch.float32, device=g.device)
        return self.project_block(g, 0, out)


class RademacherProjector:
    """Dense Rademacher projection, P_ji = +-1/sqrt(d), generated chunk by chunk from the seed."""

    def __init__(self, num_params: int, dim: int, seed: int, **_):
        self.num_params, self.dim, self.seed = num_params, dim, seed
        self._last: tuple = (None, None)

    rows_per_chunk = 1024  # 1024 x 8192 floats = 32 MiB generated at a time

    def _chunk(self, c: int, device: torch.device) -> torch.Tensor:
        # keep the last chunk: streamed blocks that straddle a chunk boundary reuse it
        if self._last[0] == (c, device):
            return self._last[1]
        gen = torch.Generator(device="cpu").manual_seed(_chunk_seed(self.seed, c))
        bits = torch.randint(0, 2, (self.rows_per_chunk, self.dim), generator=gen, dtype=torch.int8, device="cpu")
        self._last = ((c, device), ((bits.to(device).float() * 2 - 1) / self.dim ** 0.5))   # (rows, d)
        return self._last[1]

    def project_block(self, g: torch.Tensor, offset: int, out: torch.Tensor) -> torch.Tensor:
        g = g.float()
        for start, stop, c, lo in _chunks(offset, g.shape[1], self.rows_per_chunk):
            out.addmm_(g[:, start:stop], self._chunk(c, out.device)[lo:lo + stop - start])
        return out

    def project(self, g: torch.Tensor) -> torch.Tensor:
        out = torch.zeros(g.shape[0], self.dim, dtype=torch.float32, device=g.device)
        return self.project_block(g, 0, out)


def make_projector(name: str, num_params: int, dim: int, seed: int, nnz: int = 4):
    """The projector registered as `name` (elrea.registry.PROJECTORS: sjlt, rademacher, ...)."""
    return PROJECTORS.get(name)(num_params=num_params, dim=dim, seed=seed, nnz=nnz)


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
