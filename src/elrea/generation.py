"""Generation arguments as transformers users write them, resolved into an ensemble `Decoding`.

`ELREA.generate(prompts, max_new_tokens=..., do_sample=..., temperature=..., top_p=...,
top_k=..., min_p=..., repetition_penalty=..., stop_strings=..., eos_token_id=..., pad_token_id=...,
return_dict_in_generate=..., output_scores=..., output_logits=...)`, or a
`transformers.GenerationConfig`, on top of the run's `generation` defaults. The result is
built from transformers' own logits processors and stopping criteria, in the order
`generate()` applies them (repetition penalty, then temperature, top-k, top-p, min-p).
Conventions: greedy unless `do_sample` (or, elrea's shorthand, a temperature > 0 given
without `do_sample`); decoding stops on every id of `eos_token_id` (a list for Llama-3 and
Qwen), and on a stop string after the token that completes it (the string is kept, as in
transformers). `tokenizer=`, which transformers requires with `stop_strings`, is accepted when
it is the run's tokenizer (the same vocabulary): stop strings are always matched with the run's.
`pad_token_id` pads the ids returned (token ids in, or return_dict_in_generate), as in
transformers. use_cache, num_beams=1, num_return_sequences=1 and output_attentions /
output_hidden_states=False are accepted as the no-ops they are here; other values are refused.
"""

from __future__ import annotations

import torch

from .ensemble import Decoding
from .errors import ConfigError

# what elrea's decoding implements; anything else is an error that lists these
GENERATION_ARGS = ("max_new_tokens", "do_sample", "temperature", "top_p", "top_k", "min_p",
                   "repetition_penalty", "stop_strings", "eos_token_id", "pad_token_id", "return_dict_in_generate",
                   "output_scores", "output_logits")
# transformers arguments elrea's decoding has no other value for: accepted at these values (and
# use_cache at any: elrea always decodes with its KV cache, the output is the same), else refused
NEUTRAL = {"num_beams": 1, "num_return_sequences": 1, "output_attentions": False, "output_hidden_states": False}
# what ELREA.generate takes besides these (listed when a name is unknown)
OTHER_ARGS = ("generation_config", "seed", "weights", "mode", "raw", "streamer", "tokenizer", "input_ids",
              "attention_mask")


def eos_ids(model, tokenizer) -> list[int]:
    """Every id that ends a sequence: the model's generation_config (int or list) and the tokenizer's."""
    ids: list[int] = []
    gc = getattr(model, "generation_config", None)
    for source in (getattr(gc, "eos_token_id", None), tokenizer.eos_token_id):
        for i in (source if isinstance(source, (list, tuple)) else [source]):
            if i is not None and int(i) not in ids:
                ids.append(int(i))
    return ids


def resolve(run_defaults, run_tokenizer, default_eos: list[int], device, generation_config=None,
            seed: int | None = None, tokenizer=None, **kwargs) -> Decoding:
    """A Decoding from the run's GenerationConfig section, a transformers GenerationConfig and
    keyword arguments (later ones win). Unknown arguments are an error naming the valid ones;
    `tokenizer` (the caller's, as transformers asks with stop_strings) must be the run's."""
    kwargs.pop("use_cache", None)
    given = generation_config.to_diff_dict() if generation_config is not None else {}
    for name, neutral in NEUTRAL.items():
        for where, v in (("", kwargs.pop(name, None)), ("generation_config.", given.get(name))):
            if v is not None and v != neutral:
                raise ConfigError(f"generate: {where}{name}={v!r} is not supported: elrea's ensembled decoding "
                                  f"is greedy or sampled, one sequence per prompt, without attentions or hidden "
                                  f"states; leave {name} out (or set it to {neutral!r})")
    unknown = sorted(set(kwargs) - set(GENERATION_ARGS))
    if unknown:
        raise ConfigError(f"generate: unknown argument(s) {', '.join(map(repr, unknown))}; valid: "
                          f"{', '.join(GENERATION_ARGS + OTHER_ARGS)}")
    check_tokenizer(tokenizer, run_tokenizer)
    args = {"max_new_tokens": run_defaults.max_new_tokens, "temperature": run_defaults.temperature,
            "top_p": run_defaults.top_p, "eos_token_id": default_eos}
    args.update({k: given[k] for k in GENERATION_ARGS if k in given and given[k] is not None})
    explicit = {k: v for k, v in kwargs.items() if v is not None}
    args.update(explicit)
    temperature = float(args.get("temperature") or 0.0)
    do_sample = bool(args["do_sample"]) if "do_sample" in args else temperature > 0
    if do_sample and temperature <= 0:
        temperature = 1.0 if "temperature" not in explicit else temperature
        if temperature <= 0:
            raise ConfigError("generate: do_sample=True needs temperature > 0")
    _check(args)
    eos = args["eos_token_id"]
    eos = frozenset(int(i) for i in (eos if isinstance(eos, (list, tuple, set, frozenset)) else [eos])
                    if i is not None)
    generator = None
    if do_sample:
        generator = torch.Generator(device=device)
        if seed is not None:
            generator.manual_seed(int(seed))
        else:
            generator.seed()  # a fresh, non-deterministic seed
    return Decoding(int(args["max_new_tokens"]), do_sample, _processors(args, temperature, do_sample),
                    _stopping(args.get("stop_strings"), run_tokenizer), eos, generator,
                    output_scores=bool(args.get("output_scores")), output_logits=bool(args.get("output_logits")),
                    return_dict_in_generate=bool(args.get("return_dict_in_generate")),
                    pad_token_id=None if args.get("pad_token_id") is None else int(args["pad_token_id"]))


