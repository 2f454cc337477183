"""An lm-evaluation-harness backend: score a fitted ELREA run on MMLU, BBH, GSM8k, ...

    elrea lm-eval --model_args run=runs/mix --tasks mmlu,bbh     # lm-eval's own command line
    lm_eval --model elrea --model_args run=runs/mix ...           # lm-eval releases with entry points

    import lm_eval
    from elrea.integrations.lm_eval import ELREALM
    lm_eval.simple_evaluate(model=ELREALM(run="runs/mix"), tasks=["mmlu"])

model_args: run (required), device, router (default: the run's routing.router), top_k, tau (routing
temperature), max_length (rolling windows; default the run's data.max_length), add_bos_token.
Each request is routed on its own context (its tokens, as they are: lm-eval has already
applied any chat template), then the experts' logits are mixed with those weights:
`loglikelihood` is the ensemble's score, `generate_until` its decoding stopped at the
request's `until` strings, `loglikelihood_rolling` its score over lm-eval's rolling windows.
"""

from __future__ import annotations

import json
import logging

from lm_eval.api.model import LM
from lm_eval.api.registry import register_model
from tqdm.auto import tqdm

log = logging.getLogger(__name__)


def _flag(value) -> bool:
    return value if isinstance(value, bool) else str(value).lower() in ("1", "true", "yes")


@register_model("elrea")
class ELREALM(LM):
    def __init__(self, run: str | None = None, device: str | None = None, router: str | None = None,
                 top_k: int | None = None, tau: float | None = None, max_length: int | None = None,
                 add_bos_token: bool = False, batch_size=None, max_batch_size=None, **unused):
        super().__init__()
        from ..api import ELREA
        from ..errors import ConfigError

        if not run:
            raise ConfigError("lm-eval: --model_args needs run=RUN_DIRECTORY (a run made by `elrea fit`)")
        if unused:
            log.warning("lm-eval: ignoring model_args %s (valid: run, device, router, top_k, tau, max_length, "
                        "add_bos_token)", ", ".join(sorted(unused)))
        import torch

        if device and str(device).startswith("cuda") and not torch.cuda.is_available():
            # lm-eval's own default is cuda:0 even on machines without one
            log.warning("lm-eval: device %s is not available here; using the run's device (auto)", device)
            device = None
        self.model = ELREA.from_pretrained(run, device=device)
        self.tok = self.model.tokenizer
        self.route_kwargs = {"router": router, "top_k": None if top_k is None else int(top_k),
                             "tau": None if tau is None else float(tau)}
        self.max_length = int(max_length or self.model.formatter.max_length)
        self.add_bos_token = _flag(add_bos_token)
        self._device = self.model.device

    @classmethod
    def create_from_arg_obj(cls, arg_dict: dict, additional_config: dict | None = None) -> "ELREALM":
        """model_args win over lm-eval's own --device/--batch_size (whose device defaults to cuda:0)."""
        extra = {k: v for k, v in (additional_config or {}).items() if v is not None and k not in arg_dict}
        return cls(**arg_dict, **extra)

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None) -> "ELREALM":
        from lm_eval.utils import simple_parse_args_string

        return cls.create_from_arg_obj(simple_parse_args_string(arg_string), additional_config)

    # ------------------------------------------------------------------ the three requests

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        out = []
        for chunk in _chunks(requests, 32, disable_tqdm, "loglikelihood"):
            pairs = [r.args for r in chunk]
            results = self.model.loglikelihood(pairs, add_special_tokens=self.add_bos_token, **self.route_kwargs)
            for args, res in zip(pairs, results):
                self.cache_hook.add_partial("loglikelihood", args, res)
            out += results
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

        from ..data import Encoded

        out = []
        for r in tqdm(requests, desc="loglikelihood_rolling", disable=disable_tqdm):
            (text,) = r.args
            ids = self.tok(text, add_special_tokens=False)["input_ids"]
            head = ids[:self.max_length] or [self.tok.eos_token_id]
            w = self.model.route([Encoded(head, [-100] + head[1:])], **self.route_kwargs)[0]
            total = 0.0
            for ctx, pred in map(make_disjoint_window, get_rolling_token_windows(
                    ids, prefix_token=self.tok.eos_token_id, max_seq_len=self.max_length, context_len=1)):
                total += self.model.engine.score(ctx, [pred], w)[0]
            self.cache_hook.add_partial("loglikelihood_rolling", (text,), total)
            out.append(total)
        return out

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Requests with the same generation arguments are decoded together."""
        groups: dict[str, list[int]] = {}
        for i, r in enumerate(requests):
            groups.setdefault(json.dumps(r.args[1], sort_keys=True, default=str), []).append(i)
        out: list[str | None] = [None] * len(requests)
        bar = tqdm(total=len(requests), desc="generate_until", disable=disable_tqdm)
        for key, idx in groups.items():
            kwargs = dict(requests[idx[0]].args[1])
            until = kwargs.pop("until", None) or [self.tok.decode([self.tok.eos_token_id])]
            until = [until] if isinstance(until, str) else list(until)
            gen = {"max_new_tokens": int(kwargs.pop("max_gen_toks", 256)), "stop_strings": until}
            for name in ("do_sample", "temperature", "top_p", "top_k", "min_p", "repetition_penalty"):
                if name in kwargs:
                    gen[name] = kwargs.pop(name)
            if gen.get("temperature") == 0:
                gen["do_sample"] = False
            contexts = [self.model.formatter.encode_raw(requests[i].args[0], self.add_bos_token) for i in idx]
            w = self.model.route(contexts, **self.route_kwargs)
            texts = self.model.generate(contexts, weights=w, **gen)
            for i, text in zip(idx, texts):
                for term in until:  # lm-eval's convention: the text before the first stop string
                    text = text.split(term)[0]
                out[i] = text
                self.cache_hook.add_partial("generate_until", requests[i].args, text)
            bar.update(len(idx))
        bar.close()
        return out

    # ------------------------------------------------------------------ chat templates

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        return self.tok.apply_chat_template(chat_history, tokenize=False, add_generation_prompt=add_generation_prompt,
                                            continue_final_message=not add_generation_prompt)

    @property
    def tokenizer_name(self) -> str:
        return self.tok.name_or_path.replace("/", "__")

    def chat_template(self, chat_template: bool | str = False) -> str | None:
        return self.tok.chat_template if chat_template is not False else None


def _chunks(requests, size: int, disable: bool, desc: str):
    bar = tqdm(total=len(requests), desc=desc, disable=disable)
    for s in range(0, len(requests), size):
        yield requests[s:s + size]
        bar.update(min(size, len(requests) - s))
    bar.close()


def main(argv: list[str]) -> int:
    """`elrea lm-eval ...`: lm-eval's own command line with the elrea backend registered."""
    import sys

    from lm_eval._cli import HarnessCLI
    from lm_eval.utils import setup_logging

    sub, rest = (argv[0], argv[1:]) if argv and argv[0] in ("run", "ls", "validate") else ("run", list(argv))
    if sub == "run" and "--model" not in rest and not any(a.startswith("--model=") for a in rest):
        rest = ["--model", "elrea", *rest]
    setup_logging()
    saved, sys.argv = sys.argv, ["lm-eval", sub, *rest]
    try:
        cli = HarnessCLI()
        cli.execute(cli.parse_args())
    finally:
        sys.argv = saved
    return 0
