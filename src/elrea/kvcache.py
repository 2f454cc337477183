"""A static KV cache of slots: one row per slot, each row writing at its own column.

transformers' StaticCache writes every row of a batch at the same positions, which suits one
batch that starts and ends together. The decoding engine (elrea.engine) instead keeps a pool
of S slots that requests join and leave at any step, so each row has its own length. The
tensors are allocated once, per layer

    keys, values: (S, H_kv, L, D)

and never grow. Two ways to write:

- prefill (`prefill(rows)`): a batch of n new rows, left-padded to T tokens, is written to
  columns [0, T) of slots `rows`; attention runs over those T keys alone (the new requests
  have no earlier context), with the caller's (n, 1, T, T) mask.
- decode (`decode(cols, span)`): one token for each of the first N slots, written at column
  cols[s] of slot s; attention reads columns [0, span) with the caller's (N, 1, 1, span)
  mask, which says which columns are each row's. The engine passes the occupied slots and
  columns (rounded up to powers of two), so an almost empty pool costs little.

Which columns belong to a row is the caller's business (the mask); the cache only stores. It
plugs into any transformers model through the `Cache` interface (`update(key, value, layer)`);
the tensors are marked static so that torch.compile's CUDA graphs can write into them.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache


class SlotCache(Cache):
    def __init__(self, slots: int, length: int):
        try:
            super().__init__(layers=[])
        except TypeError:  # transformers before the layered Cache
            super().__init__()
        self.slots, self.length = slots, length
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []
        self._rows: torch.Tensor | None = None     # prefill: the slots being written (n,)
        self._cols: torch.Tensor | None = None     # decode: each slot's write column (N,)
        self._span = length                        # decode: columns attention reads

    def prefill(self, rows: torch.Tensor) -> "SlotCache":
        self._rows, self._cols = rows, None
        return self

    def decode(self, cols: torch.Tensor, span: int | None = None) -> "SlotCache":
        """The next forward decodes slots 0..N-1 (N = len(cols)), each writing at its column and
        attention reading columns [0, span) (default all): views of the static tensors."""
        self._rows, self._cols, self._span = None, cols, span or self.length
        return self

    def _allocate(self, layer: int, key: torch.Tensor, value: torch.Tensor) -> None:
        while len(self.keys) <= layer:
            shape_k = (self.slots, key.shape[1], self.length, key.shape[3])
            shape_v = (self.slots, value.shape[1], self.length, value.shape[3])
            k = torch.zeros(shape_k, dtype=key.dtype, device=key.device)
            v = torch.zeros(shape_v, dtype=value.dtype, device=value.device)
            torch._dynamo.mark_static_address(k)
            torch._dynamo.mark_static_address(v)
            self.keys.append(k)
            self.values.append(v)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        """key_states, value_states: (N, H_kv, T, D). Returns what attention should read."""
        if len(self.keys) <= layer_idx:
            self._allocate(layer_idx, key_states, value_states)
        K, V = self.keys[layer_idx], self.values[layer_idx]
        if self._cols is not None:                                   # decode: T = 1
            n = self._cols.shape[0]
            K, V = K[:n, :, :self._span], V[:n, :, :self._span]       # views: writes land in the cache
            idx = self._cols.view(-1, 1, 1, 1).expand(-1, K.shape[1], 1, K.shape[3])
            K.scatter_(2, idx, key_states.to(K.dtype))
            V.scatter_(2, idx.expand(-1, V.shape[1], 1, V.shape[3]), value_states.to(V.dtype))
            return K, V
        if self._rows is None:
            raise RuntimeError("SlotCache: call prefill(rows) or decode(cols) before a forward")
        T = key_states.shape[2]
        if T > self.length:
            raise RuntimeError(f"SlotCache: a prompt of {T} tokens does not fit {self.length} columns")
        K[self._rows, :, :T] = key_states.to(K.dtype)
        V[self._rows, :, :T] = value_states.to(V.dtype)
        return key_states, value_states

    def grow(self, slots: int) -> None:
        """Room for `slots` slots, the rows there now kept (the engine's pool, when a fork of a
        shared row finds no free slot): new tensors, so a compiled step must be rebuilt."""
        for group in (self.keys, self.values):
            for i, t in enumerate(group):
                bigger = torch.zeros((slots, *t.shape[1:]), dtype=t.dtype, device=t.device)
                bigger[:t.shape[0]] = t
                torch._dynamo.mark_static_address(bigger)
                group[i] = bigger
        self.slots = slots

    # what transformers' model code may ask a cache; the engine passes its own 4D masks and
    # position ids, so these only have to be truthful
    def get_seq_length(self, layer_idx: int = 0) -> int:
        return 0

    def get_mask_sizes(self, *args, **kwargs) -> tuple[int, int]:
        return self.length, 0

    def get_max_cache_shape(self, layer_idx: int = 0) -> int:
        return self.length

    @property
    def is_compileable(self) -> bool:
        return True

    def __len__(self) -> int:
        return len(self.keys)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.keys + self.values)
