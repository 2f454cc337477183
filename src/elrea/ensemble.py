"""Ensembled decoding and scoring over LoRA adapters (step 6 of docs/method.md).

At every decoding step the next-token logits of prompt b are

    l_b = sum_c w_{b,c} * logits(M + Q_c)

For speed, all adapters of all prompts run in ONE forward pass per step: the batch is
expanded to one row per (adapter, prompt) with w > 0, adapter-major, each row keeps its own KV
cache, and the rows' logits are summed back per prompt with the weights. Each row runs its own
adapter through `elrea.fastlora.grouped_lora` (two batched matmuls per layer for all
adapters), or through PEFT's mixed-adapter batches (`adapter_names`) where that does not
apply. With one adapter at weight 1 this is exactly that adapter's own decoding.

`mode="weights"` instead mixes the adapters inside each layer, delta W = sum_c w_c B_c A_c
(PEFT's `add_weighted_adapter(..., combination_type="cat")`, exact), one row per prompt.
"""

from __future__ import annotations

import contextlib

import torch

from . import fastlora
from .features import position_ids_from_mask
from .models import model_device


def _expand(weights: torch.Tensor, adapters: list[str], device: torch.device):
    """Rows (prompt index, adapter name, weight) for every w > 0, adapter-major; the index and
    weight tensors on `device`."""
    weights = weights.detach().to("cpu")
    rows = [(b, adapters[c], float(weights[b, c])) for c in range(weights.shape[1])
            for b in range(weights.shape[0]) if weights[b, c] > 0]
    prompt_of = torch.tensor([r[0] for r in rows], device=device)
    return prompt_of, [r[1] for r in rows], torch.tensor([r[2] for r in rows], device=device)


def left_pad(seqs: list[list[int]], pad_id: int, device: torch.device | str = "cpu"):
    """ids, attention mask [n, T] (long), sequences aligned to the right; built on the CPU and
    moved to `device` in one copy each."""
    T = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), T), pad_id, dtype=torch.long, device="cpu")
    mask = torch.zeros((len(seqs), T), dtype=torch.long, device="cpu")
    for i, s in enumerate(seqs):
        ids[i, T - len(s):] = torch.tensor(s, dtype=torch.long, device="cpu")
        mask[i, T - len(s):] = 1
    return ids.to(device, non_blocking=True), mask.to(device, non_blocking=True)


def _logits_processors(temperature: float, top_p: float):
    from transformers import LogitsProcessorList, TemperatureLogitsWarper, TopPLogitsWarper

    procs = LogitsProcessorList()
    if temperature > 0:
        procs.append(TemperatureLogitsWarper(temperature))
        if top_p < 1.0:
            procs.append(TopPLogitsWarper(top_p))
    return procs


def _row_adapters(model, names: list[str]):
    """(context manager, forward kwargs) that make row i of each batch run adapter names[i]."""
    if fastlora.supported(model, sorted(set(names))):
        return fastlora.grouped_lora(model, names), {}
    return contextlib.nullcontext(), {"adapter_names": names}


