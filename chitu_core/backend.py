"""Backend discovery, selection and binding into a plain ``Ops`` table.

Backends are found only through the entry-point group ``chitu.backends``; each
entry point names a module (or object) holding ``@hookimpl`` functions. Every
backend gets its own pluggy ``PluginManager`` (exactly one backend is active
per process), which validates the implementations against
``chitu_core/hookspecs.py``. ``load_backend`` then resolves every hook once into
an ``Ops`` object whose attributes are plain functions: the hot path never goes
through pluggy's dispatch loop.
"""

from __future__ import annotations

import functools
import importlib.metadata
import inspect
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import pluggy

from chitu_core import hookspecs
from chitu_core.backend_info import BackendInfo, BackendOptions, OpPath
from chitu_core.contract import check_contract
from chitu_core.errors import (
    BackendUnavailableError,
    ContractVersionError,
    PluginLoadError,
    PluginSignatureError,
    UnknownBackendError,
)
from chitu_core.ops import GENERIC_OPS
from chitu_core.ops.memory import device_of_type

logger = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "chitu.backends"
HOOK_PREFIX = "chitu_"
REQUIRED_HOOKS = ("chitu_backend_info", "chitu_check_available")
# Hooks called once when binding, never bound into ``Ops`` (see ``bind_ops``).
LIFECYCLE_HOOKS = ("chitu_configure",)

# Every op of the contract, in spec order: the hook names without their prefix.
OP_NAMES: tuple[str, ...] = tuple(
    name[len(HOOK_PREFIX) :]
    for name, obj in vars(hookspecs).items()
    if name.startswith(HOOK_PREFIX)
    and callable(obj)
    and name not in REQUIRED_HOOKS + LIFECYCLE_HOOKS
)

# Ops that consume the opaque handle of ``prepare_weight`` (see hookspecs' module docstring).
WEIGHT_HANDLE_OPS = ("linear", "fused_moe")
COLLECTIVE_OPS = (
    "all_reduce",
    "all_reduce_add_rms_norm",
    "all_gather",
    "reduce_scatter",
    "send",
    "recv",
)
# An op that makes an opaque handle -> the ops that consume it: bound (and demoted) together.
HANDLE_GROUPS = {"prepare_weight": WEIGHT_HANDLE_OPS, "new_group": COLLECTIVE_OPS}
# Optional ops whose fallback is the composition of other ops of the same backend (the
# generic function, called with the backend's bound ops as keyword arguments): a
# backend may implement their handle's producer without them.
COMPOSED_OPS: dict[str, tuple[str, ...]] = {
    "all_reduce_add_rms_norm": ("all_reduce", "add_rms_norm"),
}


@dataclass
class InstalledBackend:
    """One entry point of ``chitu.backends`` and what loading it revealed.

    ``load_error`` is set when the module failed to import or to validate (then
    ``info`` is None), and ``load_error_type`` is the error selecting it raises.
    ``unavailable_reason`` is None when the backend can run here.
    """

    name: str
    distribution: str
    version: str
    load_error: str | None = None
    load_error_type: type[PluginLoadError] = PluginLoadError
    info: BackendInfo | None = None
    unavailable_reason: str | None = None
    native_ops: tuple[str, ...] = ()
    plugin_manager: pluggy.PluginManager | None = field(default=None, repr=False)

    @property
    def is_available(self) -> bool:
        return self.load_error is None and self.unavailable_reason is None