def check_tokenizer(given, run_tokenizer) -> None:
    """Refuse a `tokenizer=` whose vocabulary is not the run's (ConfigError saying how they differ):
    its ids would not be the model's. The run's own, or a copy loaded from the same files, passes."""
    if given is None or given is run_tokenizer:
        return
    if not callable(getattr(given, "get_vocab", None)):
        raise ConfigError(f"generate: tokenizer must be a transformers tokenizer, got {type(given).__name__}")
    theirs, ours = given.get_vocab(), run_tokenizer.get_vocab()
    if theirs == ours:
        return
    if len(theirs) != len(ours):
        how = f"{len(theirs)} tokens against the run's {len(ours)}"
    else:
        token = min(t for t in theirs if theirs[t] != ours.get(t))
        how = (f"{token!r} is id {theirs[token]} in it and " +
               (f"id {ours[token]}" if token in ours else "not a token") + " in the run's")
    raise ConfigError(f"generate: tokenizer= ({getattr(given, 'name_or_path', '?')}) is not this run's tokenizer "
                      f"({getattr(run_tokenizer, 'name_or_path', '?')}): {how}. elrea decodes, and matches stop "
                      "strings, with the run's tokenizer; pass tokenizer=model.tokenizer, or leave tokenizer= out")


def _check(args: dict) -> None:
    if not isinstance(args["max_new_tokens"], int) or args["max_new_tokens"] < 1:
        raise ConfigError(f"generate: max_new_tokens must be an integer >= 1, got {args['max_new_tokens']!r}")
    for name in ("output_scores", "output_logits"):
        if args.get(name) and not args.get("return_dict_in_generate"):
            raise ConfigError(f"generate: {name}=True needs return_dict_in_generate=True (they come back in a "
                              "GenerateDecoderOnlyOutput, as in transformers)")
    for name, lo, hi in (("top_p", 0.0, 1.0), ("min_p", 0.0, 1.0)):
        v = args.get(name)
        if v is not None and not lo < float(v) <= hi:
            raise ConfigError(f"generate: {name} must be in ({lo:g}, {hi:g}], got {v!r}")
    if args.get("top_k") is not None and int(args["top_k"]) < 0:
        raise ConfigError(f"generate: top_k must be >= 0, got {args['top_k']!r}")
    if args.get("repetition_penalty") is not None and float(args["repetition_penalty"]) <= 0:
        raise ConfigError(f"generate: repetition_penalty must be > 0, got {args['repetition_penalty']!r}")


def _processors(args: dict, temperature: float, do_sample: bool):
    from transformers import (LogitsProcessorList, MinPLogitsWarper, RepetitionPenaltyLogitsProcessor,
                              TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper)

    procs = LogitsProcessorList()
    if args.get("repetition_penalty") not in (None, 1.0):
        procs.append(RepetitionPenaltyLogitsProcessor(float(args["repetition_penalty"])))
    if do_sample:
        if temperature != 1.0:
            procs.append(TemperatureLogitsWarper(temperature))
        if args.get("top_k"):
            procs.append(TopKLogitsWarper(int(args["top_k"])))
        if args.get("top_p") not in (None, 1.0):
            procs.append(TopPLogitsWarper(float(args["top_p"])))
        if args.get("min_p"):
            procs.append(MinPLogitsWarper(float(args["min_p"])))
    return procs


def _stopping(stop_strings, tokenizer):
    if not stop_strings:
        return None
    from transformers import StoppingCriteriaList, StopStringCriteria

    strings = [stop_strings] if isinstance(stop_strings, str) else list(stop_strings)
    if not all(isinstance(s, str) and s for s in strings):
        raise ConfigError(f"generate: stop_strings must be non-empty strings, got {stop_strings!r}")
    return StoppingCriteriaList([StopStringCriteria(tokenizer, strings)])


class TextStream:
    """Incremental detokenisation: feed token ids one at a time, get the new text each adds.

    A token that ends inside a multi-byte character decodes to U+FFFD until the next one
    completes it, so such text is held back rather than sent half-formed.
    """

    def __init__(self, tokenizer, skip_special_tokens: bool = True):
        self.tok, self.skip = tokenizer, skip_special_tokens
        self.ids: list[int] = []
        self.sent = 0  # characters of the decoded text already returned

    def push(self, token_id: int) -> str:
        self.ids.append(int(token_id))
        text = self.tok.decode(self.ids, skip_special_tokens=self.skip)
        if text.endswith("\ufffd"):
            return ""
        new, self.sent = text[self.sent:], len(text)
        return new

    @property
    def text(self) -> str:
        return self.tok.decode(self.ids, skip_special_tokens=self.skip)
