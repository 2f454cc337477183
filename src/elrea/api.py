"""`ELREA`: a fitted ensemble, loaded from a run directory, that routes, generates and scores.

    model = ELREA.from_pretrained("runs/demo")
    w = model.route(["What is 3 + 4?"])            # Tensor [1, C+1]; column 0 = base adapter
    model.generate(["What is 3 + 4?"])             # ensembled greedy decoding
    model.generate(**tok(texts, return_tensors="pt", padding=True))   # ids in, ids out, as model.generate
    model.score("What is 3 + 4?", ["7", "8"])     # summed log-prob of each continuation
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from . import ensemble
from .engine import Ensemble, is_text
from .config import RunConfig
from .data import PromptFormatter
from .errors import ConfigError, RunDirError
from .features import Featurizer
from .models import load_backbone, load_tokenizer, model_device
from .rundir import Manifest, Run, atomic_path
from .stages import STAGES

log = logging.getLogger(__name__)


class ELREA:
    """A PEFT model holding the base adapter ("base") and experts ("expert_1".."expert_C").

    Everything runs on the backbone's device (`device` of `from_pretrained`); results come
    back on the CPU (routing weights, token ids, scores).
    """

    def __init__(self, model, tokenizer, config: RunConfig, centroids: torch.Tensor, run_dir: Path,
                 feature_mean: torch.Tensor | None = None, stages: dict | None = None):
        self.model, self.tokenizer, self.config = model, tokenizer, config
        self.device = model_device(model)
        self.centroids = centroids.to(self.device, torch.float32)   # (C+1, d)
        # the mean training feature when the run centred its features (features.center), else None
        self.feature_mean = None if feature_mean is None else feature_mean.to(self.device, torch.float32)
        self.run = Run(run_dir)
        self.run_dir = self.run.root
        # the manifest's stages as loaded: what this model is (its fingerprints), for readers that
        # must not mix it with a later fit of the same directory
        self.stages = stages if stages is not None else Manifest.load(self.run.root).data.get("stages", {})
        self._routers: dict = {}
        self.adapters = ["base"] + [f"expert_{c}" for c in range(1, centroids.shape[0])]
        c = config
        # the one owner of the adapters and the KV cache: every decode, score and adapter switch
        self.engine = Ensemble(model, self.adapters, tokenizer.pad_token_id, compile=c.generation.compile,
                               sync_every=c.generation.sync_every)
        self.formatter = PromptFormatter(tokenizer, c.data.system_prompt, c.data.max_length, "left")
        self.featurizer = Featurizer.for_run(model, c, self.run.base, tokenizer.pad_token_id,
                                             c.features.test_preconditioner, batch_size=c.routing.batch_size)

    # ------------------------------------------------------------------ loading / saving

    @classmethod
    def from_pretrained(cls, run_dir: str | Path, backbone=None, device: str | torch.device | None = None
                        ) -> "ELREA":
        """Load a fitted run directory (JSON + safetensors only) onto `device`.

        device: "auto" (CUDA if available, else CPU), "cpu", "cuda", "cuda:1", ... Default: the
        run config's `model.device`. Ignored when `backbone` (already placed) is given.
        """
        from peft import PeftModel
        from safetensors.torch import load_file

        run = Run(_local_run(run_dir))
        manifest, config = run.check_loadable()
        tokenizer = load_tokenizer(config.model)
        if backbone is None:
            from .distributed import resolve_device

            if not isinstance(device, torch.device):  # a name: resolve it (a torch.device is already placed)
                device = resolve_device(device or config.model.device)
            backbone = load_backbone(config.model, device)
        cpath = run.centroids
        try:
            stored = load_file(str(cpath))
            centroids, mean = stored["centroids"], stored.get("feature_mean")
        except Exception as e:  # noqa: BLE001 - missing or truncated file
            raise RunDirError(f"{cpath}: missing or corrupt ({e}); re-run `elrea fit --from clusters`") from None
        model = _load_adapter(PeftModel.from_pretrained, backbone, run.base, "base")
        for c in range(1, centroids.shape[0]):
            _load_adapter(model.load_adapter, None, run.expert(c), f"expert_{c}")
        _check_finite(model, {"base": run.base, **{f"expert_{c}": run.expert(c) for c in range(1, centroids.shape[0])}})
        if not torch.isfinite(centroids).all():
            raise RunDirError(f"{cpath}: non-finite centroids (NaN or inf); re-run `elrea fit --from clusters`")
        model.set_adapter("base")
        model.eval()
        loaded = cls(model, tokenizer, config, centroids, run.root, feature_mean=mean,
                     stages=manifest.data.get("stages", {}))
        loaded.load_routers()  # now, with the adapters: a later fit of this directory cannot mix in
        return loaded

    def save_pretrained(self, out_dir: str | Path, include_eval: bool = False) -> Path:
        """Write what the run ships to `out_dir` (elrea.card.stage_copy): what inference and the
        card need (Run.SHIPPED: manifest, config, adapters, clusters, routers, card, report), and
        eval.json, every test prompt, reference and output, only with `include_eval`. Local paths
        are kept, so that the copy loads on this machine; `elrea push` uploads a copy without them."""
        from .card import stage_copy

        out_dir = Path(out_dir)
        with atomic_path(out_dir, is_dir=True) as tmp:
            stage_copy(self.run.root, tmp, include_eval=include_eval, portable=False, where=str(out_dir))
        return out_dir

    # ------------------------------------------------------------------ inference

    def _messages(self, prompt) -> list[dict]:
        return [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt

    def encode(self, prompts, raw: bool = False, attention_mask=None) -> list:
        """data.Encoded of each prompt: a string (one user turn) or chat messages through the chat
        template exactly as in training; with raw=True, strings tokenised as they are (no template).
        Already-encoded prompts pass through. One prompt (a string, or one chat: a list of
        {role, content} dicts) or a list of them. Token ids as transformers' generate takes them
        (data.token_id_rows: a tensor [n, T] or [T], lists of ints, a BatchEncoding; padding
        removed with `attention_mask`, else the pad id at either end) are taken as they are."""
        from .data import Encoded, encode_ids, is_token_ids, token_id_rows

        if is_token_ids(prompts):
            vocab = self.model.get_input_embeddings().num_embeddings
            return [encode_ids(r) for r in token_id_rows(prompts, attention_mask, self.engine.pad_id, vocab)]
        if attention_mask is not None:
            raise ConfigError("attention_mask: only for prompts given as token ids")
        single_chat = isinstance(prompts, list) and prompts and all(isinstance(m, dict) for m in prompts)
        prompts = [prompts] if isinstance(prompts, (str, Encoded)) or single_chat else list(prompts)
        out = []
        for p in prompts:
            if isinstance(p, Encoded):
                out.append(p)
            elif raw:
                if not isinstance(p, str):
                    raise ConfigError(f"raw prompts must be strings, got {type(p).__name__}")
                out.append(self.formatter.encode_raw(p))
            else:
                out.append(self.formatter.encode_instruction(self._messages(p)))
        return out

    def prompt_ids(self, prompt) -> list[int]:
        return self.encode(prompt)[0].input_ids

    def features(self, prompts: list) -> torch.Tensor:
        """Unit routing features [n, d] on the model's device: instruction-only gradients of the
        base adapter (docs/method.md, step 5). Prompts as for `encode`."""
        with self.engine.only("base"):
            return self.featurizer.features(self.encode(prompts))

    def check_current(self) -> None:
        """Refuse (RunDirError) when the run directory no longer holds the fit this model loaded:
        a stage it uses was re-run since (say, `elrea fit --from clusters` while it evaluated)."""
        now = Manifest.load(self.run.root).data.get("stages", {})
        for stage in (s.name for s in STAGES if s.hashed):   # the stages whose files a loaded model uses
            was, is_ = self.stages.get(stage, {}), now.get(stage, {})
            if (was.get("fingerprint"), was.get("status")) != (is_.get("fingerprint"), is_.get("status")):
                raise RunDirError(f"{self.run.root}: its {stage} stage was re-run after this model was loaded, "
                                  "so results of the loaded model would describe a model the directory no longer "
                                  "holds; nothing was written. Load the run again (re-run the command).")

    def load_routers(self) -> None:
        """Build every registered router from the run's files now (from_pretrained does), so that
        what the model serves is one fit's, whatever is written to the directory later; a router
        that cannot be built keeps its error for when it is asked for."""
        from .registry import ROUTERS

        for name in ROUTERS.names():
            if name not in self._routers:
                try:
                    self.router(name)
                except (RunDirError, ConfigError) as e:
                    self._routers[name] = e

    def router(self, name: str | None = None):
        """The router called `name` (default: the run's `routing.router`), built once
        (elrea.registry.ROUTERS: gradient, embedding, learned, uniform, ...). A router that is
        fitted must come from the router stage of this run's clusters."""
        from .registry import ROUTERS
        from .routers import build_router

        name = name or self.config.routing.router
        if name not in self._routers:
            if ROUTERS.get(name).fit is not None:
                self._check_router_stage(name)
            self._routers[name] = build_router(name, self)
        got = self._routers[name]
        if isinstance(got, Exception):
            raise got
        return got

    def _check_router_stage(self, name: str) -> None:
        st, clusters = self.stages.get("router", {}), self.stages.get("clusters", {}).get("fingerprint")
        self.run.verify(self.stages, ["router"])
        stale = st.get("status") != "done" or ("clusters" in st and st["clusters"] != clusters)
        if stale or ("clusters" in st and name not in st):
            why = ("was not fitted on this run's clusters" if stale else
                   "was not fitted by this run's router stage")
            raise RunDirError(f"{self.run.router}: the {name} router {why}; re-run the `elrea fit` that made "
                              f"{self.run.root} (same data and settings): it refits the router stage alone")

    def check_routing(self, weights=None, router: str | None = None, tau: float | None = None,
                      top_k: int | None = None) -> None:
        """Refuse routing settings this run cannot honour, before any work: weights (rows over
        [base, experts], non-negative, summing to 1), a router name (elrea.registry.ROUTERS), tau
        (> 0) and top_k (>= 0). Each refusal is a ConfigError whose `param` names the field."""
        from .registry import ROUTERS

        def refuse(param, message):
            e = ConfigError(f"{param}: {message}")
            e.param = param
            raise e

        if weights is not None:
            rows = torch.as_tensor(weights, dtype=torch.float32)
            rows = rows[None] if rows.dim() == 1 else rows
            try:
                check_weights(rows, len(rows), len(self.adapters))
            except ConfigError:
                refuse("weights", f"{len(self.adapters)} non-negative numbers summing to 1 (base + "
                                  f"{len(self.adapters) - 1} experts), got {weights}")
        if router is not None and router not in ROUTERS:
            refuse("router", f"unknown {router!r}; valid: {', '.join(ROUTERS.names())}")
        if tau is not None and not tau > 0:
            refuse("tau", f"must be > 0, got {tau!r}")
        if top_k is not None and top_k < 0:
            refuse("top_k", f"must be >= 0 (0: all), got {top_k!r}")

    def route(self, prompts=None, router: str | None = None, tau: float | None = None,
              top_k: int | None = None, features: torch.Tensor | None = None, temperature: float | None = None
              ) -> torch.Tensor:
        """Routing weights [n, C+1] (column 0 = base adapter), float32 on the CPU; rows sum to 1.

        router: a name of elrea.registry.ROUTERS (default: the run's routing.router); tau (the
        routing temperature) and top_k default to the run's. features: the router's signal,
        computed before by `self.router(name).signal(...)` (then `prompts` may be None): try many
        values of tau without recomputing it. `temperature` is tau's old name (deprecated)."""
        if temperature is not None:
            import warnings

            warnings.warn("route(temperature=...) is deprecated; use tau=...", DeprecationWarning, stacklevel=2)
            tau = temperature if tau is None else tau
        r = self.config.routing
        t = r.tau if tau is None else tau
        if t <= 0:
            raise ConfigError(f"routing.tau: must be > 0, got {t!r}")
        k = r.top_k if top_k is None else top_k
        chosen = self.router(router)
        if features is None:
            if prompts is None:
                raise ConfigError("route: give prompts, or features computed by the router's signal()")
            enc = self.encode(prompts)
            n, features = len(enc), chosen.signal(enc)
        else:
            n = len(features)
        return chosen.weights(features, n, t, k)

    def decoding(self, generation_config=None, seed: int | None = None, **kwargs) -> ensemble.Decoding:
        """How to decode, from the run's `generation` defaults, a transformers GenerationConfig and
        keyword arguments (elrea.generation.GENERATION_ARGS, and tokenizer=, checked to be the
        run's); unknown names are an error."""
        from .generation import eos_ids, resolve

        return resolve(self.config.generation, self.tokenizer, eos_ids(self.model, self.tokenizer), self.device,
                       generation_config, seed=self.config.stage_seed("generate") if seed is None else seed,
                       **kwargs)

    def generate(self, prompts=None, weights: torch.Tensor | None = None, generation_config=None, *,
                 seed: int | None = None, mode: str = "logits", raw: bool = False, streamer=None,
                 input_ids=None, attention_mask=None, **kwargs):
        """Ensembled generation: one text per prompt, or token ids as transformers returns them.

        prompts: strings (one user turn each, through the chat template; raw=True: as they are),
        chats, or token ids as model.generate takes them, used as they are (no template; routing
        reads the same ids): a LongTensor [n, T] or [T], a list of ints or of lists of ints, or a
        tokenizer's BatchEncoding (`generate(**tok(texts, return_tensors="pt", padding=True))`).
        Their padding is removed where `attention_mask` is 0 (left or right padding); without a
        mask, the run tokenizer's pad id at the start or end of a row is padding.

        Returns texts for texts in. For ids in, or with return_dict_in_generate=True, ids as
        model.generate returns them for a decoder-only model: a LongTensor [n, P + N] on the CPU,
        each prompt left-padded to the longest (P) with the pad id, then its new tokens (the EOS
        that ended it kept), then pad ids up to the longest output (N).
        return_dict_in_generate=True: a transformers GenerateDecoderOnlyOutput with those
        `sequences`; output_scores=True adds `scores`, a tuple of N [n, V] float32 tensors: per
        step, the mixed (ensembled) logits after the processors; output_logits=True adds
        `logits`, the mixed logits before them. Steps after a row has ended read -inf but 0 at
        the pad id there (transformers leaves the scores of decoding on past the end).

        weights [n, C+1] override routing. Generation arguments as in transformers
        (max_new_tokens, do_sample, temperature, top_p, top_k, min_p, repetition_penalty,
        stop_strings, eos_token_id, pad_token_id (pads the ids returned), return_dict_in_generate,
        output_scores, output_logits; use_cache and num_beams=1 as no-ops) or a GenerationConfig;
        tokenizer= (transformers asks for it with stop_strings) must be the run's tokenizer (the
        same vocabulary). `streamer` (a transformers TextStreamer /
        TextIteratorStreamer, one prompt) receives tokens as they come. mode="weights" mixes the
        experts inside each layer instead of mixing logits.
        """
        from .data import is_token_ids

        prompts = _given(prompts, input_ids, "generate")
        enc = self.encode(prompts, raw=raw, attention_mask=attention_mask)
        decoding = self.decoding(generation_config, seed=seed, **kwargs)
        weights = self.route(enc) if weights is None else check_weights(weights, len(enc), len(self.adapters))
        if streamer is not None and len(enc) != 1:
            raise ConfigError(f"generate: a streamer takes one prompt at a time, got {len(enc)}")
        if mode not in ("logits", "weights"):
            raise ConfigError(f"mode: unknown {mode!r}; valid: logits, weights")
        runs = [None] * len(enc)
        for idx in _batches([e.input_ids for e in enc], self.config.generation.batch_size):
            ids = [enc[i].input_ids for i in idx]
            if streamer is not None:
                streamer.put(torch.tensor([ids[0]], device="cpu"))
            put = None if streamer is None else (lambda b, tok: streamer.put(torch.tensor([tok], device="cpu")))
            for i, r in zip(idx, self.engine.decode(ids, weights[idx], decoding, on_token=put, mix=mode == "weights")):
                runs[i] = r
        if streamer is not None:
            streamer.end()
        if is_token_ids(prompts) or decoding.return_dict_in_generate:
            return self._as_transformers([e.input_ids for e in enc], runs, decoding)
        return [self.tokenizer.decode(r.text_ids, skip_special_tokens=True) for r in runs]

    def _as_transformers(self, prompts: list[list[int]], runs: list, decoding):
        """What model.generate returns for a decoder-only model (see `generate`): sequences
        [n, P + N], or with return_dict_in_generate a GenerateDecoderOnlyOutput holding them and
        the scores / logits asked for."""
        pad = self.engine.pad_id if decoding.pad_token_id is None else decoding.pad_token_id
        P, N = max(len(p) for p in prompts), max(len(r.ids) for r in runs)
        sequences = torch.full((len(runs), P + N), pad, dtype=torch.long, device="cpu")
        for i, (p, r) in enumerate(zip(prompts, runs)):
            sequences[i, P - len(p):P + len(r.ids)] = torch.tensor(p + r.ids, dtype=torch.long, device="cpu")
        if not decoding.return_dict_in_generate:
            return sequences
        from transformers.generation.utils import GenerateDecoderOnlyOutput

        return GenerateDecoderOnlyOutput(
            sequences=sequences,
            scores=_per_step([r.scores for r in runs], N, pad) if decoding.output_scores else None,
            logits=_per_step([r.logits for r in runs], N, pad) if decoding.output_logits else None)

    def stream(self, prompt=None, weights: torch.Tensor | None = None, generation_config=None, *,
               seed: int | None = None, raw: bool = False, input_ids=None, attention_mask=None, **kwargs):
        """Generate for one prompt, yielding text as each token comes (same arguments as generate;
        the prompt may be token ids)."""
        from .generation import TextStream

        enc = self.encode(_given(prompt, input_ids, "stream"), raw=raw, attention_mask=attention_mask)
        if len(enc) != 1:
            raise ConfigError(f"stream: one prompt at a time, got {len(enc)}")
        decoding = self.decoding(generation_config, seed=seed, **kwargs)
        if decoding.return_dict_in_generate:
            raise ConfigError("stream: yields text; return_dict_in_generate (ids, scores) is for generate")
        w = self.route(enc) if weights is None else check_weights(
            torch.as_tensor(weights, dtype=torch.float32, device="cpu").reshape(1, -1), 1, len(self.adapters))
        text = TextStream(self.tokenizer)
        for tokens, reasons in self.engine.decode_steps([enc[0].input_ids], w, decoding, stream=True):
            tok = tokens[0]
            if is_text(tok, reasons[0], decoding):
                piece = text.push(tok)
                if piece:
                    yield piece

    def score(self, prompt, continuations: list[str], weights: torch.Tensor | None = None) -> list[float]:
        """Summed log-probability of each continuation after `prompt`, under the ensemble."""
        w = self.route([prompt])[0] if weights is None else check_weights(
            torch.as_tensor(weights, dtype=torch.float32, device="cpu").reshape(1, -1), 1, len(self.adapters))[0]
        conts = [self.tokenizer(c, add_special_tokens=False)["input_ids"] for c in continuations]
        return self.engine.score(self.prompt_ids(prompt), conts, w)

    def loglikelihood(self, requests: list[tuple[str, str]], weights: torch.Tensor | None = None,
                      add_special_tokens: bool = False, batch_size: int | None = None,
                      max_batch_size: int | None = None, on_batch=None, **route_kwargs) -> list[tuple[float, bool]]:
        """(log p(continuation | context), whether greedy decoding would produce it) for raw
        (context, continuation) text pairs, as lm-evaluation-harness asks; each distinct context
        routed once on its own tokens (or `weights` [n, C+1]). Requests, whatever their contexts,
        are scored `batch_size` at a time, longest first (engine.score_many; None: batches sized
        by memory, at most `max_batch_size` requests); on_batch(n) after each batch.
        Tokenisation as lm-eval's HF backend: trailing spaces of the context move to the
        continuation, and the continuation is what the pair's tokens add.
        route_kwargs: router, tau, top_k (as for `route`)."""
        if not requests:
            return []
        pairs = [self._split_pair(c, x, add_special_tokens) for c, x in requests]
        if weights is None:
            from .data import Encoded

            by_context: dict[tuple, int] = {}
            for ctx, _ in pairs:
                by_context.setdefault(tuple(ctx), len(by_context))
            w = self.route([Encoded(list(c), [-100] + list(c[1:])) for c in by_context], **route_kwargs)
            w = w[[by_context[tuple(ctx)] for ctx, _ in pairs]]                 # (n, C+1): each request's
        else:
            w = check_weights(weights, len(requests), len(self.adapters))
        return self.engine.score_many(pairs, w, greedy=True, batch_size=batch_size,
                                      max_batch_size=max_batch_size, on_batch=on_batch)

    def _split_pair(self, context: str, continuation: str, special: bool) -> tuple[list[int], list[int]]:
        n_space = len(context) - len(context.rstrip())
        if n_space:
            context, continuation = context[:-n_space], context[-n_space:] + continuation
        whole = self.tokenizer(context + continuation, add_special_tokens=special)["input_ids"]
        ctx = self.tokenizer(context, add_special_tokens=special)["input_ids"]
        if not ctx:  # an empty context: condition on the EOS token, as lm-eval does
            ctx, whole = [self.tokenizer.eos_token_id], [self.tokenizer.eos_token_id] + whole
        return ctx, whole[len(ctx):]


def _local_run(run_dir) -> Path:
    """A run directory, or a hub id (`org/name`, uploaded by `elrea push`) downloaded to the hub cache."""
    path = Path(run_dir)
    name = str(run_dir)
    if path.exists() or name.startswith((".", "/", "~")) or name.count("/") != 1:
        return path
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(name, allow_patterns=list(Run.SHIPPED)))
    except Exception as e:  # noqa: BLE001 - offline, unknown repo, no access
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise RunDirError(f"{name}: not a local run directory, and the hub repository could not be downloaded "
                          f"({type(e).__name__}: {first})") from None


