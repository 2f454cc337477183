"""An lm-evaluation-harness backend: score a fitted ELREA run on MMLU, BBH, GSM8k, ...

    elrea lm-eval --model_args run=runs/mix --tasks mmlu,bbh     # lm-eval's own command line
    lm_eval --model elrea --model_args run=runs/mix ...           # lm-eval releases with entry points

    import lm_eval
    from elrea.integrations.lm_eval import ELREALM
    lm_eval.simple_evaluate(model=ELREALM(run="runs/mix"), tasks=["mmlu"])

model_args: run (required), device, dtype, batch_size, max_batch_size, router (default: the run's
routing.router), top_k, tau (routing temperature), max_length (rolling windows; default the run's
data.max_length), add_bos_token; lm-eval's own --device, --batch_size and --max_batch_size fill
the ones model_args leave out.
Each request is routed on its own context (its tokens, as they are: lm-eval has already
applied any chat template, with --apply_chat_template), then the experts' logits are mixed with
those weights: `loglikelihood` is the ensemble's score, `generate_until` its decoding stopped
at the request's `until` strings, `loglikelihood_rolling` its score over lm-eval's rolling windows.

batch_size: requests per forward (loglikelihood, across contexts) and prompts decoded together
(generate_until). "auto" (and lm-eval's "auto:N", whose re-detection schedule is moot here)
sizes each loglikelihood batch by memory instead: as many requests as fit half the free CUDA
memory (512 MiB on a CPU) by engine.score_many's estimate, at most max_batch_size; prompts then
decode the run's generation.batch_size at a time. The largest batch used is lm-eval's
`batch_sizes` (its summary line: "batch_size: auto (N)").
dtype: float32, bfloat16, float16, or auto (the run's model.dtype): the backbone's dtype.
"""

from __future__ import annotations

import json
import logging

from lm_eval.api.model import LM
from lm_eval.api.registry import register_model
from tqdm.auto import tqdm

log = logging.getLogger(__name__)

MODEL_ARGS = ("run", "device", "dtype", "batch_size", "max_batch_size", "router", "top_k", "tau", "max_length",
              "add_bos_token")
LM_EVAL_DEFAULT_DEVICE = "cuda:0"   # lm-eval's --device default, given whether or not the user asked for it


def _flag(value) -> bool:
    return value if isinstance(value, bool) else str(value).lower() in ("1", "true", "yes")


def parse_batch_size(value) -> int | str:
    """lm-eval's batch_size: a positive integer, "auto" or "auto:N" (as "auto"); None is 1."""
    from ..errors import ConfigError

    text = "1" if value is None else str(value).strip()
    if text == "auto" or text.startswith("auto:"):
        return "auto"
    if text.isdigit() and int(text) > 0:
        return int(text)
    raise ConfigError(f"lm-eval: batch_size {value!r}; valid: a positive integer, auto, auto:N")


