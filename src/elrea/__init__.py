"""elrea: Ensembles of Low-Rank Expert Adapters (ELREA, ICLR 2025) on transformers + PEFT."""

__version__ = "0.1.0"


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
