"""Devices and processes: where this process computes, and its share of a distributed job.

One rule for every stage and every inference path: tensors live on the backbone's device
(`model.device`: `auto` = CUDA when available, else the CPU). Under `accelerate launch` or
`torchrun` with N processes, each process owns one device (cuda:LOCAL_RANK, or the CPU with
the gloo backend) and one contiguous share of each stage's work; the engine underneath is
accelerate's `PartialState` (process group, `split_between_processes`, `gather_object`), not
a home-made one. Work is always split at batch boundaries, so that every batch is computed
exactly as a single process would compute it and results are identical whatever N is.

    procs = processes("auto")              # rank, world size, device
    mine = procs.split(batches)            # this rank's contiguous share, in order
    rows = procs.gather(results)           # everyone's results, in rank order
    procs.barrier("features")              # fails clearly if another process died
"""

from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass
from datetime import timedelta

import torch

from .config import check_device_name
from .errors import ElreaError

log = logging.getLogger(__name__)

# A barrier can wait while another rank trains its experts (expert-parallel) or clusters:
# hours, not the 30 minutes of torch's default process-group timeout.
TIMEOUT_ENV = "ELREA_DIST_TIMEOUT_S"
DEFAULT_TIMEOUT_S = 6 * 3600

# What torchrun / accelerate launch put in each worker's environment.
_LAUNCH_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "GROUP_WORLD_SIZE",
               "ROLE_RANK", "ROLE_WORLD_SIZE", "TORCHELASTIC_RUN_ID")


class DistributedError(ElreaError):
    """Another process of a distributed job failed; re-running the same command resumes."""


def launched() -> bool:
    """Whether this process is one of several started by accelerate launch / torchrun."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def resolve_device(name: str = "auto") -> torch.device:
    """The torch.device this process computes on, failing clearly when it is not there."""
    check_device_name(name, "device")
    if launched():
        return processes(name).device
    if name == "auto":
        return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    dev = torch.device(name)
    _check_available(dev)
    if dev.type == "cuda" and dev.index is not None:
        torch.cuda.set_device(dev)  # Trainer places the model on the current CUDA device
    return dev


def _check_available(dev: torch.device) -> None:
    from .errors import ModelError

    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ModelError(f"device {dev}: CUDA is not available on this machine (torch "
                             f"{torch.__version__}); use --device cpu or model.device=auto")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ModelError(f"device {dev}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    elif dev.type == "mps" and not torch.backends.mps.is_available():
        raise ModelError(f"device {dev}: MPS is not available on this machine; use --device cpu")
    elif dev.type == "xpu" and not (hasattr(torch, "xpu") and torch.xpu.is_available()):
        raise ModelError(f"device {dev}: XPU is not available on this machine; use --device cpu")


@dataclass(frozen=True)
class Processes:
    """This process's place in the job: rank, world size and device (world 1 when not launched)."""

    rank: int
    world: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def split(self, items: list) -> list:
        """This rank's contiguous share of `items` (earlier ranks get the extra one)."""
        if self.world == 1:
            return list(items)
        from accelerate import PartialState

        with PartialState().split_between_processes(list(items)) as mine:
            return list(mine)

    def barrier(self, what: str) -> None:
        """Wait for every process; a dead peer becomes a DistributedError, not a hang or a traceback."""
        if self.world == 1:
            return
        with self._peers(what):
            torch.distributed.barrier()

    def gather(self, items: list, what: str = "results") -> list:
        """Every rank's `items` (picklable), concatenated in rank order, on every rank."""
        if self.world == 1:
            return list(items)
        from accelerate.utils import gather_object

        with self._peers(f"gathering {what}"):
            return list(gather_object(list(items)))

    def broadcast(self, obj, what: str = "a value"):
        """Rank 0's `obj` on every rank."""
        if self.world == 1:
            return obj
        box = [obj if self.is_main else None]
        with self._peers(f"receiving {what}"):
            torch.distributed.broadcast_object_list(box, src=0)
        return box[0]

    @contextlib.contextmanager
    def _peers(self, what: str):
        try:
            yield
        except RuntimeError as e:  # gloo/NCCL: a peer closed its connection or timed out
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise DistributedError(
                f"process {self.rank} of {self.world}: {what} failed because another process of this "
                f"job stopped or timed out ({first}); re-run the same command to resume") from None


