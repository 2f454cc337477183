"""Grouped LoRA: one batch, a different adapter per row, two batched matmuls per layer.

PEFT's mixed-adapter batches (`adapter_names=`) are general, but per layer they rebuild the
row index lists and run gather -> A -> dropout -> B -> scale -> scatter once per adapter; at
decoding time, with a handful of rows, that Python work costs more than the base model's own
matmuls. Ensembled decoding knows its rows in advance, so `grouped_lora` lays them out
adapter-major (every adapter's rows contiguous), stacks the adapters' factors once,

    At[k] = A_k^T           (K, in, r)
    Bt[k] = s_k * B_k^T     (K, r, out)

and, while active, replaces the forward of every LoRA linear layer with

    y = W x + bmm(bmm(x viewed as (K, rows_per_adapter * T, in), At), Bt)

when all adapters have the same number of rows (the usual ensemble: every prompt, every
adapter), or one slice-matmul-add per adapter otherwise. It is exact (the same sums as PEFT,
up to float rounding) and covers plain LoRA on linear layers (nn.Linear or GPT-2's Conv1D
base layers) in eval mode; `supported()` says when it applies, and callers fall back to
PEFT's `adapter_names` otherwise (DoRA and other variants, LoRA on embeddings, quantized
layers, dropout in training mode).
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
# disable_adapters) grouped LoRA is tested against; others fall back to PEFT's mixed batches
TESTED_PEFT = ((0, 21), (0, 22))


def peft_tested() -> bool:
    import peft

    major_minor = tuple(int(x) for x in peft.__version__.split(".")[:2])
    return TESTED_PEFT[0] <= major_minor < TESTED_PEFT[1]


def supported(model, adapters: list[str]) -> bool:
    """Whether `grouped_lora` reproduces PEFT exactly for these adapters on this model."""
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


def row_groups(row_adapters: list[str]) -> list[tuple[str, int, int]]:
    """[(adapter, start, end)] of the contiguous runs of rows; raises if an adapter's rows are split."""
    groups: list[tuple[str, int, int]] = []
    for i, a in enumerate(row_adapters):
        if groups and groups[-1][0] == a:
            groups[-1] = (a, groups[-1][1], i + 1)
        else:
            if any(g[0] == a for g in groups):
                raise ValueError(f"rows of adapter {a!r} are not contiguous; order rows adapter-major")
            groups.append((a, i, i + 1))
    return groups


def _grouped_forward(module, plan, x, *args, **kwargs):
    kwargs.pop("adapter_names", None)
    result = module.base_layer(x, *args, **kwargs)
    At, Bt, groups, equal = plan
    xs = x.to(At.dtype)
    if xs.shape[0] != groups[-1][2]:
        raise RuntimeError(f"grouped LoRA was set up for {groups[-1][2]} rows, got a batch of {xs.shape[0]}")
    if equal:                              # equal groups: two batched matmuls for all adapters
        K = len(groups)
        delta = torch.bmm(torch.bmm(xs.reshape(K, -1, xs.shape[-1]), At), Bt)
        return result + delta.reshape(result.shape).to(result.dtype)
    result = result.clone()
    for k, (_, s, e) in enumerate(groups):
        result[s:e] += (xs[s:e] @ At[k] @ Bt[k]).to(result.dtype)
    return result


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


@contextlib.contextmanager
def grouped_lora(model, row_adapters: list[str]):
    """While active, row i of every batch through `model` runs adapter `row_adapters[i]`.

    Rows must be adapter-major (each adapter's rows contiguous); the batch size must equal
    len(row_adapters) on every forward. Check `supported(model, adapters)` first.
    """
    groups = row_groups(row_adapters)
    names = [g[0] for g in groups]
    equal = len({e - s for _, s, e in groups}) == 1
    patched = []
    try:
        with torch.no_grad():
            for m in _lora_modules(model):
                m.forward = functools.partial(_grouped_forward, m, (*_stacked(m, names), groups, equal))
                patched.append(m)
        yield
    finally:
        for m in patched:
            del m.forward