@torch.no_grad()
def generate(model, prompts: list[list[int]], weights: torch.Tensor, adapters: list[str], *,
             eos_id: int | None, pad_id: int, max_new_tokens: int = 64, temperature: float = 0.0,
             top_p: float = 1.0, generator: torch.Generator | None = None) -> list[list[int]]:
    """Ensembled decoding: new token ids for each prompt. weights [B, K] over `adapters`.

    Runs on the model's device (`generator`, when sampling, must be on that device too)."""
    B = len(prompts)
    device = model_device(model)
    prompt_of, names, row_w = _expand(weights, adapters, device)
    ids, mask = left_pad([prompts[b] for b in prompt_of.tolist()], pad_id, device)   # (R, T)
    procs = _logits_processors(temperature, top_p)
    done = torch.zeros(B, dtype=torch.bool, device=device)
    out_tokens = torch.zeros((B, 0), dtype=torch.long, device=device)
    cache, step_ids, pos = {}, ids, position_ids_from_mask(mask)
    per_row, kw = _row_adapters(model, names)
    with per_row:
        for _ in range(max_new_tokens):
            out = model(input_ids=step_ids, attention_mask=mask, position_ids=pos, use_cache=True,
                        logits_to_keep=1, **cache, **kw)  # only the last position
            cache = cache_kwargs(out)
            row_logits = out.logits[:, -1, :].float() * row_w[:, None]                # (R, V)
            logits = torch.zeros(B, row_logits.shape[1], device=device).index_add_(0, prompt_of, row_logits)
            logits = procs(out_tokens, logits)
            if temperature > 0:
                nxt = torch.multinomial(torch.softmax(logits, -1), 1, generator=generator).squeeze(1)
            else:
                nxt = logits.argmax(-1)
            nxt = torch.where(done, torch.full_like(nxt, pad_id), nxt)
            out_tokens = torch.cat([out_tokens, nxt[:, None]], dim=1)
            if eos_id is not None:
                done |= nxt == eos_id
            if bool(done.all()):
                break
            step_ids = nxt[prompt_of][:, None]                                         # (R, 1)
            mask = torch.cat([mask, torch.ones((mask.shape[0], 1), dtype=mask.dtype, device=device)], dim=1)
            pos = pos[:, -1:] + 1
    return [_strip(out_tokens[b].tolist(), eos_id) for b in range(B)]


def cache_kwargs(out) -> dict:
    """The KV cache of a forward's output as the kwarg for the next forward: `cache` in
    transformers >= 5.2x (which deprecates `past_key_values`), `past_key_values` before."""
    if "cache" in out:
        return {"cache": out["cache"]}
    return {"past_key_values": out["past_key_values"]}


def _strip(tokens: list[int], eos_id: int | None) -> list[int]:
    if eos_id is not None and eos_id in tokens:
        return tokens[: tokens.index(eos_id)]
    return tokens


@torch.no_grad()
def score(model, prompt: list[int], continuations: list[list[int]], weights: torch.Tensor,
          adapters: list[str], pad_id: int) -> list[float]:
    """Sum over continuation tokens of log softmax(sum_c w_c logits_c): one value per continuation.

    weights: [K] for this prompt. Runs on the model's device.
    """
    device = model_device(model)
    weights = weights.detach().to("cpu")
    keep = [c for c in range(len(adapters)) if weights[c] > 0]
    rows = [(j, c) for c in keep for j in range(len(continuations))]       # adapter-major
    ids, mask = left_pad([prompt + continuations[j] for j, _ in rows], pad_id, device)
    per_row, kw = _row_adapters(model, [adapters[c] for _, c in rows])
    with per_row:
        out = model(input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask),
                    use_cache=False, **kw)
    T = ids.shape[1]
    V = out.logits.shape[-1]
    combined = torch.zeros(len(continuations), T, V, device=device)
    for r, (j, c) in enumerate(rows):
        combined[j] += float(weights[c]) * out.logits[r].float()
    logp = torch.log_softmax(combined, dim=-1)
    scores = []
    for j, cont in enumerate(continuations):
        n = len(cont)
        target = torch.tensor(cont, dtype=torch.long, device=device)
        # token t of the continuation sits at T-n+t and is predicted at position T-n+t-1
        pred = logp[j, T - n - 1:T - 1]
        scores.append(float(pred.gather(1, target[:, None]).sum()))
    return scores


def mix_in_layers(peft_model, weights: torch.Tensor, adapters: list[str], prefix: str = "mix") -> list[str]:
    """One merged adapter per row of weights [B, K]: delta W = sum_c w_c s_c B_c A_c (exact)."""
    names = []
    for b in range(weights.shape[0]):
        keep = [c for c in range(len(adapters)) if weights[b, c] > 0]
        name = f"{prefix}_{b}"
        peft_model.add_weighted_adapter([adapters[c] for c in keep], [float(weights[b, c]) for c in keep],
                                        name, combination_type="cat")
        names.append(name)
    peft_model.eval()  # the new adapters' dropout modules are created in training mode
    return names
