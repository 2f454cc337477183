"""`ELREA`: a fitted ensemble, loaded from a run directory, that routes, generates and scores.

    model = ELREA.from_pretrained("runs/demo")
    w = model.route(["What is 3 + 4?"])            # Tensor [1, C+1]; column 0 = base adapter
    model.generate(["What is 3 + 4?"])             # ensembled greedy decoding
    model.score("What is 3 + 4?", ["7", "8"])     # summed log-prob of each continuation
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import torch

from . import ensemble
from .config import RunConfig, _from_dict
from .data import PromptFormatter
from .errors import ConfigError, RunDirError
from .features import Featurizer
from .models import load_backbone, load_tokenizer, model_device
from .routing import ROUTERS
from .rundir import Manifest, atomic_path, read_json

log = logging.getLogger(__name__)


class ELREA:
    """A PEFT model holding the base adapter ("base") and experts ("expert_1".."expert_C").

    Everything runs on the backbone's device (`device` of `from_pretrained`); results come
    back on the CPU (routing weights, token ids, scores).
    """

    def __init__(self, model, tokenizer, config: RunConfig, centroids: torch.Tensor, run_dir: Path):
        self.model, self.tokenizer, self.config = model, tokenizer, config
        self.device = model_device(model)
        self.centroids = centroids.to(self.device, torch.float32)   # (C+1, d)
        self.run_dir = Path(run_dir)
        self.adapters = ["base"] + [f"expert_{c}" for c in range(1, centroids.shape[0])]
        c = config
        self.formatter = PromptFormatter(tokenizer, c.data.system_prompt, c.data.max_length, "left")
        self.featurizer = Featurizer.for_run(model, c, self.run_dir / "base", tokenizer.pad_token_id,
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

        run_dir = Path(run_dir)
        manifest = Manifest.load(run_dir)
        for stage in ("base", "clusters", "experts"):
            if manifest.stage(stage).get("status") != "done":
                raise RunDirError(f"{run_dir}: stage {stage!r} is not finished; run `elrea fit` to complete it")
        config = _from_dict(RunConfig, read_json(run_dir / "config.json")).validate()
        tokenizer = load_tokenizer(config.model)
        if backbone is None:
            from .distributed import resolve_device

            if not isinstance(device, torch.device):  # a name: resolve it (a torch.device is already placed)
                device = resolve_device(device or config.model.device)
            backbone = load_backbone(config.model, device)
        cpath = run_dir / "clusters" / "centroids.safetensors"
        try:
            centroids = load_file(str(cpath))["centroids"]
        except Exception as e:  # noqa: BLE001 - missing or truncated file
            raise RunDirError(f"{cpath}: missing or corrupt ({e}); re-run `elrea fit --from clusters`") from None
        model = _load_adapter(PeftModel.from_pretrained, backbone, run_dir / "base", "base")
        for c in range(1, centroids.shape[0]):
            _load_adapter(model.load_adapter, None, run_dir / "experts" / str(c), f"expert_{c}")
        model.set_adapter("base")
        model.eval()
        return cls(model, tokenizer, config, centroids, run_dir)

    def save_pretrained(self, out_dir: str | Path) -> Path:
        """Copy what inference needs (manifest, config, adapters, clusters) to `out_dir`."""
        out_dir = Path(out_dir)
        with atomic_path(out_dir, is_dir=True) as tmp:
            for name in ("elrea.json", "config.json"):
                shutil.copy2(self.run_dir / name, tmp / name)
            for sub in ("base", "experts", "clusters"):
                shutil.copytree(self.run_dir / sub, tmp / sub)
        return out_dir

    # ------------------------------------------------------------------ inference

    def _messages(self, prompt) -> list[dict]:
        return [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt

    def prompt_ids(self, prompt) -> list[int]:
        return self.formatter.encode_instruction(self._messages(prompt)).input_ids

    def features(self, prompts: list) -> torch.Tensor:
        """Unit routing features [n, d] on the model's device: instruction-only gradients of the
        base adapter (docs/method.md, step 5)."""
        self.model.set_adapter("base")
        enc = [self.formatter.encode_instruction(self._messages(p)) for p in prompts]
        return self.featurizer.features(enc)

    def route(self, prompts: list, router: str = "gradient", temperature: float | None = None,
              top_k: int | None = None) -> torch.Tensor:
        """Routing weights [n, C+1] (column 0 = base adapter), float32 on the CPU; rows sum to 1."""
        from .errors import unknown_name

        if router not in ROUTERS:
            raise unknown_name("router", router, ROUTERS)
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        r = self.config.routing
        t = r.temperature if temperature is None else temperature
        if t <= 0:
            raise ConfigError(f"routing.temperature: must be > 0, got {t!r}")
        feats = self.features(prompts) if router == "gradient" else \
            torch.zeros(len(prompts), 1, device=self.device)
        return ROUTERS[router](feats, self.centroids, t, r.top_k if top_k is None else top_k).cpu()

    def generate(self, prompts: list, weights: torch.Tensor | None = None, max_new_tokens: int | None = None,
                 temperature: float | None = None, top_p: float | None = None, seed: int | None = None,
                 mode: str = "logits") -> list[str]:
        """Ensembled generation. `weights` [n, C+1] overrides routing."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        g = self.config.generation
        weights = self.route(prompts) if weights is None else _check_weights(weights, len(prompts),
                                                                              len(self.adapters))
        gen = torch.Generator(device=self.device).manual_seed(
            self.config.stage_seed("generate") if seed is None else seed)
        texts = []
        for s in range(0, len(prompts), g.batch_size):
            ids = [self.prompt_ids(p) for p in prompts[s:s + g.batch_size]]
            w, names = weights[s:s + g.batch_size], self.adapters
            if mode == "weights":
                names = ensemble.mix_in_layers(self.model, w, self.adapters)
                w = torch.eye(len(names), device="cpu")
            elif mode != "logits":
                raise ConfigError(f"mode: unknown {mode!r}; valid: logits, weights")
            try:
                toks = ensemble.generate(
                    self.model, ids, w, names, eos_id=self.tokenizer.eos_token_id,
                    pad_id=self.tokenizer.pad_token_id,
                    max_new_tokens=max_new_tokens or g.max_new_tokens,
                    temperature=g.temperature if temperature is None else temperature,
                    top_p=g.top_p if top_p is None else top_p, generator=gen)
            finally:
                if mode == "weights":
                    for n in names:
                        self.model.delete_adapter(n)
                    self.model.set_adapter("base")
            texts += [self.tokenizer.decode(t, skip_special_tokens=True) for t in toks]
        return texts

    def score(self, prompt, continuations: list[str], weights: torch.Tensor | None = None) -> list[float]:
        """Summed log-probability of each continuation after `prompt`, under the ensemble."""
        w = self.route([prompt])[0] if weights is None else _check_weights(
            torch.as_tensor(weights, dtype=torch.float32, device="cpu").reshape(1, -1), 1, len(self.adapters))[0]
        conts = [self.tokenizer(c, add_special_tokens=False)["input_ids"] for c in continuations]
        return ensemble.score(self.model, self.prompt_ids(prompt), conts, w, self.adapters,
                              self.tokenizer.pad_token_id)


def _check_weights(weights, n: int, k: int) -> torch.Tensor:
    """Weights [n, k] as float32 on the CPU, each row non-negative and summing to 1."""
    w = torch.as_tensor(weights, dtype=torch.float32, device="cpu")
    if w.shape != (n, k):
        raise ConfigError(f"weights: expected shape [{n}, {k}] (prompts x adapters), got {list(w.shape)}")
    if (w < 0).any() or not torch.allclose(w.sum(1), torch.ones(n, device="cpu"), atol=1e-4):
        raise ConfigError("weights: each row must be non-negative and sum to 1")
    return w


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
