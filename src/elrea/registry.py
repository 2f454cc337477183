"""Registries of plugins: routers, projectors, preconditioners and clustering methods.

As lm-evaluation-harness's registry does, a registry maps names to lazy "module:attribute"
targets: listing its names (what config validation and `--help` need) imports nothing, and a
plugin is imported the first time it is used, so `import elrea.config` stays free of torch.
A registry with a `package` also holds one plugin per public module of that package, under the
module's name (the module's `PLUGIN`): adding a router is adding one module to elrea/routers/.
Other packages add plugins with `register(name, "their.module:Thing")` or, installed, with an
entry point in the group `elrea.<kind>s` (e.g. `[project.entry-points."elrea.routers"]`).

    ROUTERS          name -> elrea.routers.RouterPlugin (the router, how it is fitted, its fields)
    PROJECTORS       name -> projector class (num_params, dim, seed, nnz) -> elrea.projection.Projector
    PRECONDITIONERS  name -> builder (adapter_dir, parameter names) -> elrea.features.Preconditioner
    CLUSTERERS       name -> function (X, ClusterConfig, seed) -> (labels, info)
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import pkgutil

from .errors import unknown_name


class Registry:
    """Names -> plugins of one kind, resolved lazily."""

    def __init__(self, kind: str, targets: dict[str, str] | None = None, package: str | None = None,
                 group: str | None = None):
        self.kind, self.package = kind, package
        self._targets: dict[str, object] = dict(targets or {})
        self._group = group
        self._loaded: dict[str, object] = {}
        self._modules: list[str] | None = None   # the package's plugin modules, listed once

    def _package_names(self) -> list[str]:
        if self.package is None:
            return []
        if self._modules is None:
            spec = importlib.util.find_spec(self.package)
            self._modules = [m.name for m in pkgutil.iter_modules(spec.submodule_search_locations or [])
                             if not m.name.startswith("_")]
        return self._modules

    def _entry_points(self) -> dict[str, str]:
        if self._group is None:
            return {}
        return {ep.name: ep.value for ep in importlib.metadata.entry_points(group=self._group)}

    def names(self) -> tuple[str, ...]:
        """Every registered name, sorted; imports no plugin."""
        return tuple(sorted({*self._targets, *self._package_names(), *self._entry_points()}))

    def __contains__(self, name) -> bool:
        return name in self.names()

    def __iter__(self):
        return iter(self.names())

    def register(self, name: str, target) -> None:
        """Add (or replace) a plugin: an object, or a lazy "module:attribute" string."""
        self._targets[name] = target
        self._loaded.pop(name, None)

    def unregister(self, name: str) -> None:
        """Remove a plugin added with `register`."""
        self._targets.pop(name, None)
        self._loaded.pop(name, None)

    def check(self, name: str) -> str:
        """`name` if registered, else the ConfigError that lists the valid names."""
        if name not in self:
            raise unknown_name(self.kind, name, self.names())
        return name

    def __getitem__(self, name: str):
        return self.get(name)

    def get(self, name: str):
        """The plugin registered as `name` (imported on first use)."""
        if name in self._loaded:
            return self._loaded[name]
        self.check(name)
        target = self._targets.get(name)
        if target is None and name in self._package_names():
            target = f"{self.package}.{name}:PLUGIN"
        if target is None:
            target = self._entry_points()[name]
        plugin = _resolve(target) if isinstance(target, str) else target
        self._loaded[name] = plugin
        return plugin


def _resolve(target: str):
    module, _, attr = target.partition(":")
    obj = importlib.import_module(module)
    for part in attr.split(".") if attr else []:
        obj = getattr(obj, part)
    return obj


ROUTERS = Registry("router", package="elrea.routers", group="elrea.routers")
PROJECTORS = Registry("projection", {"sjlt": "elrea.projection:SparseProjector",
                                     "rademacher": "elrea.projection:RademacherProjector"}, group="elrea.projectors")
PRECONDITIONERS = Registry("preconditioner", {"adam": "elrea.features:adam_from_run",
                                              "sgd": "elrea.features:sgd_from_run"}, group="elrea.preconditioners")
CLUSTERERS = Registry("clustering method", {"birch": "elrea.clustering:birch",
                                            "kmeans": "elrea.clustering:kmeans"}, group="elrea.clusterers")
