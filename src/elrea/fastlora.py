"""Fast LoRA for inference: one batch, a different adapter (or mix of adapters) per row.

PEFT's mixed-adapter batches (`adapter_names=`) are general, but per layer they rebuild the
row index lists and run gather -> A -> dropout -> B -> scale -> scatter once per adapter; at
decoding time, with a handful of rows, that Python work costs more than the base model's own
matmuls, and its shapes change with the routing.

`Stacked` is the fixed-shape form the decoding engine (elrea.engine) uses: every adapter's
factors of a layer concatenated once, A (in, K r) and B (K r, out) with the scaling folded in,
and each row of a batch choosing its mix by a selector row sel (K r,) on the device:

    y = W x + ((x A) * sel) B

sel is adapter k's block of ones for "row i runs adapter k" (the other blocks add exact zeros),
or w_k on block k for "mix the adapters inside the layer" (delta W = sum_k w_k s_k B_k A_k). The
graph is the same whatever the routing, which is what lets the engine compile its step. It is
exact (the same sums as PEFT, up to float rounding; with the default alpha / r = 2 the folded
scale is a power of two) and covers plain LoRA on linear layers (nn.Linear or GPT-2's Conv1D
base layers) in eval mode; `supported()` says when it applies, and the engine falls back to
PEFT's `adapter_names` otherwise (DoRA and other variants, LoRA on embeddings, quantized layers,
dropout in training mode). `adapters_off` runs the backbone alone, cheaply.
"""

from __future__ import annotations

import contextlib
import functools
import weakref

import torch


def _lora_modules(model):
    from peft.tuners.lora import LoraLayer

    return [m for m in model.modules() if isinstance(m, LoraLayer)]


_MODULES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _lora_modules_cached(model):
    """_lora_modules, found once per model and set of adapters (a walk costs ~7 ms for SmolLM2)."""
    key = tuple(getattr(model, "peft_config", None) or ())
    hit = _MODULES.get(model)
    if hit is None or hit[0] != key:
        hit = _MODULES[model] = (key, _lora_modules(model))
    return hit[1]


# the PEFT versions whose LoRA layer internals (lora_A/B, scaling, lora_variant, merged,
# disable_adapters) stacked LoRA is tested against; others fall back to PEFT's mixed batches
TESTED_PEFT = ((0, 21), (0, 22))


def peft_tested() -> bool:
    import peft

    major_minor = tuple(int(x) for x in peft.__version__.split(".")[:2])
    return TESTED_PEFT[0] <= major_minor < TESTED_PEFT[1]


def supported(model, adapters: list[str]) -> bool:
    """Whether `Stacked` reproduces PEFT exactly for these adapters on this model."""
    from peft.tuners.lora.layer import Linear

    if not peft_tested():
        return False
    mods = _lora_modules(model)
    if not mods:
        return False
    for m in mods:
        if type(m) is not Linear or m.merged or m.training or m.disable_adapters:
            return False
        for a in adapters:
            if a not in m.lora_A or a in m.lora_variant or a in getattr(m, "lora_magnitude_vector", {}):
                return False
    return True


@contextlib.contextmanager
def adapters_off(model):
    """While active, every LoRA layer of `model` computes its base layer alone (a forward of the
    backbone without adapters), as PEFT's `disable_adapter()` does. That walks every module of
    the model twice and toggles requires_grad on each adapter's parameters: about 100 ms per
    call for SmolLM2-135M with 5 adapters, on a CPU and a GPU alike, more than the half forward
    the learned router runs under it. Here only the LoRA layers' flag is flipped (and restored
    on exit, also after an exception); on untested PEFT versions or merged layers, PEFT's way."""
    mods = _lora_modules_cached(model) if peft_tested() else []
    if not mods or any(m.merged for m in mods):
        with model.disable_adapter() if hasattr(model, "disable_adapter") else contextlib.nullcontext():
            yield
        return
    before = [m._disable_adapters for m in mods]
    for m in mods:
        m._disable_adapters = True
    try:
        yield
    finally:
        for m, b in zip(mods, before):
            m._disable_adapters = b


