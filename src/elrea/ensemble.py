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
from dataclasses import dataclass

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


@dataclass
class Decoding:
    """How one prompt is decoded: a resolved transformers GenerationConfig.

    processors: transformers logits processors/warpers applied to the mixed logits (their
    input_ids are the prompt, left-padded, followed by the new tokens); stopping: transformers
    stopping criteria (e.g. StopStringCriteria) on the same ids; eos_ids: every id that ends
    the sequence (Llama-3 and Qwen have several). `cancelled` may be set from another thread
    (a server whose client went away); the row then stops at the next step.
    """

    max_new_tokens: int = 64
    do_sample: bool = False
    processors: object = None            # LogitsProcessorList or None
    stopping: object = None              # StoppingCriteriaList or None
    eos_ids: frozenset = frozenset()
    generator: torch.Generator | None = None
    cancelled: bool = False


def sampling(temperature: float = 0.0, top_p: float = 1.0, max_new_tokens: int = 64,
             eos_ids=(), generator: torch.Generator | None = None) -> Decoding:
    """The simple case: greedy when temperature is 0, else temperature + nucleus sampling."""
    from transformers import LogitsProcessorList, TemperatureLogitsWarper, TopPLogitsWarper

    procs = LogitsProcessorList()
    if temperature > 0:
        procs.append(TemperatureLogitsWarper(temperature))
        if top_p < 1.0:
            procs.append(TopPLogitsWarper(top_p))
    return Decoding(max_new_tokens, temperature > 0, procs, None, frozenset(eos_ids), generator)


def _row_adapters(model, names: list[str]):
    """(context manager, forward kwargs) that make row i of each batch run adapter names[i]."""
    if fastlora.supported(model, sorted(set(names))):
        return fastlora.grouped_lora(model, names), {}
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


def is_text(token: int | None, reason: str | None, decoding: Decoding) -> bool:
    """Whether a token from decode_steps belongs to the output: not a finished row's, and not
    the EOS id that ended its row (EOS ids are not text)."""
    return token is not None and not (reason == "stop" and token in decoding.eos_ids)


def cache_kwargs(out) -> dict:
    """The KV cache of a forward's output as the kwarg for the next forward: `cache` in
    transformers >= 5.2x (which deprecates `past_key_values`), `past_key_values` before."""
    if "cache" in out:
        return {"cache": out["cache"]}
    return {"past_key_values": out["past_key_values"]}


@torch.no_grad()
def score(model, prompt: list[int], continuations: list[list[int]], weights: torch.Tensor,
          adapters: list[str], pad_id: int, greedy: bool = False) -> list:
    """Sum over continuation tokens of log softmax(sum_c w_c logits_c): one value per continuation
    (with greedy=True, (value, whether every token is the mixed logits' argmax)).

    weights: [K] for this prompt. One forward for all (adapter, continuation) rows, on the
    model's device; only the positions that predict continuation tokens are mixed.
    """
    device = model_device(model)
    weights = weights.detach().to("cpu")
    keep = [c for c in range(len(adapters)) if weights[c] > 0]
    rows = [(j, c) for c in keep for j in range(len(continuations))]       # adapter-major
    ids, mask = left_pad([prompt + continuations[j] for j, _ in rows], pad_id, device)
    per_row, kw = _row_adapters(model, [adapters[c] for _, c in rows])
    L = max(len(c) for c in continuations)
    with per_row:
        out = model(input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask),
                    use_cache=False, logits_to_keep=L + 1, **kw)
    logits = out.logits[:, -(L + 1):-1]                                     # (R, L, V): predict the last L
    combined = torch.zeros(len(continuations), L, logits.shape[-1], device=device)
    for r, (j, c) in enumerate(rows):
        combined[j] += float(weights[c]) * logits[r].float()
    logp = torch.log_softmax(combined, dim=-1)
    scores = []
    for j, cont in enumerate(continuations):
        n = len(cont)
        if n == 0:
            scores.append((0.0, True) if greedy else 0.0)
            continue
        target = torch.tensor(cont, dtype=torch.long, device=device)
        pred = logp[j, L - n:]                  # token t of the continuation is predicted at L-n+t
        value = float(pred.gather(1, target[:, None]).sum())
        scores.append((value, bool((pred.argmax(-1) == target).all())) if greedy else value)
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
