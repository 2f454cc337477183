"""Training: fit a LoRA adapter with transformers' Trainer (steps 1 and 4 of docs/method.md).

Trainer makes `accelerate launch elrea fit ...` data-parallel across GPUs with no change
here (inside `elrea.distributed.alone()` it trains in this process only). It trains on the
model's device, with bf16/fp16 mixed precision when the backbone is bfloat16/float16 (LoRA
weights stay float32), and optional gradient checkpointing. The adapter is saved as a
standard PEFT folder, written atomically, with `training.json` (the summary and the stage
fingerprint that says it is finished); the base adapter also keeps its AdamW moments
(exp_avg, exp_avg_sq) in `adam_moments.safetensors`, which the Adam-preconditioned gradient
features need. Given a checkpoint folder, Trainer saves a resumable checkpoint every
`checkpoint_every` steps there (transformers loads them back with weights_only=True), and a
stage interrupted by Ctrl-C, a crash or the end of a working day resumes from the last one with
the same optimizer, scheduler, RNG and data order; the folder is removed once the adapter is saved.

On the CPU, LoRA dropout draws its masks from numpy's PCG64 (`CpuDropout`): torch's CPU dropout
draws one mt19937 float per element, and with dropout on the input of every adapted linear
layer that took more of a training step than the layers' matmuls (docs/benchmarks.md).

The loss is over the response tokens only, so the model computes logits only where a label is
(`labelled_logits`: transformers' `logits_to_keep` as a mask, with the shifted labels given):
projecting every prompt position onto the vocabulary, and its softmax, was about a fifth of a
step on instruction data with long prompts and short answers. The loss is the same sum over the
same tokens.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from .config import TrainConfig
from .data import Encoded, collate
from .models import model_device, precision_hint
from .rundir import atomic_path, out_of_space

log = logging.getLogger(__name__)
MOMENTS_FILE = "adam_moments.safetensors"
SUMMARY_FILE = "training.json"
# AdamW's constants, passed to Trainer and used again by the Adam preconditioner (features).
ADAM_BETAS = (0.9, 0.999)
ADAM_EPS = 1e-8


class _ListDataset(torch.utils.data.Dataset):
    """Encoded examples as Trainer's items: mappings with `input_ids`, so that Trainer's own
    length-aware samplers (trainer_args `train_sampling_strategy: group_by_length` or
    `batch_rebalance`) can read each example's length."""

    def __init__(self, items: list[Encoded]):
        self.items = items

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        e = self.items[i]
        return {"input_ids": e.input_ids, "labels": e.labels}


def _collator(pad_id: int, trim: bool):
    def collator(batch):
        out = collate([Encoded(x["input_ids"], x["labels"]) for x in batch], pad_id, side="right")
        return labelled_logits(out) if trim else out

    return collator


def labelled_logits(batch: dict) -> dict:
    """`batch` (input_ids, attention_mask, labels) with the model told to compute logits only at
    the positions whose next token is labelled: `logits_to_keep`, a [batch, length] boolean mask,
    and `shift_labels`, those positions' labels in the same (row-major) order. transformers'
    causal LM loss then sums over exactly the tokens it would with every logit; Trainer counts
    the tokens of `num_items_in_batch` from `shift_labels`."""
    labels = batch["labels"]
    shift = torch.nn.functional.pad(labels, (0, 1), value=-100)[:, 1:]
    keep = shift != -100
    return {**batch, "logits_to_keep": keep, "shift_labels": shift[keep]}


def trims_logits(model) -> bool:
    """Whether `model` (a PEFT model or a transformers causal LM) takes `labelled_logits` batches:
    transformers slices logits by mask (`slice_logits_to_keep`, transformers 5), the model's
    forward takes `logits_to_keep`, and its loss is transformers' causal LM loss (which takes
    `shift_labels` as given). Models that do not (remote code, custom losses) get every logit."""
    import inspect

    try:
        from transformers.loss.loss_utils import ForCausalLMLoss
        from transformers.modeling_utils import slice_logits_to_keep  # noqa: F401 - masks need it
    except ImportError:
        return False
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    try:
        return ("logits_to_keep" in inspect.signature(base.forward).parameters
                and base.loss_function is ForCausalLMLoss)
    except (AttributeError, ValueError, TypeError):
        return False