class Ops:
    """The bound op table of the active backend: one plain function per op.

    Attributes are the op names of ``OP_NAMES`` (``ops.linear(x, w, bias)``...)
    plus ``info`` (the backend's ``BackendInfo``), ``native`` (op names the
    backend implements), ``demoted`` (native ops replaced by the generic one,
    e.g. because they failed conformance), ``options`` (the ``BackendOptions`` it
    was configured with) and ``paths`` (``chitu_configure``'s answer for its native
    ops: op name -> ``OpPath``).
    """

    def __init__(
        self,
        info: BackendInfo,
        functions: dict[str, Callable[..., Any]],
        native: Iterable[str],
        demoted: Iterable[str] = (),
        options: BackendOptions | None = None,
        paths: dict[str, OpPath] | None = None,
    ) -> None:
        self.info = info
        self.native = frozenset(native)
        self.demoted = frozenset(demoted)
        self.options = options or BackendOptions()
        self.paths = dict(paths or {})
        for name in OP_NAMES:
            setattr(self, name, functions[name])

    @property
    def fallback(self) -> frozenset[str]:
        """Op names served by the generic implementation."""
        return frozenset(OP_NAMES) - self.native

    def __repr__(self) -> str:
        return f"Ops(backend={self.info.name!r}, native={sorted(self.native)})"


def _new_plugin_manager() -> pluggy.PluginManager:
    pm = pluggy.PluginManager("chitu")
    pm.add_hookspecs(hookspecs)
    return pm


def _register(plugin: object, name: str) -> pluggy.PluginManager:
    """Register ``plugin`` in a fresh manager, turning pluggy's errors into named ones."""
    pm = _new_plugin_manager()
    try:
        pm.register(plugin, name=name)
        pm.check_pending()
    except pluggy.PluginValidationError as exc:
        raise PluginSignatureError(
            f"backend {name!r}: {exc} (compare with chitu_core/hookspecs.py)"
        ) from exc
    missing = [hook for hook in REQUIRED_HOOKS if not getattr(pm.hook, hook).get_hookimpls()]
    if missing:
        raise PluginLoadError(f"backend {name!r} does not implement required hook(s) {missing}")
    return pm


def native_op_names(pm: pluggy.PluginManager) -> tuple[str, ...]:
    """Op names for which the registered backend has an implementation."""
    return tuple(op for op in OP_NAMES if getattr(pm.hook, HOOK_PREFIX + op).get_hookimpls())


def _check_declared_contract(plugin: object, name: str) -> None:
    """``ContractVersionError`` if the plugin's own ``BackendInfo.contract`` excludes this
    contract. Read before registering: an outdated plugin's signature errors would
    otherwise hide which hooks changed."""
    describe = getattr(plugin, "chitu_backend_info", None)
    if not callable(describe):
        return  # registration reports the missing required hook
    try:
        info = describe()
    except Exception:  # registration calls it again and reports the failure
        return
    if isinstance(info, BackendInfo):
        check_contract(name, info.contract)


def _inspect_entry_point(ep: importlib.metadata.EntryPoint) -> InstalledBackend:
    dist = ep.dist
    backend = InstalledBackend(
        name=ep.name,
        distribution=dist.name if dist else "?",
        version=dist.version if dist else "?",
    )
    try:
        plugin = ep.load()
    except Exception as exc:  # a plugin's import may fail in any way; others must still load
        backend.load_error = f"import of {ep.value!r} failed: {type(exc).__name__}: {exc}"
        return backend
    try:
        _check_declared_contract(plugin, ep.name)
    except ContractVersionError as exc:
        backend.load_error = f"{type(exc).__name__}: {exc}"
        backend.load_error_type = ContractVersionError
        return backend
    try:
        pm = _register(plugin, ep.name)
        backend.info = pm.hook.chitu_backend_info()
        backend.unavailable_reason = pm.hook.chitu_check_available()
    except Exception as exc:
        backend.load_error = f"{type(exc).__name__}: {exc}"
        return backend
    if backend.info.name != ep.name:
        backend.load_error = (
            f"entry point is named {ep.name!r} but chitu_backend_info() says {backend.info.name!r}"
        )
        return backend
    backend.native_ops = native_op_names(pm)
    backend.plugin_manager = pm
    return backend


def discover_backends() -> dict[str, InstalledBackend]:
    """Load every installed backend (by entry point) and probe its availability.

    Never raises for a broken plugin: its ``load_error`` says what went wrong.
    Returns the backends by name, sorted by name.
    """
    found: dict[str, InstalledBackend] = {}
    for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        if ep.name in found:
            logger.warning("backend %r is registered twice; keeping the first", ep.name)
            continue
        found[ep.name] = _inspect_entry_point(ep)
        if found[ep.name].load_error:
            logger.warning("backend %r failed to load: %s", ep.name, found[ep.name].load_error)
    return dict(sorted(found.items()))


