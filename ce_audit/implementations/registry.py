"""The implementation registry: each entry names a backend and a function, imported only when called."""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from ce_audit.backends import BACKEND_NAMES
from ce_audit.dtypes import DTYPE_NAMES
from ce_audit.errors import AuditError
from ce_audit.options import LossOptions, call_keywords


@dataclass(frozen=True)
class Implementation:
    """One audited cross-entropy: ``fn(logits, targets, **tunables, **options) -> per-row losses``
    (``linear_ce``: ``fn(hidden, classifier, targets, ...)``, the classifier in ``__call__``'s ``weight``).

    ``target`` is the function itself or a ``"module:attribute"`` string resolved on first call, so
    that listing the registry never imports a framework. ``family`` is the loss it computes (``ce``,
    ``focal``, ``binary`` or ``linear_ce``); ``supports`` names the options (ce_audit.options.SUPPORTABLE)
    it accepts as keyword arguments (``call_keywords``) — ``reduction``, ``weight``, ``ignore_index``, ... —
    or, for ``probs``, as targets.
    ``adapter`` (user implementations) says how it is called and what it returns (ce_audit.adapters).
    """

    name: str
    backend: str
    target: Callable[..., Any] | str
    description: str
    origin: str
    dtypes: tuple[str, ...] = DTYPE_NAMES
    tunables: tuple[str, ...] = ()
    builtin: bool = True
    extra: Mapping[str, Any] = field(default_factory=dict)
    supports: frozenset[str] = frozenset()
    family: str = "ce"
    adapter: Any = None  # ce_audit.adapters.Adapter: how a user implementation is called (None: directly)
    takes_options: bool = False  # receives the LossOptions as ``options`` (the built-in ``rounded``)

    def function(self) -> Callable[..., Any]:
        """The callable, importing its module if it was registered by name."""
        if callable(self.target):
            return self.target
        module_name, _, attribute = self.target.partition(":")
        return getattr(importlib.import_module(module_name), attribute)

    def __call__(
        self,
        logits: Any,
        targets: Any,
        settings: Mapping[str, Any] | None = None,
        options: LossOptions | None = None,
        weight: Any = None,
    ) -> Any:
        """Call with the tunables it declares, then the loss options as keyword arguments
        (``call_keywords``) and the class weights as ``weight``; ``takes_options``: the LossOptions
        itself as ``options`` instead of its keywords."""
        settings = settings or {}
        kwargs = {name: settings[name] for name in self.tunables if name in settings}
        options = options or LossOptions()
        kwargs.update({"options": options} if self.takes_options else call_keywords(options))
        classifier = weight if self.family == "linear_ce" else None  # fn(hidden, classifier, targets)
        if weight is not None and classifier is None:
            kwargs["weight"] = weight
        if self.adapter is not None:
            if "reduction" in self.supports:  # explicit: a default of "mean" never makes "none" cells a mean
                kwargs.setdefault("reduction", options.reduction)
            return self.adapter.call(self.function(), logits, targets, kwargs, classifier=classifier)
        if classifier is not None:
            return self.function()(logits, classifier, targets, **kwargs)
        return self.function()(logits, targets, **kwargs)


REGISTRY: dict[str, Implementation] = {}


def add(implementation: Implementation, *, replace: bool = False) -> Implementation:
    """Add to the registry; a second entry of the same name raises AuditError unless ``replace``."""
    if implementation.backend not in BACKEND_NAMES:
        raise AuditError(
            f"implementation {implementation.name!r}: unknown backend {implementation.backend!r}"
        )
    if implementation.name in REGISTRY and not replace:
        raise AuditError(f"implementation name {implementation.name!r} is already registered")
    REGISTRY[implementation.name] = implementation
    return implementation


def remove(name: str) -> None:
    """Drop an entry (no error when absent)."""
    REGISTRY.pop(name, None)


def registered(names: Iterable[str]) -> tuple[Implementation, ...]:
    """The entries of these names, once each in the order first named (names not registered left out)."""
    return tuple(REGISTRY[name] for name in dict.fromkeys(names) if name in REGISTRY)


def resolve(names: list[str] | tuple[str, ...] | None) -> list[Implementation]:
    """The named implementations in the order given (all, in registry order, when ``names`` is empty)."""
    if not names:
        return list(REGISTRY.values())
    unknown = [name for name in names if name not in REGISTRY]
    if unknown:
        raise AuditError(f"unknown implementation {unknown[0]!r}; `ce-audit list` shows the names")
    return [REGISTRY[name] for name in dict.fromkeys(names)]