def _stacked(m, names: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """At (K, in, r) and Bt (K, r, out) with the scaling folded in; adapters of lower rank are
    zero-padded to the largest rank (the padding adds exact zeros)."""
    r = max(m.lora_A[a].weight.shape[0] for a in names)
    A0, B0 = m.lora_A[names[0]].weight, m.lora_B[names[0]].weight
    At = A0.new_zeros(len(names), A0.shape[1], r)
    Bt = B0.new_zeros(len(names), r, B0.shape[0])
    for k, a in enumerate(names):
        ra = m.lora_A[a].weight.shape[0]
        At[k, :, :ra] = m.lora_A[a].weight.t()
        Bt[k, :ra] = (m.lora_B[a].weight * m.scaling[a]).t()
    return At, Bt



# rows of the LoRA sum done at a time in a prefill: (rows x out) float32 stays in a core's cache
CHUNK_ROWS = 256


def _stacked_forward(module, stack: "Stacked", A, B, x, *args, **kwargs):
    sel = stack.selector
    if sel is None:                      # not inside the engine: PEFT's own forward
        return type(module).forward(module, x, *args, **kwargs)
    kwargs.pop("adapter_names", None)
    result = module.base_layer(x, *args, **kwargs)
    n = result.numel() // result.shape[-1]
    if (n <= CHUNK_ROWS or result.device.type != "cpu" or torch.is_grad_enabled()
            or torch.compiler.is_compiling() or not result.is_contiguous()):
        h = x.to(A.dtype) @ A                                    # (N, T, K r)
        h = h * (sel[:, None, :] if h.dim() == 3 else sel)
        # as PEFT: the sum in the adapter's dtype, rounded to the backbone's once (rounding the
        # delta to bf16 first and adding in bf16 rounds twice, and drifts from PEFT's tokens)
        return (result + h @ B).to(result.dtype)                 # (N, T, out)
    # a prefill on a CPU: the same sums a block of rows at a time, each written over the base
    # output. Done whole, the float32 copies of x, the (N T, out) delta and the sum each go
    # through memory (each a fresh allocation the size of a layer's activations, page-faulted
    # in), which on a CPU cost several times the layer's own matmul (bitwise the same: each
    # element is one sum). A GPU's memory keeps up, and a launch per block would cost more there
    xs, r = x.reshape(n, x.shape[-1]), result.view(n, result.shape[-1])
    rows_sel = sel.repeat_interleave(n // sel.shape[0], dim=0)   # (N T, K r): each token its row's
    for s in range(0, n, CHUNK_ROWS):
        h = (xs[s:s + CHUNK_ROWS].to(A.dtype) @ A) * rows_sel[s:s + CHUNK_ROWS]
        torch.add(r[s:s + CHUNK_ROWS], h @ B, out=r[s:s + CHUNK_ROWS])
    return result


class Stacked:
    """The LoRA layers of `model` with adapters `names` stacked (see the module docstring).

    While `selector` is None every layer runs PEFT's forward unchanged (training, gradient
    features); `with stack.rows(sel):` makes a batch's row i use selector sel[i] (N, K r).
    `close()` restores PEFT's forward. Check `supported(model, names)` first.
    """

    def __init__(self, model, names: list[str]):
        self.names = list(names)
        self.rank = max(m.lora_A[a].weight.shape[0] for m in _lora_modules(model) for a in names)
        self.selector: torch.Tensor | None = None
        self.dtype = _lora_modules(model)[0].lora_A[names[0]].weight.dtype
        self._modules = []
        with torch.no_grad():
            for m in _lora_modules(model):
                At, Bt = _stacked(m, self.names)              # (K, in, r), (K, r, out)
                A = At.permute(1, 0, 2).reshape(At.shape[1], -1).contiguous()   # (in, K r)
                B = Bt.reshape(-1, Bt.shape[2]).contiguous()                     # (K r, out)
                m.forward = functools.partial(_stacked_forward, m, self, A, B)
                self._modules.append(m)

    def select(self, adapter: torch.Tensor) -> torch.Tensor:
        """Selectors (N, K r) for rows that each run one adapter (indices into names, (N,))."""
        onehot = torch.nn.functional.one_hot(adapter, len(self.names)).to(self.dtype)
        return onehot.repeat_interleave(self.rank, dim=1)

    def mix(self, weights: torch.Tensor) -> torch.Tensor:
        """Selectors (N, K r) for rows that mix the adapters inside each layer, weights (N, K)."""
        return weights.to(self.dtype).repeat_interleave(self.rank, dim=1)

    @contextlib.contextmanager
    def rows(self, selector: torch.Tensor):
        self.selector = selector
        try:
            yield
        finally:
            self.selector = None

    def close(self) -> None:
        for m in self._modules:
            if "forward" in m.__dict__:
                del m.forward
        self._modules = []
