"""Typed, frozen configs: checked on construction, stored in checkpoints as plain dicts, rebuilt without code.

Every config of the project (models, quantizers, priors, step settings) is a frozen dataclass deriving from
:class:`ConfigBase` (nanoGPT's ``GPTConfig`` saved with the weights; diffusers' ``register_to_config``):

* **Types come from the annotations.** ``int`` (never ``bool``), ``float`` (an int is accepted and stored as a float),
  ``bool``, ``str``, ``X | None``, ``tuple[int, ...]`` / ``tuple[int, int]`` (lists accepted), ``list[int]`` and nested
  configs (a dict is accepted) are checked before the class's own :meth:`ConfigBase.validate`, which only has to check
  ranges and relations between fields.
* **A bad value raises** :class:`FieldError` naming the class and the field. Whoever knows the user's name for the
  config (``pipeline/config.py``: ``model``, ``data``) re-labels it from ``field`` and ``problem``; no message is
  ever rewritten as text.
* **Polymorphic fields.** A field annotated with a *role base* (a config class with a ``role`` such as
  ``"quantizer"``; see :mod:`steps.nn.registry`) holds any registered config of that role; in dicts it carries its
  ``kind`` (``{"kind": "ema", ...}``), so checkpoints and Hydra both say which one.
* **Facts about a field sit on the field** (``dataclasses.field(metadata=...)``), not in name lists elsewhere:
  :func:`no_effect` marks a setting that cannot change results (a retry budget, the size of a worker pool), which
  the run cache leaves out of fingerprints (:meth:`ConfigBase.result_dict`); :func:`later` marks a setting added
  after outputs were cached, left out of fingerprints while at its default (outputs made before it existed keep
  their cache entries); :func:`derived` marks a field the pipeline fills from upstream artifacts (a prior's code-map
  shape), which users do not set.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar, TypeVar

T = TypeVar("T", bound="ConfigBase")
EFFECT = "effect"  # field metadata: False = the value cannot change what a step produces
DERIVED = "derived"  # field metadata: where the pipeline takes the value from (users do not set it)
LATER = "later"  # field metadata: True = at its default, the value stays out of fingerprints (a setting added later)
_HINTS: dict[type, dict[str, Any]] = {}


class FieldError(ValueError):
    """A config value that cannot work: ``owner.field problem``."""

    def __init__(self, owner: str, field: str, problem: str) -> None:
        self.owner, self.field, self.problem = owner, field, problem
        super().__init__(f"{owner}.{field} {problem}")


def no_effect(default: Any = dataclasses.MISSING, **kw: Any) -> Any:
    """A dataclass field whose value cannot change results (placement, retries): kept out of fingerprints."""
    return dataclasses.field(default=default, metadata={EFFECT: False}, **kw)


def _marked(default: Any, metadata: dict[str, Any]) -> Any:
    """A dataclass field with ``metadata``; a list or dict default is copied for each instance."""
    factory = isinstance(default, (list, dict))
    kw = {"default_factory": lambda: type(default)(default)} if factory else {"default": default}
    return dataclasses.field(metadata=metadata, **kw)


def later(default: Any) -> Any:
    """A dataclass field added after outputs were cached: at ``default`` it is left out of fingerprints, so the
    outputs made before the setting existed (which behave as its default) keep their cache entries."""
    return _marked(default, {LATER: True})


def derived(default: Any, source: str) -> Any:
    """A dataclass field the pipeline fills from ``source`` (an upstream artifact); users do not set it."""
    return _marked(default, {DERIVED: source})


def affects_results(f: dataclasses.Field) -> bool:
    return f.metadata.get(EFFECT, True)


def is_derived(f: dataclasses.Field) -> bool:
    return DERIVED in f.metadata


def is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def hints(cls: type) -> dict[str, Any]:
    """Resolved annotations of a dataclass (cached)."""
    if cls not in _HINTS:
        _HINTS[cls] = typing.get_type_hints(cls)
    return _HINTS[cls]


def is_config_type(tp: Any) -> bool:
    return isinstance(tp, type) and issubclass(tp, ConfigBase)


def is_role_base(tp: Any) -> bool:
    """A config base class whose registered subclasses a field of this type may hold (polymorphic by ``kind``)."""
    return is_config_type(tp) and "role" in tp.__dict__


def optional_inner(tp: Any) -> tuple[Any, bool]:
    """(the type inside ``X | None``, whether None is allowed)."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], len(args) < len(typing.get_args(tp))
    return tp, False