def select_backend(name: str, backends: dict[str, InstalledBackend]) -> InstalledBackend:
    """Pick the backend called ``name``, or with ``"auto"`` the available one of highest priority.

    Raises ``UnknownBackendError``, ``PluginLoadError`` or ``BackendUnavailableError``
    with a message that lists what is installed and why the choice failed.
    """
    installed = ", ".join(backends) or "none"
    if name == "auto":
        candidates = [b for b in backends.values() if b.is_available]
        for b in backends.values():
            if not b.is_available:
                logger.info(
                    "auto: skipping backend %r: %s", b.name, b.load_error or b.unavailable_reason
                )
        if not candidates:
            raise BackendUnavailableError(
                f"no installed backend is available (installed: {installed})"
            )
        chosen = max(candidates, key=lambda b: (b.info.priority, b.name))
        logger.info("auto: selected backend %r (priority %d)", chosen.name, chosen.info.priority)
        return chosen
    if name not in backends:
        raise UnknownBackendError(
            f"unknown backend {name!r}; installed backends: {installed} "
            "(a vendor backend is installed with pip, e.g. 'pip install -e plugins/nvidia')"
        )
    backend = backends[name]
    if backend.load_error:
        raise backend.load_error_type(
            f"backend {name!r} ({backend.distribution}) failed to load: {backend.load_error}"
        )
    if backend.unavailable_reason:
        available = ", ".join(b.name for b in backends.values() if b.is_available) or "none"
        raise BackendUnavailableError(
            f"backend {name!r} is not available: {backend.unavailable_reason}; "
            f"available backends: {available}"
        )
    return backend


def _plain_function(hook: pluggy.HookCaller, spec_args: list[str]) -> Callable[..., Any]:
    """The implementation as a plain callable taking the spec's arguments positionally."""
    impl = hook.get_hookimpls()[-1]
    if len(hook.get_hookimpls()) > 1:
        logger.warning(
            "hook %s has %d implementations; using the last registered",
            hook.name,
            len(hook.get_hookimpls()),
        )
    if impl.argnames == tuple(spec_args):
        return impl.function
    # pluggy lets an implementation take a subset of the spec's arguments.
    function, wanted = impl.function, impl.argnames
    positions = [spec_args.index(arg) for arg in wanted]

    def call_subset(*args: Any, **kwargs: Any) -> Any:
        bound = dict(zip(spec_args, args, strict=False)) | kwargs
        return function(*(bound[spec_args[i]] for i in positions))

    call_subset.__name__ = impl.function.__name__
    call_subset.__wrapped__ = impl.function  # type: ignore[attr-defined]
    return call_subset


def configure(backend: InstalledBackend, options: BackendOptions) -> dict[str, OpPath]:
    """Hand ``options`` to the backend's ``chitu_configure`` (if it has one); its answer.

    Raises ``ValueError`` (the backend's) for a choice this device cannot honour.
    """
    if backend.plugin_manager is None:
        raise PluginLoadError(f"backend {backend.name!r} is not loaded: {backend.load_error}")
    hook = backend.plugin_manager.hook.chitu_configure
    if not hook.get_hookimpls():
        return {}
    paths = hook(options=options) or {}
    unknown = set(paths) - set(OP_NAMES)
    if unknown or not all(isinstance(p, OpPath) for p in paths.values()):
        raise PluginLoadError(
            f"backend {backend.name!r}: chitu_configure must map op names to OpPath, got {paths!r}"
        )
    return paths