def train_adapter(peft_model, examples: list[Encoded], cfg: TrainConfig, out_dir: str | Path,
                  pad_id: int, seed: int, save_moments: bool = False, desc: str = "train",
                  precision: str = "float32", fingerprint: str | None = None, meta: dict | None = None,
                  logs_dir: str | Path | None = None, checkpoint_dir: str | Path | None = None,
                  resume: bool = True, callbacks: list | None = None) -> dict:
    """Train the active adapter of `peft_model` on `examples`; save it to `out_dir`.

    `precision` is the backbone's dtype: bfloat16 trains under bf16 autocast, float16 under
    fp16 autocast with loss scaling (CUDA only; elsewhere the fp16 backbone runs as it is).
    Returns a summary: optimizer steps, final training loss, seconds, examples and `tokens` (the
    non-padding tokens trained on, by Trainer's count; absent where it did not count them all).
    It is also saved, with `fingerprint`, `meta` and Trainer's loss history, as
    out_dir/training.json. With
    cfg.report_to including tensorboard, its event files go to `logs_dir`. With
    `checkpoint_dir` and cfg.checkpoint_every > 0, training saves resumable checkpoints there and
    (with `resume`) continues from the last one left by an interrupted call with the same
    fingerprint; `callbacks` are extra transformers TrainerCallbacks.
    """
    from transformers import Trainer, TrainingArguments

    out_dir = Path(out_dir)
    device = model_device(peft_model)
    world = int(os.environ.get("WORLD_SIZE", "1"))  # 1 inside distributed.alone()
    accum = max(1, cfg.batch_size // (cfg.micro_batch_size * world))
    steps = _steps(len(examples), cfg, accum)
    scratch = tempfile.TemporaryDirectory(prefix="elrea-trainer-")  # Trainer wants one; we save ourselves
    checkpoints, last = _checkpoints(checkpoint_dir, cfg, fingerprint, len(examples), world, resume)
    settings = dict(
        output_dir=str(checkpoints or scratch.name), per_device_train_batch_size=cfg.micro_batch_size,
        gradient_accumulation_steps=accum, learning_rate=cfg.lr, num_train_epochs=cfg.epochs,
        max_steps=cfg.max_steps, lr_scheduler_type="linear",
        warmup_steps=int(cfg.warmup_ratio * steps),
        weight_decay=cfg.weight_decay, optim="adamw_torch", adam_beta1=ADAM_BETAS[0],
        adam_beta2=ADAM_BETAS[1], adam_epsilon=ADAM_EPS, report_to=list(cfg.report_to),
        run_name=f"{out_dir.parent.name}/{out_dir.name}",
        logging_steps=max(1, steps // 10), seed=seed, data_seed=seed,
        use_cpu=device.type == "cpu", bf16=precision == "bfloat16",
        fp16=precision == "float16" and device.type == "cuda",
        gradient_checkpointing=cfg.gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False} if cfg.gradient_checkpointing else None,
        ddp_find_unused_parameters=False,  # every LoRA factor of the active adapter is used
        include_num_input_tokens_seen="non_padding",  # the summary's "tokens" (Trainer gathers the processes')
        remove_unused_columns=False, dataloader_num_workers=0,
        dataloader_pin_memory=device.type == "cuda",
        disable_tqdm=not logging.getLogger("elrea").isEnabledFor(logging.INFO),  # `elrea -q`: no bars
        **(dict(save_strategy="steps", save_steps=cfg.checkpoint_every, save_total_limit=1)
           if checkpoints else dict(save_strategy="no")))
    settings.update(cfg.trainer_args)
    try:
        args = TrainingArguments(**settings)
    except TypeError as e:
        from .errors import ConfigError

        raise ConfigError(f"trainer_args: {e} (see transformers.TrainingArguments for the valid fields)") from None
    pin_to_device(args, device)
    # one process per device: torch's DataParallel (n_gpu > 1) would split the flat shift_labels wrongly
    trim = trims_logits(peft_model) and args.n_gpu <= 1
    trainer = Trainer(model=peft_model, args=args, train_dataset=_ListDataset(examples),
                      data_collator=_collator(pad_id, trim),
                      callbacks=[*(callbacks or []), *([_no_final_checkpoint()] if checkpoints else [])])
    t0 = time.time()
    log.info("%s: %d examples, %d optimizer steps of %d sequences on %s%s", desc, len(examples),
             steps, cfg.micro_batch_size * accum * world, device,
             f", resuming from step {last.name.rsplit('-', 1)[-1]}" if last else "")
    if hint := precision_hint(device, precision):
        log.info(hint)
    counted = _counted_before(last)  # read now: Trainer deletes that checkpoint once it saves a newer one
    with _tensorboard_dir(cfg, logs_dir), out_of_space(checkpoints) if checkpoints else contextlib.nullcontext(), \
            cpu_dropout(peft_model):
        result = trainer.train(resume_from_checkpoint=str(last) if last else None)
    seconds = time.time() - t0
    summary = {"steps": int(result.global_step), "train_loss": float(result.training_loss),
               "seconds": round(seconds, 2), "examples": len(examples)}
    if (tokens := _tokens_seen(trainer, counted)) is not None:
        summary["tokens"] = tokens
    if trainer.is_world_process_zero():
        history = [h for h in trainer.state.log_history if "loss" in h or "train_loss" in h]
        save_adapter(peft_model, out_dir, trainer.optimizer if save_moments else None,
                     meta={**summary, **(meta or {}), "fingerprint": fingerprint, "log_history": history})
        if checkpoints:
            shutil.rmtree(checkpoints, ignore_errors=True)
    if cfg.gradient_checkpointing:
        peft_model.base_model.model.gradient_checkpointing_disable()
    peft_model.eval()
    scratch.cleanup()
    return summary


class CpuDropout(torch.nn.Dropout):
    """`nn.Dropout(p)` whose mask, on the CPU, comes from numpy's PCG64 instead of torch's mt19937.

    The same layer in distribution: each element is kept independently with probability 1 - p
    (to within 2**-32) and kept ones are scaled by 1 / (1 - p), so the output's expectation is
    the input. Each call seeds a fresh PCG64 from one draw of torch's generator, so masks follow
    `torch.manual_seed` / `transformers.set_seed`, and a training resumed from a checkpoint (which
    restores torch's RNG state) draws the masks the uninterrupted one would have. In eval mode,
    with p = 0, on other devices (CUDA's own dropout is fast) and on inputs under `SMALL`
    elements (where seeding a generator costs more than torch's draws) it is `nn.Dropout`.
    """

    SMALL = 1 << 15

    def __init__(self, p: float = 0.5):
        super().__init__(p)
        self._threshold = -(2 ** 31) + round(p * 2 ** 32)   # uniform int32 >= threshold: kept
        self._scale = 2 ** 32 / (2 ** 32 - round(p * 2 ** 32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0 or x.device.type != "cpu" or x.numel() < self.SMALL:
            return super().forward(x)
        seed = int(torch.randint(0, 2 ** 63 - 1, (), dtype=torch.int64))
        keep = torch.from_numpy(uniform_int32(seed, x.numel())).view(x.shape) >= self._threshold
        return torch.where(keep, x, 0).mul_(self._scale)


def uniform_int32(seed: int, n: int) -> np.ndarray:
    """`np.random.Generator(np.random.PCG64(seed)).integers(-2**31, 2**31, n, dtype=np.int32)`, the
    same numbers at about twice the speed: PCG64's raw 64-bit outputs cut into 32-bit halves (as
    numpy's buffered draws cut them, low half first), shifted by -2**31 (the sign bit flipped)."""
    if sys.byteorder != "little":   # the halves' order in memory would not be numpy's
        return np.random.Generator(np.random.PCG64(seed)).integers(-(2 ** 31), 2 ** 31, size=n, dtype=np.int32)
    raw = np.random.PCG64(seed).random_raw((n + 1) // 2).view(np.uint32)[:n]
    raw ^= np.uint32(1 << 31)
    return raw.view(np.int32)


@contextlib.contextmanager
def cpu_dropout(peft_model):
    """Inside: the model's LoRA dropout layers (PEFT's `lora_dropout[name]`, nn.Dropout with p > 0)
    are `CpuDropout` when the model is on the CPU; the originals are put back on leaving."""
    swapped = []
    if model_device(peft_model).type == "cpu":
        for module in peft_model.modules():
            layers = getattr(module, "lora_dropout", None)
            if not isinstance(layers, torch.nn.ModuleDict):
                continue
            for name, layer in layers.items():
                if type(layer) is torch.nn.Dropout and layer.p > 0:
                    fast = CpuDropout(layer.p)
                    fast.train(layer.training)
                    layers[name] = fast
                    swapped.append((layers, name, layer))
    try:
        yield len(swapped)
    finally:
        for layers, name, layer in swapped:
            layer.train(layers[name].training)
            layers[name] = layer


def _no_final_checkpoint():
    """A callback: Trainer also checkpoints after the last step, which the adapter saved next
    makes moot (and which a nearly full disk may not hold)."""
    from transformers import TrainerCallback

    class NoFinalCheckpoint(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            if state.global_step >= state.max_steps:
                control.should_save = False
            return control

    return NoFinalCheckpoint()


def _counted_before(resumed_from: Path | None) -> bool:
    """Whether the checkpoint a training resumes from counted the tokens of its steps (True when
    it starts afresh): those saved before elrea had Trainer count them hold none."""
    if resumed_from is None:
        return True
    try:
        saved = json.loads((resumed_from / "trainer_state.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return False
    return saved.get("global_step", 0) == 0 or bool(saved.get("num_input_tokens_seen"))


def _tokens_seen(trainer, counted_before: bool) -> int | None:
    """The non-padding tokens of every batch the training took, as Trainer counted them; None
    where it did not count them all: trainer_args changed what it counts, or the training resumed
    from a checkpoint that had not counted (`_counted_before`)."""
    if trainer.args.include_num_input_tokens_seen != "non_padding" or not counted_before:
        return None
    return int(trainer.state.num_input_tokens_seen)


def _checkpoints(checkpoint_dir, cfg: TrainConfig, fingerprint, n: int, world: int, resume: bool):
    """(the folder Trainer checkpoints into, the checkpoint to resume from), or (None, None).

    The folder's `stage.json` says which training its checkpoints belong to (the stage
    fingerprint, the number of examples, the processes): checkpoints of any other training,
    or all of them when not `resume`, are removed rather than resumed.
    """
    if checkpoint_dir is None or cfg.checkpoint_every <= 0:
        return None, None
    from transformers.trainer_utils import get_last_checkpoint

    folder = Path(checkpoint_dir)
    want = {"fingerprint": fingerprint, "examples": n, "processes": world}
    marker = folder / "stage.json"
    rank = int(os.environ.get("RANK", "0"))
    last = None
    if folder.is_dir():
        try:
            same = json.loads(marker.read_text(encoding="utf-8")) == want
        except (OSError, json.JSONDecodeError, UnicodeDecodeError):
            same = False
        last = get_last_checkpoint(str(folder)) if same and resume else None
        if last is None and rank == 0:
            shutil.rmtree(folder, ignore_errors=True)
    if last is None and rank == 0:
        folder.mkdir(parents=True, exist_ok=True)
        marker.write_text(json.dumps(want) + "\n", encoding="utf-8")
    return folder, Path(last) if last else None


@contextlib.contextmanager
def _tensorboard_dir(cfg: TrainConfig, logs_dir):
    """transformers' TensorBoard callback writes where TENSORBOARD_LOGGING_DIR says (default: under
    Trainer's output_dir, our scratch folder): point it into the run directory."""
    if "tensorboard" not in cfg.report_to or logs_dir is None or "TENSORBOARD_LOGGING_DIR" in os.environ:
        yield
        return
    os.environ["TENSORBOARD_LOGGING_DIR"] = str(logs_dir)
    try:
        yield
    finally:
        os.environ.pop("TENSORBOARD_LOGGING_DIR", None)


def pin_to_device(args, device: torch.device) -> None:
    """Keep a single-process Trainer on the model's GPU.

    Outside DDP, transformers' TrainingArguments takes cuda:0 and, with several GPUs visible,
    wraps the model in nn.DataParallel over all of them: wrong for `--device cuda:1`, and for
    expert-parallel training, where every process trains alone on its own GPU while all GPUs
    stay visible. The device is set as the current one and as args.device (a cached property).
    """
    from transformers.training_args import ParallelMode

    if device.type != "cuda" or args.parallel_mode == ParallelMode.DISTRIBUTED:
        return
    _ = args.device  # transformers' own device set-up first (it sets cuda:0 as current)
    torch.cuda.set_device(device)
    args._n_gpu = 1
    args.__dict__["_setup_devices"] = device


def epoch_steps(n: int, cfg: TrainConfig) -> int:
    """Optimizer steps of one epoch of `n` examples under `cfg`, on one process."""
    accum = max(1, cfg.batch_size // cfg.micro_batch_size)
    return _steps(n, dataclasses.replace(cfg, epochs=1.0, max_steps=-1), accum)


def _steps(n: int, cfg: TrainConfig, accum: int) -> int:
    if cfg.max_steps > 0:
        return cfg.max_steps
    return max(1, math.ceil(math.ceil(n / cfg.micro_batch_size) / accum) * math.ceil(cfg.epochs))


def save_adapter(peft_model, out_dir: Path, optimizer=None, meta: dict | None = None) -> None:
    """Save the active adapter as a PEFT folder (safetensors) atomically, with Adam moments
    and `training.json` (meta) when given."""
    from safetensors.torch import save_file

    name = peft_model.active_adapter
    with atomic_path(out_dir, is_dir=True) as tmp:
        peft_model.save_pretrained(str(tmp), safe_serialization=True, selected_adapters=[name])
        sub = tmp / name if name != "default" and (tmp / name).is_dir() else tmp
        if sub != tmp:  # PEFT writes non-default adapters into a sub-folder: flatten it
            for f in sub.iterdir():
                f.rename(tmp / f.name)
            sub.rmdir()
        _sorted_targets(tmp / "adapter_config.json")
        if optimizer is not None:
            save_file(adam_moments(peft_model, optimizer), str(tmp / MOMENTS_FILE))
        if meta is not None:
            (tmp / SUMMARY_FILE).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")


def _sorted_targets(config: Path) -> None:
    """PEFT writes target_modules of "all-linear" in a set's order, which differs from process to
    process (string hashing): sort it, so that identical runs write identical files."""
    cfg = json.loads(config.read_text(encoding="utf-8"))
    if isinstance(cfg.get("target_modules"), list):
        cfg["target_modules"] = sorted(cfg["target_modules"])
        config.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def trained_summary(adapter_dir: str | Path, fingerprint: str) -> dict | None:
    """The saved training summary if `adapter_dir` holds an adapter finished under `fingerprint`."""
    adapter_dir = Path(adapter_dir)
    if not (adapter_dir / "adapter_model.safetensors").exists():
        return None
    try:
        meta = json.loads((adapter_dir / SUMMARY_FILE).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return None
    return meta if meta.get("fingerprint") == fingerprint else None


def adam_moments(peft_model, optimizer) -> dict[str, torch.Tensor]:
    """{"<param>.exp_avg": m, "<param>.exp_avg_sq": v} for every trainable parameter."""
    opt = getattr(optimizer, "optimizer", optimizer)  # unwrap accelerate's AcceleratedOptimizer
    out = {}
    for name, p in peft_model.named_parameters():
        if not p.requires_grad:
            continue
        state = opt.state.get(p, {})
        if "exp_avg" not in state:
            raise RuntimeError(f"optimizer has no Adam state for {name}; was it trained?")
        out[f"{name}.exp_avg"] = state["exp_avg"].detach().float().cpu().contiguous()
        out[f"{name}.exp_avg_sq"] = state["exp_avg_sq"].detach().float().cpu().contiguous()
    return out


def load_moments(adapter_dir: str | Path, names: list[str]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Adam moments keyed by parameter name (as named in the loaded PeftModel)."""
    from safetensors.torch import load_file

    from .errors import RunDirError

    path = Path(adapter_dir) / MOMENTS_FILE
    if not path.exists():
        raise RunDirError(f"{path}: missing Adam moments; re-run `elrea fit --from base`, or set "
                          "features.train_preconditioner=sgd")
    try:
        raw = load_file(str(path))
    except Exception as e:  # noqa: BLE001 - safetensors raises its own error types
        raise RunDirError(f"{path}: truncated or corrupt ({e}); re-run `elrea fit --from base`") from None
    saved = {k[: -len(".exp_avg")]: k for k in raw if k.endswith(".exp_avg")}
    out = {}
    for name in names:
        key = _match_name(name, saved)
        if key is None:
            raise RunDirError(f"{path}: no moments for parameter {name}")
        out[name] = (raw[key + ".exp_avg"], raw[key + ".exp_avg_sq"])
    return out


def _match_name(name: str, saved: dict) -> str | None:
    """Moments are saved under the training adapter's name ('default'); match by structure."""
    if name in saved:
        return name
    target = _strip_adapter(name)
    return next((k for k in saved if _strip_adapter(k) == target), None)


def _strip_adapter(name: str) -> str:
    parts = name.split(".")
    for i, part in enumerate(parts[:-1]):
        if part in ("lora_A", "lora_B"):
            return ".".join(parts[: i + 1] + parts[i + 2:])
    return name
