"""Adapters: how a user's cross-entropy is called and what it returns, declared once per implementation.

The pipeline hands an implementation an (N, V) block of logits and (N,) targets (NumPy, torch or JAX
arrays, by backend) and expects (N,) per-row losses or a 0-d mean. Real code has other shapes; an
``Adapter`` bridges them, each of its settings declared in ``ADAPTER_KEYS`` (the keyword arguments of
``ce_audit.register`` and the ``,key=value`` settings of ``--impl module:attr,key=value,...``):

* ``kwargs``: fixed keyword arguments (``vocab_size=50257``); a **class** target (a loss class such as
  ``nn.CrossEntropyLoss`` or ``timm.loss.LabelSmoothingCrossEntropy``) is instantiated with them and with
  the loss options, then called on the inputs; an ``nn.Module`` instance is called as it is;
* ``inputs``: ``logits-targets`` (PyTorch's order) or ``targets-logits`` (Keras', scikit-learn's y_true,
  y_pred);
* ``sequence`` T: logits go in as (N/T, T, V), targets as (N/T, T); a per-token result (N/T, T) is read
  back row by row. ``shifted``: the implementation shifts labels as a causal LM does (logits[:, t] pairs
  with labels[:, t + 1], e.g. transformers' ForCausalLMLoss): each sequence gets one extra logits position
  (zeros) at its end and labels ``[ignore_index, y_0, …, y_{T−1}]``, so every audited row pairs with its
  own target and the extra position pairs with the padding the implementation ignores;
* ``returns``: ``rows`` (per row or per token), ``mean`` (a 0-d mean over the rows not ignored: audited
  against Σ w_y ℓ / Σ w_y, PyTorch's mean), or ``auto`` (the default contract of a plain function: per-row
  losses, or a 0-d value audited as the mean). A declared form that does not match what came back is an
  ``error`` cell, never guessed;
* ``loss_at``: where the loss is in a returned tuple (an index) or mapping (a key); without it a tuple or
  mapping is an error;
* ``count_keyword``: the keyword through which the implementation takes the number of rows not ignored
  (``num_items_in_batch``) and divides by it (``returns="mean"``);
* ``rename``: the implementation's names of the option keywords (``{"z_loss": "lse_square_scale"}``);
* ``positional``: keyword names (after ``rename``) passed positionally after the two inputs, in order,
  None where a name has no value; a ``torch.autograd.Function`` target is called through ``.apply``,
  which takes positional arguments (``Fn.apply(logits, targets, weight, ignore_index, ...)``); with
  ``loss_at`` the loss is read from the tuple it returns.

Reshaping and padding work on NumPy, torch and JAX arrays alike (the array's own namespace).
"""

from __future__ import annotations

import ast
import inspect
import math
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from typing import Any

from ce_audit.errors import AuditError
from ce_audit.options import DEFAULT_IGNORE_INDEX
from ce_audit.printable import plural

INPUT_ORDERS = ("logits-targets", "targets-logits")
RETURN_FORMS = ("auto", "rows", "mean")


def _one_of(choices: tuple[str, ...]) -> Callable[[str, Any], Any]:
    def parse(key: str, value: Any) -> Any:
        if value not in choices:
            raise AuditError(f"adapter setting {key}={value!r}: choose {', '.join(choices)}")
        return value

    return parse


def _positive_int(key: str, value: Any) -> int | None:
    if value is None:
        return None
    try:
        number = int(value)
    except (TypeError, ValueError):
        number = 0
    if number < 1 or (isinstance(value, float) and value != number) or isinstance(value, bool):
        raise AuditError(f"adapter setting {key}={value!r}: expected a positive integer")
    return number


