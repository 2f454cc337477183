"""elrea's decoder before the engine (issue 19), kept as the benchmarks' "elrea before (eager)".

A dynamic KV cache growing by torch.cat, masks rebuilt every step, a host sync per step, each
row's adapter through grouped LoRA patched per call (two batched matmuls per layer for rows
laid out adapter-major). The library decodes through elrea.engine.Ensemble; this file exists
only so benchmarks can put the two side by side in one run.
"""

from __future__ import annotations

import contextlib
import functools

import torch

from elrea import fastlora
from elrea.engine import is_text
from elrea.ensemble import Decoding, left_pad, sampling
from elrea.features import position_ids_from_mask
from elrea.models import model_device


def _expand(weights: torch.Tensor, adapters: list[str], device: torch.device):
    """Rows (prompt index, adapter name, weight) for every w > 0, adapter-major; the index and
    weight tensors on `device`."""
    weights = weights.detach().to("cpu")
    rows = [(b, adapters[c], float(weights[b, c])) for c in range(weights.shape[1])
            for b in range(weights.shape[0]) if weights[b, c] > 0]
    prompt_of = torch.tensor([r[0] for r in rows], device=device)
    return prompt_of, [r[1] for r in rows], torch.tensor([r[2] for r in rows], device=device)


def _row_adapters(model, names: list[str]):
    """(context manager, forward kwargs) that make row i of each batch run adapter names[i]."""
    if fastlora.supported(model, sorted(set(names))):
        return grouped_lora(model, names), {}
    return contextlib.nullcontext(), {"adapter_names": names}


@torch.no_grad()
def decode_steps(model, prompts: list[list[int]], weights: torch.Tensor, adapters: list[str],
                 decodings: Decoding | list[Decoding], pad_id: int):
    """Ensembled decoding, one step at a time: yields (tokens, reasons) after every step.

    tokens[b]: the id chosen for prompt b at this step (None once b had finished); reasons[b]:
    why b finished at this step ("stop": an EOS id or a stopping criterion, "length",
    "cancelled") or None. weights [B, K] over `adapters`; each prompt its own Decoding (or
    one for all). Runs on the model's device; stops when every prompt has finished.
    """
    B = len(prompts)
    device = model_device(model)
    specs = decodings if isinstance(decodings, list) else [decodings] * B
    shared = all(d is specs[0] for d in specs)
    prompt_of, names, row_w = _expand(weights, adapters, device)
    ids, mask = left_pad([prompts[b] for b in prompt_of.tolist()], pad_id, device)   # (R, T)
    history, _ = left_pad(prompts, pad_id, device)                 # (B, T): what processors see
    done = [False] * B
    cache, step_ids, pos = {}, ids, position_ids_from_mask(mask)
    per_row, kw = _row_adapters(model, names)
    with per_row:
        for t in range(max(d.max_new_tokens for d in specs)):
            out = model(input_ids=step_ids, attention_mask=mask, position_ids=pos, use_cache=True,
                        logits_to_keep=1, **cache, **kw)  # only the last position
            cache = cache_kwargs(out)
            row_logits = out.logits[:, -1, :].float() * row_w[:, None]                # (R, V)
            logits = torch.zeros(B, row_logits.shape[1], device=device).index_add_(0, prompt_of, row_logits)
            nxt = _choose(logits, history, specs, shared)                              # (B,)
            nxt = torch.where(torch.tensor(done, device=device), torch.full_like(nxt, pad_id), nxt)
            history = torch.cat([history, nxt[:, None]], dim=1)
            tokens, reasons = nxt.tolist(), [None] * B
            for b, spec in enumerate(specs):
                if done[b]:
                    tokens[b] = None
                    continue
                if spec.cancelled:
                    reasons[b] = "cancelled"
                elif tokens[b] in spec.eos_ids or (spec.stopping is not None and
                                                   bool(spec.stopping(history[b:b + 1], None).any())):
                    reasons[b] = "stop"
                elif t + 1 >= spec.max_new_tokens:
                    reasons[b] = "length"
                done[b] = reasons[b] is not None
            yield tokens, reasons
            if all(done):
                break
            step_ids = nxt[prompt_of][:, None]                                         # (R, 1)
            mask = torch.cat([mask, torch.ones((mask.shape[0], 1), dtype=mask.dtype, device=device)], dim=1)
            pos = pos[:, -1:] + 1


def _choose(logits: torch.Tensor, history: torch.Tensor, specs: list[Decoding], shared: bool) -> torch.Tensor:
    """Next token of every prompt from its mixed logits [B, V]: its processors, then argmax or a
    draw from its generator (one draw for the batch when every prompt shares one Decoding)."""
    if shared:
        spec = specs[0]
        if spec.processors:
            logits = spec.processors(history, logits)
        if spec.do_sample:
            return torch.multinomial(torch.softmax(logits, -1), 1, generator=spec.generator).squeeze(1)
        return logits.argmax(-1)
    out = []
    for b, spec in enumerate(specs):
        row = spec.processors(history[b:b + 1], logits[b:b + 1]) if spec.processors else logits[b:b + 1]
        if spec.do_sample:
            out.append(torch.multinomial(torch.softmax(row, -1), 1, generator=spec.generator)[0])
        else:
            out.append(row.argmax(-1))
    return torch.cat(out)


def generate(model, prompts: list[list[int]], weights: torch.Tensor, adapters: list[str], *,
             eos_id: int | None = None, pad_id: int, max_new_tokens: int = 64, temperature: float = 0.0,
             top_p: float = 1.0, generator: torch.Generator | None = None,
             decoding: Decoding | list[Decoding] | None = None, on_token=None) -> list[list[int]]:
    """Ensembled decoding: new token ids for each prompt (an EOS id and what follows removed).

    weights [B, K] over `adapters`. `decoding` (one, or one per prompt) says how; without it,
    greedy or temperature/top-p sampling with `eos_id`. `on_token(b, id)` is called for each
    token as it comes. Runs on the model's device (`generator`, when sampling, must be on that
    device too)."""
    if decoding is None:
        decoding = sampling(temperature, top_p, max_new_tokens, [] if eos_id is None else [eos_id], generator)
    specs = decoding if isinstance(decoding, list) else [decoding] * len(prompts)
    out: list[list[int]] = [[] for _ in prompts]
    for tokens, reasons in decode_steps(model, prompts, weights, adapters, decoding, pad_id):
        for b, tok in enumerate(tokens):
            if is_text(tok, reasons[b], specs[b]):
                out[b].append(tok)
                if on_token is not None:
                    on_token(b, tok)
    return out


def cache_kwargs(out) -> dict:
    """The KV cache of a forward's output as the kwarg for the next forward: `cache` in
    transformers >= 5.2x (which deprecates `past_key_values`), `past_key_values` before."""
    if "cache" in out:
        return {"cache": out["cache"]}
    return {"past_key_values": out["past_key_values"]}



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
            for m in fastlora._lora_modules(model):
                m.forward = functools.partial(_grouped_forward, m, (*fastlora._stacked(m, names), groups, equal))
                patched.append(m)
        yield
    finally:
        for m in patched:
            del m.forward