@dataclasses.dataclass(frozen=True)
class ConfigBase:
    """Base of every config: type checks on construction, strict dict round trip, results-only view."""

    role: ClassVar[str]  # set on the few role bases only (see is_role_base)

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = _checked(type(self).__name__, f.name, getattr(self, f.name), hints(type(self))[f.name])
            object.__setattr__(self, f.name, value)
        self.validate()

    def validate(self) -> None:
        """Check ranges and relations between fields; raise :meth:`error` naming the field. Types are checked."""

    def error(self, field: str, problem: str) -> FieldError:
        return FieldError(type(self).__name__, field, problem)

    def require(self, field: str, ok: bool, want: str) -> None:
        """Raise ``<Class>.<field> must be <want>, got <value>`` unless ``ok``."""
        if not ok:
            raise self.error(field, f"must be {want}, got {getattr(self, field)!r}")

    def require_min(self, minimum: float, *fields: str) -> None:
        """Each of ``fields`` must be >= ``minimum``."""
        for field in fields:
            self.require(field, getattr(self, field) >= minimum, f">= {minimum}")

    # ------------------------------------------------------------------------------------------- dicts
    def to_dict(self, derived: bool = True) -> dict[str, Any]:
        """Plain values (tuples become lists); nested polymorphic configs carry their ``kind``. ``derived=False``
        leaves out the fields the pipeline fills from upstream artifacts (what a user sets)."""
        fields = [f for f in dataclasses.fields(self) if derived or not is_derived(f)]
        return {f.name: _plain(getattr(self, f.name), derived) for f in fields}

    @classmethod
    def from_dict(cls: type[T], data: Mapping[str, Any]) -> T:
        """The config of ``data`` (as :meth:`to_dict` writes it). Unknown keys raise :class:`FieldError`."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise FieldError(cls.__name__, unknown[0], f"is not a setting of {cls.__name__} (known: {sorted(known)})")
        return cls(**data)

    def result_dict(self) -> dict[str, Any]:
        """What results depend on: :meth:`to_dict` without the :func:`no_effect` fields, with each config's type."""
        out: dict[str, Any] = {"__type__": type(self).__name__}
        for f in dataclasses.fields(self):
            if affects_results(f):
                value = getattr(self, f.name)
                if f.metadata.get(LATER) and value == _default_of(f):
                    continue
                out[f.name] = value.result_dict() if isinstance(value, ConfigBase) else _plain(value)
        return out


def _default_of(f: dataclasses.Field) -> Any:
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default


def _plain(value: Any, derived: bool = True) -> Any:
    if isinstance(value, ConfigBase):
        from steps.nn.registry import kind_of  # deferred: the registry imports model modules lazily

        data = value.to_dict(derived)
        return {"kind": kind_of(value), **data} if _is_polymorphic(value) else data
    if isinstance(value, (list, tuple)):
        return [_plain(v, derived) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v, derived) for k, v in value.items()}
    return value


def _is_polymorphic(value: ConfigBase) -> bool:
    return any(is_role_base(base) for base in type(value).__mro__[1:])


def _checked(owner: str, name: str, value: Any, tp: Any) -> Any:
    """``value`` normalised to ``tp`` (lists to tuples, ints to floats, dicts to configs), or a FieldError."""
    inner, optional = optional_inner(tp)
    if value is None:
        if optional:
            return None
        raise FieldError(owner, name, f"must be set ({_type_name(inner)}), got None")

    def bad() -> FieldError:
        return FieldError(owner, name, f"must be {_type_name(tp)}, got {value!r}")

    if inner is Any:
        return value
    if is_config_type(inner):
        if isinstance(value, inner):
            return value
        if isinstance(value, Mapping):
            if is_role_base(inner):
                from steps.nn.registry import UnknownKindError, config_from_dict

                try:
                    return config_from_dict(inner.role, value)
                except UnknownKindError as exc:
                    raise FieldError(owner, name, str(exc)) from None
            return inner.from_dict(value)
        raise bad()
    origin = typing.get_origin(inner)
    if inner is bool:
        if not isinstance(value, bool):
            raise bad()
        return value
    if inner is int:
        if not is_int(value):
            raise bad()
        return value
    if inner is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
            raise bad()
        return float(value)
    if inner is str:
        if not isinstance(value, str):
            raise bad()
        return value
    if origin in (tuple, list):
        if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
            raise bad()
        items = list(value)
        args = typing.get_args(inner)
        if origin is tuple and len(args) == 2 and args[1] is Ellipsis:
            item_types = [args[0]] * len(items)
        elif origin is tuple and args:
            if len(items) != len(args):
                raise bad()
            item_types = list(args)
        else:
            item_types = [args[0] if args else Any] * len(items)
        checked = [_checked(owner, name, v, t) for v, t in zip(items, item_types, strict=True)]
        return tuple(checked) if origin is tuple else checked
    if origin is dict or inner is dict:
        if not isinstance(value, Mapping):
            raise bad()
        return dict(value)
    return value


def _type_name(tp: Any) -> str:
    inner, optional = optional_inner(tp)
    names = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}
    if inner in names:
        name = names[inner]
    elif typing.get_origin(inner) is tuple:
        args = typing.get_args(inner)
        name = "a list of integers" if args and args[-1] is Ellipsis else f"a list of {len(args)} integers"
    elif typing.get_origin(inner) is list:
        name = "a list"
    elif is_config_type(inner):
        name = f"a {inner.__name__} (a mapping of its settings)"
    else:
        name = getattr(inner, "__name__", str(inner))
    return f"{name} or null" if optional else name