def _given(prompts, input_ids, where: str):
    """The prompts, given positionally or as transformers' input_ids= (as in generate(**inputs))."""
    if input_ids is not None and prompts is not None:
        raise ConfigError(f"{where}: give the prompts or input_ids=, not both")
    if input_ids is None and prompts is None:
        raise ConfigError(f"{where}: no prompts; give texts, chats or token ids (or input_ids=)")
    return input_ids if input_ids is not None else prompts


def _per_step(rows: list[list[torch.Tensor]], steps: int, pad: int) -> tuple[torch.Tensor, ...]:
    """transformers' per-step layout of per-prompt scores: `steps` tensors [n, V] on the CPU, from
    each prompt's list of (V,) rows; a prompt that has ended reads -inf there, but 0 at the pad id."""
    first = next(x for r in rows for x in r)
    ended = torch.full_like(first, float("-inf"))
    ended[pad] = 0.0
    return tuple(torch.stack([r[t] if t < len(r) else ended for r in rows]).cpu() for t in range(steps))


def check_weights(weights, n: int, k: int) -> torch.Tensor:
    """Weights [n, k] as float32 on the CPU, each row non-negative and summing to 1."""
    w = torch.as_tensor(weights, dtype=torch.float32, device="cpu")
    if w.shape != (n, k):
        raise ConfigError(f"weights: expected shape [{n}, {k}] (prompts x adapters), got {list(w.shape)}")
    if (w < 0).any() or not torch.allclose(w.sum(1), torch.ones(n, device="cpu"), atol=1e-4):
        raise ConfigError("weights: each row must be non-negative and sum to 1")
    return w