@register_model("elrea")
class ELREALM(LM):
    def __init__(self, run: str | None = None, device: str | None = None, router: str | None = None,
                 top_k: int | None = None, tau: float | None = None, max_length: int | None = None,
                 add_bos_token: bool = False, batch_size=1, max_batch_size=None, dtype: str | None = None,
                 **unused):
        super().__init__()
        from ..api import ELREA
        from ..errors import ConfigError

        if not run:
            raise ConfigError("lm-eval: --model_args needs run=RUN_DIRECTORY (a run made by `elrea fit`)")
        if unused:
            log.warning("lm-eval: ignoring model_args %s (valid: %s)", ", ".join(sorted(unused)), ", ".join(MODEL_ARGS))
        self.batch_size = parse_batch_size(batch_size)
        self.max_batch_size = None if max_batch_size is None else int(max_batch_size)
        self.batch_sizes: dict[int, int] = {}   # what lm-eval's summary shows after "auto"
        self.model = ELREA.from_pretrained(run, backbone=_backbone(run, device, dtype))
        self.tok = self.model.tokenizer
        self.route_kwargs = {"router": router, "top_k": None if top_k is None else int(top_k),
                             "tau": None if tau is None else float(tau)}
        self.model.check_routing(**self.route_kwargs)   # an unknown router fails now, naming the valid ones
        if self.batch_size != "auto":   # this backend's own model: generate() decodes that many together
            self.model.config.generation.batch_size = self.batch_size
        self.max_length = int(max_length or self.model.formatter.max_length)
        self.add_bos_token = _flag(add_bos_token)
        self._device = self.model.device
        self._chat = False        # whether lm-eval applies the chat template (--apply_chat_template)
        self._warned_raw = False

    @classmethod
    def create_from_arg_obj(cls, arg_dict: dict, additional_config: dict | None = None) -> "ELREALM":
        """model_args win over lm-eval's own --device/--batch_size/--max_batch_size. lm-eval's
        device is cuda:0 unless told: on a machine without CUDA that default quietly becomes the
        run's device."""
        import torch

        extra = {k: v for k, v in (additional_config or {}).items() if v is not None and k not in arg_dict}
        if extra.get("device") == LM_EVAL_DEFAULT_DEVICE and not torch.cuda.is_available():
            log.debug("lm-eval: its default device %s is not available here; using the run's", extra.pop("device"))
        return cls(**arg_dict, **extra)

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None) -> "ELREALM":
        from lm_eval.utils import simple_parse_args_string

        return cls.create_from_arg_obj(simple_parse_args_string(arg_string), additional_config)

    def get_model_info(self) -> dict:
        """What lm-eval's results JSON records of the model (config), beside its own fields."""
        return {"model_dtype": str(self.model.engine.dtype), "elrea_run": str(self.model.run_dir),
                "elrea_router": self.route_kwargs["router"] or self.model.config.routing.router,
                "model_num_parameters": sum(p.numel() for p in self.model.model.parameters())}

    def _warn_raw_prompts(self) -> None:
        """Once, as lm-eval warns for instruct models: a backbone with a chat template (the run's
        experts were trained through it) gets lm-eval's prompts raw unless --apply_chat_template."""
        if self._chat or self._warned_raw or not getattr(self.tok, "chat_template", None):
            return
        self._warned_raw = True
        log.warning("run=%s: its backbone %s has a chat template (the run's adapters were trained through it), "
                    "but chat template is not applied: prompts go in raw. Recommend setting "
                    "`--apply_chat_template` (optionally `--fewshot_as_multiturn`).",
                    self.model.run_dir, self.model.config.model.name)

    # ------------------------------------------------------------------ the three requests

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        """All requests at once: each distinct context routed once, then `batch_size` requests
        (whatever their contexts) per forward of the stacked adapters."""
        self._warn_raw_prompts()
        pairs = [r.args for r in requests]
        bar = tqdm(total=len(pairs), desc="loglikelihood", disable=disable_tqdm)
        sizes = []

        def done(n):
            sizes.append(n)
            bar.update(n)

        auto = self.batch_size == "auto"
        out = self.model.loglikelihood(pairs, add_special_tokens=self.add_bos_token,
                                       batch_size=None if auto else self.batch_size,
                                       max_batch_size=self.max_batch_size, on_batch=done, **self.route_kwargs)
        bar.close()
        if auto and sizes:
            self.batch_sizes[len(self.batch_sizes)] = max(sizes)
        for args, res in zip(pairs, out):
            self.cache_hook.add_partial("loglikelihood", args, res)
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """lm-eval's disjoint rolling windows of every document (each token predicted once, after
        the EOS token); each document routed once on its first window, then the windows of all
        documents scored together, `batch_size` per forward of the stacked adapters (longest
        first), and each document's sum returned."""
        from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

        from ..data import Encoded

        self._warn_raw_prompts()
        if not requests:
            return []
        eos = self.tok.eos_token_id
        docs = [self.tok(r.args[0], add_special_tokens=False)["input_ids"] for r in requests]
        heads = [ids[:self.max_length] or [eos] for ids in docs]
        w = self.model.route([Encoded(h, [-100] + h[1:]) for h in heads], **self.route_kwargs)
        windows, owner = [], []
        for d, ids in enumerate(docs):
            for ctx, pred in map(make_disjoint_window, get_rolling_token_windows(
                    ids, prefix_token=eos, max_seq_len=self.max_length, context_len=1)):
                windows.append((list(ctx), list(pred)))
                owner.append(d)
        bar = tqdm(total=len(windows), desc="loglikelihood_rolling", disable=disable_tqdm)
        auto = self.batch_size == "auto"
        scores = self.model.engine.score_many(windows, w[owner], batch_size=None if auto else self.batch_size,
                                              max_batch_size=self.max_batch_size, on_batch=bar.update)
        bar.close()
        totals = [0.0] * len(docs)
        for d, score in zip(owner, scores):   # in window order, as a one-window-at-a-time sum adds them
            totals[d] += score
        for r, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", r.args, total)
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Requests with the same generation arguments are decoded together, `batch_size` prompts
        at a time (auto: the run's generation.batch_size)."""
        self._warn_raw_prompts()
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
        self._chat = True
        return self.tok.apply_chat_template(chat_history, tokenize=False, add_generation_prompt=add_generation_prompt,
                                            continue_final_message=not add_generation_prompt)

    @property
    def tokenizer_name(self) -> str:
        return self.tok.name_or_path.replace("/", "__")

    def chat_template(self, chat_template: bool | str = False) -> str | None:
        self._chat = self._chat or chat_template is not False   # lm-eval asks only with --apply_chat_template
        return self.tok.chat_template if chat_template is not False else None


DTYPES = ("auto", "float32", "bfloat16", "float16")


def _backbone(run: str, device: str | None, dtype: str | None):
    """The run's backbone on `device` (default: the run's model.device) in `dtype` (default, or
    "auto": the run's model.dtype), loaded for ELREA.from_pretrained."""
    import torch

    from ..api import _local_run
    from ..distributed import resolve_device
    from ..errors import ConfigError
    from ..models import load_backbone
    from ..rundir import Run

    if device and str(device).startswith("cuda") and not torch.cuda.is_available():
        log.info("lm-eval: device %s is not available on this machine; using the run's device", device)
        device = None
    dtype = "auto" if dtype is None else str(dtype).removeprefix("torch.")
    if dtype not in DTYPES:
        raise ConfigError(f"lm-eval: dtype {dtype!r}; valid: {', '.join(DTYPES)}")
    run_dir = Run(_local_run(run))
    if not run_dir.manifest.exists():
        return None   # ELREA.from_pretrained says what is wrong with the directory
    cfg = run_dir.config().model
    if dtype != "auto":
        cfg.dtype = dtype
    return load_backbone(cfg, resolve_device(device or cfg.device))


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