def _flag(key: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    raise AuditError(f"adapter setting {key}={value!r}: expected true or false")


def _loss_at(key: str, value: Any) -> int | str | None:
    if value is None or isinstance(value, (int, str)) and not isinstance(value, bool):
        return int(value) if isinstance(value, str) and value.lstrip("-").isdigit() else value
    raise AuditError(f"adapter setting {key}={value!r}: expected a tuple index or a mapping key")


def _name(key: str, value: Any) -> str | None:
    if value is None or (isinstance(value, str) and value.isidentifier()):
        return value
    raise AuditError(f"adapter setting {key}={value!r}: expected a keyword argument name")


def _int(key: str, value: Any) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        raise AuditError(f"adapter setting {key}={value!r}: expected an integer") from None


def _renames(key: str, value: Any) -> dict[str, str]:
    if not isinstance(value, Mapping) or not all(
        isinstance(k, str) and isinstance(v, str) and v.isidentifier() for k, v in value.items()
    ):
        raise AuditError(f"adapter setting {key}: expected a mapping of option keywords to keyword names")
    return dict(value)


def _names(key: str, value: Any) -> tuple[str, ...]:
    items = [item for item in value.split("+") if item] if isinstance(value, str) else value
    named = isinstance(items, (list, tuple)) and all(isinstance(i, str) and i.isidentifier() for i in items)
    if not named:
        raise AuditError(f"adapter setting {key}={value!r}: expected keyword names (joined by '+')")
    return tuple(items)


def _kwargs(key: str, value: Any) -> dict[str, Any]:
    if not isinstance(value, Mapping) or not all(isinstance(k, str) for k in value):
        raise AuditError(f"adapter setting {key}: expected a mapping of keyword names to values")
    return dict(value)


@dataclass(frozen=True)
class AdapterKey:
    """One adapter setting: its parser (raises AuditError on a bad value) and what it means."""

    name: str
    parse: Callable[[str, Any], Any]
    help: str


ADAPTER_KEYS: tuple[AdapterKey, ...] = (
    AdapterKey("kwargs", _kwargs, "fixed keyword arguments (--impl: arg.NAME=VALUE); a class gets them too"),
    AdapterKey("inputs", _one_of(INPUT_ORDERS), "argument order: logits-targets or targets-logits"),
    AdapterKey("sequence", _positive_int, "T: logits (N/T, T, V), targets (N/T, T); per-token results"),
    AdapterKey("shifted", _flag, "labels shifted inside the implementation (causal LM); needs sequence"),
    AdapterKey("returns", _one_of(RETURN_FORMS), "rows, mean (0-d, over rows not ignored) or auto"),
    AdapterKey("loss_at", _loss_at, "the loss's index in a returned tuple or key in a returned mapping"),
    AdapterKey("count_keyword", _name, "keyword taking the number of rows not ignored (returns=mean)"),
    AdapterKey("ignore_index", _int, "the label the implementation ignores (default -100)"),
    AdapterKey("rename", _renames, "option keyword → the implementation's (--impl: rename.z_loss=NAME)"),
    AdapterKey("positional", _names, "keywords passed positionally after the inputs, in order (a+b+c)"),
)
KEYS_BY_NAME = {key.name: key for key in ADAPTER_KEYS}


@dataclass(frozen=True)
class Adapter:
    """How to call one implementation and read its result (see the module docstring)."""

    kwargs: Mapping[str, Any] = field(default_factory=dict)
    inputs: str = "logits-targets"
    sequence: int | None = None
    shifted: bool = False
    returns: str = "auto"
    loss_at: int | str | None = None
    count_keyword: str | None = None
    ignore_index: int = DEFAULT_IGNORE_INDEX
    rename: Mapping[str, str] = field(default_factory=dict)
    positional: tuple[str, ...] = ()

    def declared(self) -> dict[str, Any]:
        """The settings that differ from the defaults, JSON-ready (a kwargs value that is not a plain
        number, string, bool or None as its repr)."""
        default = Adapter()
        settings: dict[str, Any] = {}
        for name in KEYS_BY_NAME:
            value = getattr(self, name)
            if value != getattr(default, name):
                settings[name] = value
        if "kwargs" in settings:
            plain = (str, int, float, bool, type(None))
            settings["kwargs"] = {k: v if isinstance(v, plain) else repr(v) for k, v in self.kwargs.items()}
        return settings

    @property
    def row_multiple(self) -> int:
        """Row blocks handed to this implementation must be a multiple of this many rows."""
        return self.sequence or 1

    def call(
        self, function: Callable[..., Any], logits: Any, targets: Any, keywords: dict[str, Any],
        classifier: Any = None,
    ) -> Any:
        """Call ``function`` on an (N, V) block; the result as (N,) values or a 0-d value. With a
        ``classifier`` (linear_ce), ``logits`` are the hidden states and the inputs are (E, C, targets)."""
        n_rows = logits.shape[0]
        keywords = {**self.kwargs, **keywords}
        ignore = keywords.get("ignore_index", self.ignore_index)
        reduced = keywords.get("reduction", "none") != "none"
        keywords = {self.rename.get(name, name): value for name, value in keywords.items()}
        if self.count_keyword:
            keywords[self.count_keyword] = int((targets != ignore).sum()) if targets.ndim == 1 else n_rows
        if self.sequence:
            logits, targets = self._sequences(logits, targets, ignore)
        loss: Any = function
        if is_autograd_function(function):
            loss = function.apply
        elif inspect.isclass(function):
            constructor = {k: v for k, v in keywords.items() if k != self.count_keyword}
            loss = function(**constructor)
            keywords = {k: v for k, v in keywords.items() if k == self.count_keyword}
        arguments = (targets, logits) if self.inputs == "targets-logits" else (logits, targets)
        if classifier is not None:
            arguments = (logits, classifier, targets)
        arguments += tuple(keywords.pop(name, None) for name in self.positional)
        result = self._pick(loss(*arguments, **keywords))
        return self._shape(result, n_rows, reduced=reduced)

    def _sequences(self, logits: Any, targets: Any, ignore: int) -> tuple[Any, Any]:
        n_rows, vocab = logits.shape
        length = self.sequence or 1
        if n_rows % length:
            raise ValueError(f"the row count {n_rows} is not a multiple of the sequence length {length}")
        batch = n_rows // length
        logits = logits.reshape(batch, length, vocab)
        targets = targets.reshape(batch, length, *targets.shape[1:])
        if self.shifted:
            if targets.ndim != 2:
                raise ValueError("shifted labels take class-index targets")
            xp = namespace(logits)
            logits = xp.concatenate([logits, xp.zeros_like(logits[:, :1])], axis=1)
            targets = xp.concatenate([xp.full_like(targets[:, :1], ignore), targets], axis=1)
        return logits, targets

    def _pick(self, result: Any) -> Any:
        if self.loss_at is None:
            if isinstance(result, (tuple, list, Mapping)):
                kind = type(result).__name__
                raise TypeError(f"returned a {kind}; declare where the loss is (loss_at=0 or loss_at='loss')")
            return result
        try:
            return result[self.loss_at]
        except (KeyError, IndexError, TypeError):
            raise TypeError(f"returned {type(result).__name__} without a loss at {self.loss_at!r}") from None

    def _shape(self, result: Any, n_rows: int, *, reduced: bool) -> Any:
        shape = tuple(getattr(result, "shape", ()))
        if reduced:
            return result
        if self.returns == "mean":
            if shape:
                raise ValueError(f"returned shape {shape}, declared returns='mean' (a 0-d value)")
            return result
        if not shape:
            if self.returns == "rows":
                raise ValueError(f"returned a 0-d value, declared returns='rows' ({plural(n_rows, 'value')})")
            return result
        if not self.sequence:
            return result  # the backend checks the shape
        batch = n_rows // self.sequence
        width = self.sequence + 1 if self.shifted else self.sequence
        if math.prod(shape) != batch * width:
            raise ValueError(f"returned shape {shape}, expected per-token losses ({batch}, {width})")
        result = result.reshape(batch, width)
        return result[:, : self.sequence].reshape(n_rows)


def is_autograd_function(target: Any) -> bool:
    """Whether ``target`` is a ``torch.autograd.Function`` subclass (called through ``.apply``)."""
    if not inspect.isclass(target) or "torch" not in sys.modules:
        return False
    import torch

    return issubclass(target, torch.autograd.Function)


def namespace(array: Any) -> Any:
    """The array module of a NumPy, torch or JAX array (concatenate, zeros_like, full_like)."""
    module = type(array).__module__.partition(".")[0]
    if module == "torch":
        import torch

        return torch
    if module in ("jax", "jaxlib"):
        import jax.numpy as jnp

        return jnp
    import numpy as np

    return np


def make_adapter(**settings: Any) -> Adapter:
    """An Adapter from settings by their ``ADAPTER_KEYS`` names (None: the default); unknown → AuditError."""
    values = {}
    for name, value in settings.items():
        key = KEYS_BY_NAME.get(name)
        if key is None:
            raise AuditError(f"unknown adapter setting {name!r}; choose from {', '.join(KEYS_BY_NAME)}")
        if value is not None:
            values[name] = key.parse(name, value)
    adapter = Adapter(**values)
    if adapter.shifted and not adapter.sequence:
        raise AuditError("adapter setting shifted=true needs sequence=T")
    if adapter.count_keyword and adapter.returns != "mean":
        raise AuditError(f"adapter setting count_keyword={adapter.count_keyword} needs returns=mean")
    return adapter


assert {f.name for f in fields(Adapter)} == set(KEYS_BY_NAME)


def _literal(text: str) -> Any:
    """A setting's value as a Python literal (50257, 0.1, True, None, 'x') or, failing that, the text."""
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


@dataclass(frozen=True)
class ImplSpec:
    """``module:attr,key=value,...`` split: the target, and the registration settings after it."""

    target: str
    backend: str | None
    supports: tuple[str, ...]
    dtypes: tuple[str, ...] | None
    adapter: Adapter
    family: str | None = None
    name: str | None = None  # the registry name (the table's title); None: the spec itself


REGISTRATION_KEYS = ("backend", "supports", "dtypes", "family", "name")
MAPPINGS = ("kwargs", "rename")  # adapter settings given entry by entry: arg.NAME=VALUE, rename.OPTION=NAME


def parse_impl_spec(spec: str) -> ImplSpec:
    """Split ``module:attr,backend=numpy,supports=reduction+weight,arg.vocab_size=50257,returns=mean``.

    ``backend``, ``family``, ``supports`` and ``dtypes`` are those of ``ce_audit.register`` (lists joined
    by ``+``); ``arg.NAME=VALUE`` adds a fixed keyword argument (VALUE read as a Python literal, else as
    text), ``rename.OPTION=NAME`` renames an option's keyword, ``name=`` is the name the implementation is
    registered and reported under; every other key is an adapter setting (``ADAPTER_KEYS``).
    """
    target, *parts = spec.split(",")
    backend: str | None = None
    family: str | None = None
    supports: tuple[str, ...] = ()
    dtypes: tuple[str, ...] | None = None
    settings: dict[str, Any] = {}
    kwargs: dict[str, Any] = {}
    renames: dict[str, str] = {}
    registered_name: str | None = None
    for part in parts:
        name, equals, text = part.partition("=")
        name = name.strip()
        if not equals or not name:
            raise AuditError(f"implementation spec {spec!r}: expected key=value after the target: {part!r}")
        if name.startswith("arg."):
            kwargs[name[4:]] = _literal(text)
        elif name.startswith("rename."):
            renames[name[7:]] = text.strip()
        elif name == "name":
            registered_name = text.strip()
        elif name == "backend":
            backend = text
        elif name == "family":
            family = text
        elif name == "supports":
            supports = tuple(item for item in text.split("+") if item)
        elif name == "dtypes":
            dtypes = tuple(item for item in text.split("+") if item)
        elif name in KEYS_BY_NAME and name not in MAPPINGS:
            settings[name] = _literal(text) if name in ("sequence", "loss_at", "ignore_index") else text
        else:
            adapter_keys = (key for key in KEYS_BY_NAME if key not in MAPPINGS)
            valid = ", ".join([*REGISTRATION_KEYS, "arg.NAME", "rename.OPTION", *adapter_keys])
            raise AuditError(f"implementation spec {spec!r}: unknown setting {name!r}; choose from {valid}")
    adapter = make_adapter(kwargs=kwargs, rename=renames or None, **settings)
    return ImplSpec(target.strip(), backend, supports, dtypes, adapter, family, registered_name)