def map_batches(procs: Processes, items: list, batch_size: int, fn, desc: str | None = None,
                done: dict[int, list] | None = None, on_batch=None) -> list:
    """[fn(batch) results, flattened] for consecutive batches of `items`, in order, on every process.

    Each process runs `fn` on its contiguous share of the batches (fn returns one result per
    item of its batch); the batches are the same whatever the number of processes. `done`
    holds results of batches finished earlier ({batch index: results}, not recomputed);
    `on_batch(index, results)` is called as each new batch finishes (elrea.evaluation.RowLog).
    """
    from tqdm.auto import tqdm

    done = done or {}
    batches = [items[s:s + batch_size] for s in range(0, len(items), batch_size)]
    mine = procs.split(list(range(len(batches))))
    bar = tqdm(total=sum(len(batches[i]) for i in mine), desc=desc, unit="ex", dynamic_ncols=True,
               disable=desc is None or not procs.is_main or not logging.getLogger("elrea").isEnabledFor(logging.INFO))
    out: list = []
    try:
        for i in mine:
            if i in done and len(done[i]) == len(batches[i]):
                results = done[i]
            else:
                results = list(fn(batches[i]))
                if len(results) != len(batches[i]):
                    raise RuntimeError(f"{fn} returned {len(results)} results for a batch of {len(batches[i])}")
                if on_batch is not None:
                    on_batch(i, results)
            out += results
            bar.update(len(batches[i]))
    finally:
        bar.close()
    return procs.gather(out, desc or "results")


def processes(device: str = "auto") -> Processes:
    """This process's rank, world size and device, setting up the process group when launched.

    On the CPU the backend is gloo; on CUDA it is NCCL with device cuda:LOCAL_RANK. `device`
    may name a device type (`cuda`, `cpu`); a specific index is only honoured in a single
    process (each launched process takes its own LOCAL_RANK device).
    """
    check_device_name(device, "device")
    if not launched():
        return Processes(0, 1, resolve_device(device))
    from accelerate import PartialState

    cpu = device == "cpu" or (device == "auto" and not torch.cuda.is_available())
    if device not in ("auto", "cpu") and torch.device(device).type == "cuda" and not torch.cuda.is_available():
        _check_available(torch.device(device))
    timeout = timedelta(seconds=int(os.environ.get(TIMEOUT_ENV, DEFAULT_TIMEOUT_S)))
    state = PartialState(cpu=cpu, timeout=timeout)
    if state.num_processes == 1:
        raise DistributedError(
            f"this process was launched as one of {os.environ.get('WORLD_SIZE')} but accelerate set up "
            f"a single process for device {device!r}; on a machine without GPUs use --device cpu")
    return Processes(state.process_index, state.num_processes, state.device)


@contextlib.contextmanager
def alone():
    """Inside, transformers' Trainer sees a single process: it trains here without DDP.

    For expert-parallel training (each rank trains its own experts). The launcher's environment
    and accelerate's shared state are hidden, then restored (with the process group, which
    stays initialised throughout) on the way out.
    """
    if not launched():
        yield
        return
    from accelerate import PartialState
    from accelerate.state import AcceleratorState
    from transformers.utils import logging as hf_logging

    cpu = PartialState().device.type == "cpu"
    saved = {k: os.environ.pop(k) for k in _LAUNCH_ENV if k in os.environ}
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # "process group initialised but not DISTRIBUTED": intended here
    AcceleratorState._reset_state(reset_partial_state=True)
    try:
        yield
    finally:
        os.environ.update(saved)
        hf_logging.set_verbosity(verbosity)
        AcceleratorState._reset_state(reset_partial_state=True)
        PartialState(cpu=cpu)
