"""User implementations: the ``register`` decorator and the loaders of plugin files, modules and entry points.

A plugin is ordinary Python that calls ``ce_audit.register`` at import time. It is loaded from
``--plugin path/to/file.py``, ``--plugin package.module``, from ``--impl module:function`` (an undecorated
torch function, registered under the spec itself) or from the entry-point group ``ce_audit.implementations``
of an installed package. Plugin names may not shadow a built-in; a failing import is an AuditError.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import importlib.util
import re
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path
from types import ModuleType
from typing import Any, TypeVar

from ce_audit.adapters import Adapter, make_adapter, parse_impl_spec
from ce_audit.backends import BACKEND_NAMES, backend_class
from ce_audit.dtypes import DTYPE_NAMES, FORMATS
from ce_audit.errors import AuditError
from ce_audit.implementations import REGISTRY, Implementation, add, resolve
from ce_audit.options import FAMILIES, SUPPORTABLE

ENTRY_POINT_GROUP = "ce_audit.implementations"
ATTRIBUTE = "__ce_audit_implementation__"  # set on a registered function: its registry entry
_NAME_PATTERN = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.+\-]*$")
_FILE_MODULE_PREFIX = "ce_audit_plugin_"

F = TypeVar("F", bound=Callable[..., Any])

# modules: imported as plugins (isolated() forgets them); stamps: (mtime, size) of each plugin file loaded
# names: the registry name of each --impl spec registered under a name=... of its own
_state: dict[str, Any] = {"entry_points_loaded": False, "modules": [], "stamps": {}, "names": {}}


def _source(function: Callable[..., Any]) -> str:
    """Where a function is defined: file (or module) and qualified name; re-registering it is not a clash."""
    code = getattr(function, "__code__", None)
    where = code.co_filename if code is not None else getattr(function, "__module__", "?")
    return f"{where}:{getattr(function, '__qualname__', repr(function))}"


def _describe(function: Callable[..., Any]) -> str:
    doc = (getattr(function, "__doc__", None) or "").strip()
    return doc.splitlines()[0] if doc else "user implementation"


def _origin(function: Callable[..., Any]) -> str:
    module = getattr(function, "__module__", "") or ""
    if module.startswith(_FILE_MODULE_PREFIX):
        code = getattr(function, "__code__", None)
        return f"plugin {code.co_filename}" if code is not None else "plugin file"
    return f"plugin {module}" if module else "plugin"


def check_family(family: Any, where: str) -> str:
    """``family`` when ce-audit audits it (ce_audit.options.FAMILIES); an AuditError that starts with
    ``where`` otherwise."""
    if family in FAMILIES:
        return str(family)
    raise AuditError(f"{where}: unknown family {family!r}; choose {', '.join(FAMILIES)}")


def add_function(
    function: Callable[..., Any],
    name: str,
    *,
    backend: str = "torch",
    family: str = "ce",
    description: str | None = None,
    dtypes: tuple[str, ...] | list[str] = DTYPE_NAMES,
    tunables: tuple[str, ...] | list[str] = (),
    origin: str | None = None,
    spec: bool = False,
    supports: tuple[str, ...] | list[str] = (),
    adapter: Adapter | None = None,
    source_spec: str | None = None,
) -> Implementation:
    """Register ``function`` under ``name``; a clash with a built-in or another function raises AuditError.

    ``spec``: the name is a ``module:function`` spec (it may hold ':' and '/', which names may not).
    ``family``: the loss it computes, ``ce``, ``binary``, ``focal`` or ``linear_ce`` (FAMILIES); it runs
    in the sweeps of that loss only.
    ``supports``: option names of ``ce-audit list`` (ce_audit.options.SUPPORTABLE); ``adapter``: how it is
    called (ce_audit.adapters; default: ``fn(logits, targets, **options)``); ``source_spec``: the
    ``--impl`` spec it was registered from (a process that loads that spec again has it).
    """
    if not isinstance(name, str) or not (_NAME_PATTERN.match(name) or (spec and name.strip() == name != "")):
        raise AuditError(f"invalid implementation name {name!r}: use letters, digits, '_', '.', '+' or '-'")
    if backend not in BACKEND_NAMES:
        choices = " or ".join(BACKEND_NAMES)
        raise AuditError(f"implementation {name!r}: unknown backend {backend!r}; choose {choices}")
    family = check_family(family, f"implementation {name!r}")
    if not dtypes:
        raise AuditError(f"implementation {name!r}: the dtype list is empty")
    unknown = [dtype for dtype in dtypes if dtype not in FORMATS]
    if unknown:
        raise AuditError(f"implementation {name!r}: unknown dtype {unknown[0]!r}")
    if not callable(function):
        raise AuditError(f"implementation {name!r}: {type(function).__name__} is not callable")
    if isinstance(supports, str):
        supports = [supports]
    unknown = [option for option in supports if option not in SUPPORTABLE]
    if unknown:
        raise AuditError(
            f"implementation {name!r}: unknown option {unknown[0]!r} in supports; "
            f"choose from {', '.join(SUPPORTABLE)}"
        )
    source = _source(function)
    existing = REGISTRY.get(name)
    if existing is not None:
        if existing.builtin:
            raise AuditError(f"plugin implementation {name!r} collides with the built-in of that name")
        if existing.extra.get("source") != source:
            raise AuditError(
                f"implementation name {name!r} is already registered by {existing.extra.get('source', '?')}"
            )
    implementation = Implementation(
        name=name,
        backend=backend,
        target=function,
        description=description if description is not None else _describe(function),
        origin=origin or _origin(function),
        dtypes=tuple(dtypes),
        tunables=tuple(tunables),
        builtin=False,
        extra={"source": source, **({"spec": source_spec} if source_spec else {})},
        supports=frozenset(supports),
        family=family,
        adapter=adapter if adapter is not None else Adapter(),
    )
    add(implementation, replace=existing is not None)
    if not isinstance(function, type):  # never mark a library's class (its instances would inherit it)
        with contextlib.suppress(AttributeError, TypeError):  # some C callables take no attributes
            setattr(function, ATTRIBUTE, implementation)
    return implementation


def register(
    name: str | None = None,
    *,
    backend: str = "torch",
    family: str = "ce",
    supports: tuple[str, ...] | list[str] = (),
    dtypes: tuple[str, ...] | list[str] = DTYPE_NAMES,
    description: str | None = None,
    tunables: tuple[str, ...] | list[str] = (),
    kwargs: dict[str, Any] | None = None,
    inputs: str | None = None,
    sequence: int | None = None,
    shifted: bool | None = None,
    returns: str | None = None,
    loss_at: int | str | None = None,
    count_keyword: str | None = None,
    ignore_index: int | None = None,
    rename: dict[str, str] | None = None,
    positional: tuple[str, ...] | list[str] | None = None,
) -> Callable[[F], F]:
    """Decorator: ``@ce_audit.register("my_ce", supports=["reduction"])`` adds ``fn(logits, targets)``.

    ``backend="torch"`` passes (N, V) tensors of the audited dtype on the audited device and int64 targets;
    ``backend="numpy"`` passes NumPy arrays (bfloat16 as ml_dtypes.bfloat16); ``backend="triton"`` passes
    torch tensors to a function that launches Triton kernels: on a CUDA GPU, or without one on the CPU
    under Triton's interpreter, fixed and self-tested (docs/triton.md). ``supports`` names the loss
    options the function takes (the names ``ce-audit list`` shows: ``reduction``, ``weight``,
    ``ignore_index``, ``label_smoothing``, ``softcap``, ``z_loss``, ``probs``): they arrive as keyword
    arguments with PyTorch's names and meanings (``probs``: (N, V) probability targets); cells with an
    option not declared are skipped. It returns (N,) per-row losses of any floating dtype, or a 0-d value
    (the mean over rows not ignored). ``family`` is the loss it computes and the sweeps it runs in:
    ``"ce"`` (softmax cross-entropy, the default sweep), ``"binary"`` (``fn(logits, targets)`` with (N, V)
    float targets in [0, 1], per-element losses (N, V): ``--loss binary``), ``"focal"`` (softmax focal
    loss, called with ``focal_gamma`` and ``focal_alpha`` keywords: sweeps with ``--focal-gamma``) or
    ``"linear_ce"`` (``fn(hidden, classifier, targets)``: E (N, D), C (V, D), cross-entropy of E·Cᵀ;
    ``--loss linear_ce``; audited with ``reduction`` alone, gradients with respect to E and C).
    ``kwargs``, ``inputs``, ``sequence``, ``shifted``, ``returns``, ``loss_at``, ``count_keyword``,
    ``ignore_index``, ``rename`` and ``positional`` describe other call and return forms
    (ce_audit.adapters.ADAPTER_KEYS). The target (a
    function, a loss class, a module) is returned unchanged.
    """
    adapter = make_adapter(
        kwargs=kwargs, inputs=inputs, sequence=sequence, shifted=shifted, returns=returns, loss_at=loss_at,
        count_keyword=count_keyword, ignore_index=ignore_index, rename=rename, positional=positional,
    )  # fmt: skip

    def decorate(function: F) -> F:
        label = name if isinstance(name, str) else getattr(function, "__name__", None)
        add_function(
            function, label or "", backend=backend, family=family, description=description, dtypes=dtypes,
            tunables=tunables, supports=supports, adapter=adapter,
        )  # fmt: skip
        return function

    if callable(name):  # used bare: @register
        return decorate(name)
    return decorate


def _one_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0]}" if text else type(error).__name__


def _is_path(spec: str) -> bool:
    return spec.endswith(".py") or "/" in spec or "\\" in spec


def _load_file(path: Path, spec: str) -> ModuleType:
    if not path.is_file():
        raise AuditError(f"plugin file {spec} does not exist (relative paths start at the current directory)")
    resolved = path.resolve()
    digest = hashlib.sha1(str(resolved).encode()).hexdigest()[:10]
    module_name = f"{_FILE_MODULE_PREFIX}{re.sub(r'[^0-9A-Za-z_]', '_', resolved.stem)}_{digest}"
    stamp = (resolved.stat().st_mtime_ns, resolved.stat().st_size)
    if module_name in sys.modules and _state["stamps"].get(module_name) == stamp:
        return sys.modules[module_name]  # loaded already, unchanged since
    module_spec = importlib.util.spec_from_file_location(module_name, resolved)
    if module_spec is None or module_spec.loader is None:
        raise AuditError(f"cannot load plugin file {spec}: not a Python source file")
    module = importlib.util.module_from_spec(module_spec)
    folder = str(resolved.parent)
    if folder not in sys.path:  # a plugin file imports the modules beside it, as a script would
        sys.path.append(folder)
    sys.modules[module_name] = module
    _state["modules"].append(module_name)
    try:
        module_spec.loader.exec_module(module)
    except AuditError as error:
        del sys.modules[module_name]
        raise AuditError(f"plugin {spec}: {error}") from None
    except Exception as error:  # noqa: BLE001 - any failure to import is a user error
        del sys.modules[module_name]
        raise AuditError(f"cannot load plugin file {spec}: {_one_line(error)}") from None
    except SystemExit as error:
        del sys.modules[module_name]
        raise AuditError(f"cannot load plugin file {spec}: it called sys.exit({error.code!r})") from None
    _state["stamps"][module_name] = stamp
    return module


def _track(module: str) -> None:
    """Remember a module and its new parent packages, so that isolated() can forget them."""
    parts = module.split(".")
    packages = [".".join(parts[: i + 1]) for i in range(len(parts))]
    _state["modules"].extend(package for package in packages if package not in sys.modules)


def _import_module(name: str, spec: str) -> ModuleType:
    """Import a dotted module; the current directory is searched too (as `python -m` would)."""
    _track(name)
    try:
        try:
            return importlib.import_module(name)
        except ModuleNotFoundError as missing:
            cwd = str(Path.cwd())
            top = name.partition(".")[0]
            if missing.name != top or cwd in sys.path or "" in sys.path:
                raise
            sys.path.append(cwd)
            return importlib.import_module(name)
    except AuditError as error:
        raise AuditError(f"plugin {spec}: {error}") from None
    except Exception as error:  # noqa: BLE001 - any failure to import is a user error
        raise AuditError(f"cannot import plugin module {name!r}: {_one_line(error)}") from None


def _before_import() -> None:
    """What must happen before user code imports its frameworks: without a CUDA GPU, Triton kernels run
    under the interpreter, which triton reads as a kernel is defined (ce_audit.triton_interpreter)."""
    from ce_audit.triton_interpreter import enable_if_needed

    enable_if_needed()


def load_plugin(spec: str) -> ModuleType:
    """Import ``path/to/file.py`` or ``package.module``; its decorated functions join the registry."""
    spec = spec.strip()
    if not spec:
        raise AuditError("empty plugin name")
    _before_import()
    if _is_path(spec):
        return _load_file(Path(spec), spec)
    if not re.match(r"^[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*$", spec):
        raise AuditError(f"plugin {spec!r} is neither a .py file nor a dotted module name")
    return _import_module(spec, spec)


def load_function(spec: str) -> Implementation:
    """``module:attr`` or ``file.py:attr``, optionally followed by ``,key=value`` settings: the registry
    entry, registering it if needed.

    An undecorated target is registered under the spec itself: a torch function unless the settings say
    otherwise (``backend=``, ``family=``, ``supports=a+b``, ``dtypes=``, ``arg.NAME=VALUE`` and the adapter
    settings of ce_audit.adapters.ADAPTER_KEYS; see ``adapters.parse_impl_spec``). A decorated function
    named without settings is its registered entry.
    """
    if spec in REGISTRY:
        return REGISTRY[spec]
    if spec in _state["names"] and _state["names"][spec] in REGISTRY:
        return REGISTRY[_state["names"][spec]]
    declared = parse_impl_spec(spec)
    module_part, _, attribute = declared.target.rpartition(":")
    if not module_part or not attribute:
        raise AuditError(f"implementation spec {spec!r}: expected module:function")
    module = load_plugin(module_part)
    target: Any = module
    for part in attribute.split("."):
        if not hasattr(target, part):
            raise AuditError(f"implementation spec {spec!r}: {module_part} has no attribute {attribute!r}")
        target = getattr(target, part)
    registered = getattr(target, ATTRIBUTE, None)
    plain = declared.target == spec
    if plain and isinstance(registered, Implementation) and REGISTRY.get(registered.name) is registered:
        return registered
    if not callable(target):
        raise AuditError(f"implementation spec {spec!r}: {type(target).__name__} is not callable")
    implementation = add_function(
        target, declared.name or spec, backend=declared.backend or "torch", family=declared.family or "ce",
        dtypes=declared.dtypes or DTYPE_NAMES, supports=declared.supports, adapter=declared.adapter,
        origin=f"--impl {declared.target}", spec=declared.name is None, source_spec=spec,
    )  # fmt: skip
    _state["names"][spec] = implementation.name
    return implementation


def load_entry_points() -> list[str]:
    """Load every entry point of the group ``ce_audit.implementations`` (once per process).

    An entry point may name a module (its decorated functions register on import) or a function
    (registered, as a torch implementation, under the entry point's name unless already decorated).
    """
    if _state["entry_points_loaded"]:
        return []
    _state["entry_points_loaded"] = True
    loaded = []
    seen = set()
    for entry in metadata.entry_points(group=ENTRY_POINT_GROUP):
        _before_import()
        if (entry.name, entry.value) in seen:
            continue
        seen.add((entry.name, entry.value))
        where = f"entry point {entry.name} = {entry.value}"
        dist = getattr(entry, "dist", None)
        if dist is not None:
            where += f" (package {dist.metadata['Name']})"
        _track(entry.module)
        try:
            target = entry.load()
        except AuditError as error:
            raise AuditError(f"{where}: {error}") from None
        except Exception as error:  # noqa: BLE001 - a broken plugin package is a user error
            raise AuditError(f"cannot load {where}: {_one_line(error)}") from None
        if not isinstance(target, ModuleType) and not isinstance(
            getattr(target, ATTRIBUTE, None), Implementation
        ):
            try:
                add_function(target, entry.name, origin=f"entry point {entry.value}")
            except AuditError as error:
                raise AuditError(f"{where}: {error}") from None
        loaded.append(entry.name)
    return loaded


def prepare(
    impls: tuple[str, ...] | list[str],
    plugins: tuple[str, ...] | list[str] = (),
    *,
    entry_points: bool = True,
    specs: tuple[str, ...] | list[str] = (),
) -> list[Implementation]:
    """Load entry points and plugins, register ``module:function`` specs (``impls`` and the run's
    ``specs``, whose entries may go by a ``name=`` of their own), and resolve the names."""
    if entry_points:
        load_entry_points()
    for spec in plugins:
        load_plugin(spec)
    for spec in specs:
        if ":" in spec:
            load_function(spec)
    names = [load_function(name).name if name not in REGISTRY and ":" in name else name for name in impls]
    resolved = resolve(tuple(names))
    for backend in dict.fromkeys(impl.backend for impl in resolved):
        backend_class(backend).check_ready()  # e.g. the Triton interpreter's self-test: refused if it fails
    return resolved


@contextmanager
def isolated() -> Iterator[None]:
    """Run as a fresh process would (entry points loaded anew), then restore the registry, loaded plugin
    modules and the entry-point flag on exit (for test suites)."""
    registry = dict(REGISTRY)
    loaded = len(_state["modules"])
    path = list(sys.path)
    flag = _state["entry_points_loaded"]
    names = dict(_state["names"])
    _state["entry_points_loaded"] = False
    try:
        yield
    finally:
        REGISTRY.clear()
        REGISTRY.update(registry)
        for name in _state["modules"][loaded:]:
            sys.modules.pop(name, None)
        del _state["modules"][loaded:]
        sys.path[:] = path
        _state["entry_points_loaded"] = flag
        _state["names"] = names
