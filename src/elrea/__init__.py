"""elrea: Ensembles of Low-Rank Expert Adapters (ELREA, ICLR 2025) on transformers + PEFT."""

import logging as _logging
import warnings as _warnings

__version__ = "0.1.0"

# Third-party notices that are not the user's concern, demoted to elrea's debug log (once each):
# bitsandbytes' missing optional CPU kernel (logged at its import), PEFT asking the hub for a
# config it does not need offline, transformers deprecating a method PEFT calls.
_DEMOTED_LOGS = {"bitsandbytes.backends.cpu.ops": "Failed to load CPU gemm_4bit_forward"}
_DEMOTED_WARNINGS = (r"Could not find a config file in .* will assume that the vocabulary was not modified",
                     r"`is_gradient_checkpointing` is deprecated")


class _Demote(_logging.Filter):
    def __init__(self, prefix: str):
        super().__init__()
        self.prefix, self.seen = prefix, False

    def filter(self, record) -> bool:
        if not record.getMessage().startswith(self.prefix):
            return True
        if not self.seen:
            self.seen = True
            _logging.getLogger(__name__).debug("%s: %s", record.name, record.getMessage())
        return False


for _name, _prefix in _DEMOTED_LOGS.items():
    _logging.getLogger(_name).addFilter(_Demote(_prefix))
for _message in _DEMOTED_WARNINGS:
    _warnings.filterwarnings("ignore", message=_message)


def __getattr__(name):  # lazy: `import elrea` stays light, `from elrea import ELREA` loads torch
    if name == "ELREA":
        from .api import ELREA
        return ELREA
    if name == "fit":
        from .pipeline import fit
        return fit
    if name == "load_config":
        from .config import load_config
        return load_config
    raise AttributeError(name)


__all__ = ["ELREA", "fit", "load_config", "__version__"]