def _check_finite(model, folders: dict[str, Path]) -> None:
    """Refuse an adapter ({adapter name: its folder}) with NaN or infinite weights (training that
    diverged, damage), in one pass over the LoRA parameters."""
    for pname, p in model.named_parameters():
        if "lora_" not in pname:
            continue
        path = next((f for a, f in folders.items() if f".{a}." in pname), None)
        if path is not None and not torch.isfinite(p).all():
            raise RunDirError(f"{path}: non-finite weights (NaN or inf) in {pname.removeprefix('base_model.model.')}: "
                              "damaged files are rebuilt by re-running the `elrea fit` that made the run; a "
                              "training that diverged needs a lower learning rate (then `elrea fit --from base`)")


def _load_adapter(loader, backbone, path: Path, name: str):
    """Load one PEFT adapter folder, turning missing/corrupt/mismatched files into RunDirError."""
    if not (path / "adapter_config.json").exists() or not (path / "adapter_model.safetensors").exists():
        raise RunDirError(f"{path}: adapter missing (adapter_config.json / adapter_model.safetensors); "
                          "re-run `elrea fit` to recreate it")
    try:
        if backbone is None:
            return loader(str(path), adapter_name=name)
        return loader(backbone, str(path), adapter_name=name)
    except RuntimeError as e:  # size mismatch: an adapter trained on another backbone
        raise RunDirError(f"{path}: adapter does not fit this backbone ({str(e).splitlines()[0]}); "
                          "was it trained on another model?") from None
    except Exception as e:  # noqa: BLE001 - safetensors/JSON errors for truncated files
        raise RunDirError(f"{path}: cannot load adapter ({type(e).__name__}: {e}); "
                          "re-run `elrea fit` to recreate it") from None


def _batches(prompts: list[list[int]], size: int) -> list[list[int]]:
    """Indices of `prompts` in decoding batches of `size` distinct prompts, in order; the copies
    of a prompt (say, one per routing) go in its batch, where the engine decodes them on shared
    rows (elrea.engine.Slots)."""
    where: dict[tuple, int] = {}
    batches: list[list[int]] = []
    distinct = size                     # distinct prompts in the last batch
    for i, p in enumerate(prompts):
        b = where.get(tuple(p))
        if b is None:
            if distinct >= size:
                batches.append([])
                distinct = 0
            b = where[tuple(p)] = len(batches) - 1
            distinct += 1
        batches[b].append(i)
    return batches
