"""The plugin manager: finds, registers and lists fastmask plugins.

Plugins load lazily and once, on the first call that needs a backend. Outside
plugins come from the ``fastmask`` entry-point group; the environment variable
``FASTMASK_LOAD_PLUGINS`` (comma-separated entry-point names, empty for none)
restricts which are loaded. A plugin that fails to import, or whose hook raises,
is reported in a warning naming it, and fastmask goes on with the others.
"""

from __future__ import annotations

import importlib
import os
import threading
import warnings
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import Any

import pluggy

from . import hookspecs
from .backends import BUILTIN_PLUGINS

__all__ = [
    "PluginInfo",
    "PluginWarning",
    "backends",
    "list_plugins",
    "manager",
    "mask_strategies",
    "register",
    "unregister",
]

ENTRY_POINT_GROUP = "fastmask"


class PluginWarning(UserWarning):
    """A plugin failed to load or its hook raised; fastmask went on without it."""


@dataclass(frozen=True)
class PluginInfo:
    """One registered plugin."""

    name: str
    builtin: bool
    backends: tuple[str, ...]
    mask_strategies: tuple[str, ...]


manager = pluggy.PluginManager("fastmask")
manager.add_hookspecs(hookspecs)

_lock = threading.RLock()
_loaded = False
_builtin_names: set[str] = set()
_backends: dict[str, Any] | None = None
_strategies: dict[str, Any] | None = None
_on_change: list[Any] = []  # callbacks (the router's cache) run when the plugin set changes


def _warn(name: str, what: str, exc: BaseException) -> None:
    warnings.warn(
        f"fastmask plugin {name!r} {what}: {type(exc).__name__}: {exc}; continuing without it",
        PluginWarning,
        stacklevel=3,
    )


def _allowed_entry_points() -> set[str] | None:
    raw = os.environ.get("FASTMASK_LOAD_PLUGINS")
    if raw is None:
        return None
    return {p.strip() for p in raw.split(",") if p.strip()}


def load() -> None:
    """Register the built-in backends and the entry-point plugins (once)."""
    global _loaded
    if _loaded:
        return
    with _lock:
        if _loaded:
            return
        for modname in BUILTIN_PLUGINS:
            module = importlib.import_module(modname)
            manager.register(module, name=modname)
            _builtin_names.add(modname)
        allowed = _allowed_entry_points()
        for ep in entry_points(group=ENTRY_POINT_GROUP):
            if allowed is not None and ep.name not in allowed:
                continue
            if manager.get_plugin(ep.name) is not None or manager.is_blocked(ep.name):
                continue
            try:
                manager.register(ep.load(), name=ep.name)
            except Exception as exc:
                _warn(ep.name, "failed to load", exc)
        _loaded = True
        _changed()


def _changed() -> None:
    global _backends, _strategies
    _backends = None
    _strategies = None
    for callback in _on_change:
        callback()


def register(plugin: object, name: str | None = None) -> str:
    """Register a plugin object (a module or instance with ``@fastmask.hookimpl`` functions).

    Returns
    -------
    str
        The name it was registered under.
    """
    load()
    with _lock:
        registered = manager.register(plugin, name=name)
        if registered is None:
            raise ValueError(f"plugin {name or plugin!r} is blocked and was not registered")
        _changed()
        return registered


def unregister(plugin: object = None, name: str | None = None) -> None:
    """Unregister a plugin, given the object or the name it was registered under."""
    with _lock:
        manager.unregister(plugin=plugin, name=name)
        _changed()


def _collect(hook_name: str) -> dict[str, list[Any]]:
    """Call one hook per plugin, so that one plugin's failure does not hide the others."""
    results: dict[str, list[Any]] = {}
    for impl in getattr(manager.hook, hook_name).get_hookimpls():
        try:
            value = impl.function()
        except Exception as exc:
            _warn(impl.plugin_name, f"raised in {hook_name}()", exc)
            continue
        if value is not None:
            results[impl.plugin_name] = value
    return results


def _bad_result(plugin_name: str, hook: str, what: str) -> None:
    warnings.warn(
        f"fastmask plugin {plugin_name!r}: {hook}() {what}; continuing without it",
        PluginWarning,
        stacklevel=4,
    )


def _backend_list(plugin_name: str, value: Any) -> list[Any]:
    """The backends a plugin's hook returned; anything that is not one is reported."""
    from .backends.base import Backend

    if isinstance(value, (str, bytes)) or not hasattr(value, "__iter__"):
        _bad_result(plugin_name, "fastmask_backends", f"returned {value!r}, not a list")
        return []
    good = []
    for item in value:
        if isinstance(item, Backend) and isinstance(getattr(item, "name", None), str):
            good.append(item)
        else:
            _bad_result(plugin_name, "fastmask_backends",
                        f"returned {item!r}, not a fastmask.Backend with a name")  # fmt: skip
    return good


def _strategy_items(plugin_name: str, value: Any) -> list[tuple[str, Any]]:
    """The (name, factory) pairs a plugin's hook returned; bad ones are reported."""
    try:
        items = list(dict(value).items())
    except (TypeError, ValueError):
        _bad_result(plugin_name, "fastmask_mask_strategies",
                    f"returned {value!r}, not a dict of name: factory")  # fmt: skip
        return []
    good = []
    for name, factory in items:
        if isinstance(name, str) and callable(factory):
            good.append((name, factory))
        else:
            _bad_result(plugin_name, "fastmask_mask_strategies",
                        f"returned {name!r}: {factory!r}, not a name and a callable")  # fmt: skip
    return good


def backends() -> dict[str, Any]:
    """Return the registered backends by name (built-ins first, then plugins)."""
    global _backends
    load()
    with _lock:
        if _backends is None:
            found: dict[str, Any] = {}
            collected = _collect("fastmask_backends")
            for plugin_name in collected:  # registration order: built-ins first
                for backend in _backend_list(plugin_name, collected[plugin_name]):
                    if backend.name in found:
                        warnings.warn(
                            f"fastmask plugin {plugin_name!r} registers backend "
                            f"{backend.name!r} again; the first one is kept",
                            PluginWarning,
                            stacklevel=2,
                        )
                        continue
                    backend._fastmask_plugin = plugin_name
                    found[backend.name] = backend
            _backends = found
        return _backends


def mask_strategies() -> dict[str, Any]:
    """Return the mask-strategy factories contributed by plugins, by name."""
    global _strategies
    load()
    with _lock:
        if _strategies is None:
            found: dict[str, Any] = {}
            collected = _collect("fastmask_mask_strategies")
            for plugin_name in collected:
                for name, factory in _strategy_items(plugin_name, collected[plugin_name]):
                    found.setdefault(name, factory)
            _strategies = found
        return _strategies


def list_plugins() -> list[PluginInfo]:
    """Describe every registered plugin: its name, whether built in, what it adds."""
    load()
    by_plugin_b: dict[str, list[str]] = {}
    for name, backend in backends().items():
        by_plugin_b.setdefault(getattr(backend, "_fastmask_plugin", "?"), []).append(name)
    by_plugin_s = {k: [name for name, _ in _strategy_items(k, v)]
                   for k, v in _collect("fastmask_mask_strategies").items()}  # fmt: skip
    out = []
    for name, _plugin in manager.list_name_plugin():
        out.append(
            PluginInfo(
                name=name,
                builtin=name in _builtin_names,
                backends=tuple(by_plugin_b.get(name, ())),
                mask_strategies=tuple(by_plugin_s.get(name, ())),
            )
        )
    return out
