"""Name -> model factory registry.

Data flow: ``@register_model("name")`` stores a keyword-only factory;
``create_model("name", **kwargs)`` calls it and returns the ``nn.Module``.

The built-in models live in ``famnet_pl.models.famnet`` (FAMNet and its
branches), ``famnet_pl.models.frl_dgt`` (FRL-DGT) and ``famnet_pl.models.ststnet``
(STSTNet), which import this module to register them. To make ``import famnet_pl.models.registry`` alone
enough, :func:`create_model` and :func:`list_models` import the built-ins
lazily (importing them at the top here would be circular).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any, TypeVar

from torch import nn

F = TypeVar("F", bound=Callable[..., nn.Module])

_REGISTRY: dict[str, Callable[..., nn.Module]] = {}
_BUILTIN_MODULES = ("famnet_pl.models.famnet", "famnet_pl.models.frl_dgt", "famnet_pl.models.ststnet")


def register_model(name: str) -> Callable[[F], F]:
    """Decorator registering a model factory under ``name``.

    Args:
        name: Registry key, e.g. ``"famnet_r18"``.

    Returns:
        The decorator; it returns the factory unchanged.

    Raises:
        ValueError: If another factory is already registered under ``name``.
    """

    def decorator(factory: F) -> F:
        existing = _REGISTRY.get(name)
        # Re-registering the very same function (module reload) is harmless.
        same = existing is not None and (existing.__module__, existing.__qualname__) == (
            factory.__module__,
            factory.__qualname__,
        )
        if existing is not None and not same:
            raise ValueError(f"Model name {name!r} is already registered to {existing.__qualname__}")
        _REGISTRY[name] = factory
        return factory

    return decorator


def _import_builtins() -> None:
    """Import the modules whose import registers the built-in models."""
    for module in _BUILTIN_MODULES:
        importlib.import_module(module)


def list_models() -> list[str]:
    """Return the sorted names of all registered models."""
    _import_builtins()
    return sorted(_REGISTRY)


def create_model(name: str, **kwargs: Any) -> nn.Module:
    """Build a registered model.

    Args:
        name: Registered model name (see :func:`list_models`).
        **kwargs: Keyword arguments forwarded to the factory.

    Returns:
        The constructed model.

    Raises:
        UnknownModelError: (a KeyError) if ``name`` is not registered; the message lists the names.
    """
    _import_builtins()
    if name not in _REGISTRY:
        raise UnknownModelError(f"unknown model {name!r} (--model.model); registered models: "
                                f"{', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name](**kwargs)


class UnknownModelError(KeyError):
    """A model name that is not registered (a KeyError whose message reads as a sentence)."""

    def __str__(self) -> str:
        return str(self.args[0])


class ModelOptionError(ValueError):
    """A model option that a config must change, e.g. one that moved to ``model.loss_weights`` (a
    ValueError whose message is one line naming the fix, for command entry points to print as is)."""
