"""How a prompt is decoded (`Decoding`), and the small pieces around the decoding engine.

The ensemble of docs/method.md, step 6 (next-token logits l_b = sum_c w_{b,c} logits(M + Q_c))
is decoded by elrea.engine.Ensemble; this module holds what callers hand it: a resolved
`Decoding` per prompt, left padding, the rule for which decoded tokens are text, and PEFT's
weighted adapters (`mix_in_layers`: delta W = sum_c w_c B_c A_c, `add_weighted_adapter(...,
combination_type="cat")`, exact), which the engine uses where stacked LoRA does not apply.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


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
    (a server whose client went away); the row then stops at the next step. output_scores /
    output_logits (transformers' names): keep, for every chosen token, the mixed scores after
    the processors / the raw mixed logits; return_dict_in_generate: the caller reports ids and
    those in a transformers GenerateDecoderOnlyOutput, its rows padded with pad_token_id.
    """

    max_new_tokens: int = 64
    do_sample: bool = False
    processors: object = None            # LogitsProcessorList or None
    stopping: object = None              # StoppingCriteriaList or None
    eos_ids: frozenset = frozenset()
    generator: torch.Generator | None = None
    cancelled: bool = False
    output_scores: bool = False
    output_logits: bool = False
    return_dict_in_generate: bool = False
    pad_token_id: int | None = None      # pads returned ids (transformers' name); None: the run's pad id


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


def is_text(token: int | None, reason: str | None, decoding: Decoding) -> bool:
    """Whether a token from decode_steps belongs to the output: not a finished row's, and not
    the EOS id that ended its row (EOS ids are not text)."""
    return token is not None and not (reason == "stop" and token in decoding.eos_ids)


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