def bind_ops(
    backend: InstalledBackend,
    demote: Iterable[str] = (),
    options: BackendOptions | None = None,
) -> Ops:
    """Resolve every op of ``backend`` once into an ``Ops`` table, configured with ``options``.

    Ops in ``demote`` (and ops the backend lacks) get the generic implementation.
    Demoting ``prepare_weight`` (or ``new_group``) or one of its consumers demotes the
    whole group, because they share the backend's opaque weight (or group) handle.
    ``options`` (default ``BackendOptions()``) go to ``chitu_configure`` first; the paths
    it reports are kept for the ops that stay native.
    """
    if backend.plugin_manager is None or backend.info is None:
        raise PluginLoadError(f"backend {backend.name!r} is not loaded: {backend.load_error}")
    demoted = set(demote)
    unknown = demoted - set(OP_NAMES)
    if unknown:
        raise ValueError(
            f"cannot demote unknown op(s) {sorted(unknown)}; ops are {', '.join(OP_NAMES)}"
        )
    native = set(backend.native_ops)
    for producer, consumers in HANDLE_GROUPS.items():
        group = {producer, *consumers}
        if producer in native and demoted & group:
            demoted |= group & native
    native -= demoted
    for producer, consumers in HANDLE_GROUPS.items():
        missing = [op for op in consumers if op not in native and op not in COMPOSED_OPS]
        if producer in native and missing:
            raise PluginLoadError(
                f"backend {backend.name!r} implements {producer} but not {missing}: "
                f"the generic ops cannot read the handles {producer} returns"
            )
    functions: dict[str, Callable[..., Any]] = {}
    for op in OP_NAMES:
        if op in native:
            hook = getattr(backend.plugin_manager.hook, HOOK_PREFIX + op)
            spec_args = list(inspect.signature(getattr(hookspecs, HOOK_PREFIX + op)).parameters)
            functions[op] = _plain_function(hook, spec_args)
        else:
            functions[op] = GENERIC_OPS[op]
    for op, parts in COMPOSED_OPS.items():
        # The generic composition, over this backend's own ops where it has any.
        if op not in native and any(functions[part] is not GENERIC_OPS[part] for part in parts):
            functions[op] = functools.partial(
                GENERIC_OPS[op], **{part: functions[part] for part in parts}
            )
    if "device" not in native:
        # The generic hook cannot know which device type the backend computes on.
        functions["device"] = functools.partial(device_of_type, backend.info.device_type)
    options = options or BackendOptions()
    # A binding with every op generic (conformance's baseline) leaves the backend's
    # configuration alone: one configuration per process, that of the served ops.
    paths = configure(backend, options) if native else {}
    paths = {op: p for op, p in paths.items() if op in native}
    return Ops(backend.info, functions, native, demoted & set(backend.native_ops), options, paths)


def describe_paths(ops: Ops) -> str:
    """One line per op whose path depends on the options (the start-up log, ``chitu plugins``)."""
    head = f"fp8 compute {ops.options.fp8_compute!r} on backend {ops.info.name!r}"
    if not ops.paths:
        return f"{head}: no op depends on it"
    return head + ": " + "; ".join(f"{op}: {p.description}" for op, p in ops.paths.items())


def compute_paths(fp8_compute: str = "auto") -> list[str]:
    """``chitu plugins``: per available backend, the path of each op that depends on
    ``--fp8-compute fp8_compute`` (or why the backend cannot take that mode here)."""
    lines = []
    options = BackendOptions(fp8_compute=fp8_compute)
    for backend in discover_backends().values():
        if not backend.is_available:
            continue
        try:
            lines.append(describe_paths(bind_ops(backend, (), options)))
        except ValueError as exc:
            lines.append(f"fp8 compute {fp8_compute!r} on backend {backend.name!r}: {exc}")
    return lines


def load_backend(
    name: str = "auto", demote: Iterable[str] = (), options: BackendOptions | None = None
) -> Ops:
    """Discover, select and bind a backend in one call (what the engine does at start-up)."""
    backend = select_backend(name, discover_backends())
    ops = bind_ops(backend, demote, options)
    logger.info(
        "backend %r: native ops: %s; generic: %s",
        backend.name,
        ", ".join(sorted(ops.native)) or "none",
        ", ".join(sorted(ops.fallback)) or "none",
    )
    logger.info("%s", describe_paths(ops))
    return ops
