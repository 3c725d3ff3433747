"""Tree transformations (Orbax's ``ocp.transform_utils``).

``PyTreeRestore(transforms=...)`` reshapes a checkpoint as it is read, with the same
:class:`Transform` rules; these functions reshape trees in memory: :func:`apply_transformations`
renames, recomputes or carries over keys, :func:`intersect_trees` and :func:`merge_trees`
combine trees by their key paths.
Keys are paths of the tree's keys joined by ``/``; a transformation's key is a regular
expression over them.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import re
from collections.abc import Callable
from typing import Any

from .errors import InvalidArgumentError, StructureMismatchError
from .tree import from_flat_dict, to_flat_dict
from .type_handlers import RestoreArgs

log = logging.getLogger(__name__)

#: A ``Transform``'s ``value_fn`` (the original value -> the new one) and ``multi_value_fn``
#: (the new key and the whole original tree -> the new value), as Orbax types them.
ValueFn = Callable[[Any], Any]
MultiValueFn = Callable[[str, Any], Any]


@dataclasses.dataclass
class Transform:
    """How one key of the new tree gets its value (``apply_transformations``): from
    ``original_key`` of the original tree (a key, or with a regular expression as the
    transformation's key, a template with backreferences such as ``\\1``), through
    ``value_fn``, or computed from the whole original tree by
    ``multi_value_fn(key, original_tree)``; ``use_fallback``: from the fallback tree. At
    most one of ``original_key``, ``use_fallback`` and ``multi_value_fn`` is given, and
    ``value_fn`` not with the last two."""

    original_key: str | tuple[str, ...] | None = None
    use_fallback: bool = False
    value_fn: Callable[..., Any] | None = None
    multi_value_fn: Callable[..., Any] | None = None

    def __post_init__(self) -> None:
        given = [self.original_key is not None, self.use_fallback,
                 self.multi_value_fn is not None]
        if sum(given) > 1 or (self.value_fn is not None
                              and (self.use_fallback or self.multi_value_fn is not None)):
            raise InvalidArgumentError(f"{type(self).__name__}: original_key, use_fallback and "
                                       "multi_value_fn exclude each other, and value_fn goes with "
                                       "original_key alone")


@dataclasses.dataclass
class RestoreTransform(Transform):
    """A transformation of ``PyTreeRestore(transforms=...)`` that computes its key from
    several of the checkpoint's: ``multi_value_fn(key, tree, restore_args)``, where ``tree``
    is the checkpoint's tree (dicts and lists, as Orbax gives it) holding the keys
    ``multi_value_fn_input_args`` (regular expressions) names, each read with the
    ``RestoreArgs`` given there (``PLACEHOLDER`` at the keys not read), and ``restore_args``
    are the result key's."""

    value_fn: Callable[[Any, RestoreArgs], Any] | None = None
    multi_value_fn: Callable[[str, Any, RestoreArgs], Any] | None = None
    multi_value_fn_input_args: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.multi_value_fn_input_args is not None and self.multi_value_fn is None:
            raise InvalidArgumentError("RestoreTransform: multi_value_fn_input_args needs "
                                       "multi_value_fn")


def _truthy(tree: Any) -> bool:
    """Whether a tree without leaves is kept by :func:`apply_transformations`, as by Orbax's:
    a non-empty container (``{'a': None}``), or a node that is not empty (a dataclass whose
    fields are None); not ``{}``, ``[]`` or None."""
    try:
        return bool(tree)
    except Exception:  # noqa: BLE001 - (a node whose truth raises: kept)
        return True


def apply_transformations(original_tree: Any, transformations: Any, new_tree: Any,
                          default_to_original: bool = True) -> Any:
    """``new_tree``'s structure with values taken from ``original_tree`` as
    ``transformations`` say (a tree, or flat dict, of :class:`Transform` by key regex).

    A key of ``new_tree`` no transformation matches takes the original tree's value when it
    has one and ``default_to_original`` (else keeps its own); ``use_fallback`` takes the
    other tree's. Raises ``ValueError`` for a transformation naming a key the original tree
    does not have."""
    if not to_flat_dict(new_tree) and not _truthy(new_tree):  # (no leaves: {}, None, [])
        return {}
    original = to_flat_dict(original_tree, sep="/")
    new = to_flat_dict(new_tree, sep="/")
    rules = [(re.compile(k), t) for k, t in to_flat_dict(
        transformations, sep="/", is_leaf=lambda x: isinstance(x, Transform)).items()]
    unmatched = []
    for key in new:
        matched = False
        for pattern, rule in rules:  # (each that matches, in order: the last one wins)
            match = pattern.fullmatch(key)
            if match is None:
                continue
            matched = True
            if rule.use_fallback:
                if not default_to_original:
                    if key not in original:
                        raise StructureMismatchError(f"{key} is not in the original tree "
                                                     "(use_fallback)")
                    new[key] = original[key]
            elif rule.multi_value_fn is not None:
                new[key] = rule.multi_value_fn(key, original_tree)
            else:
                source = key if rule.original_key is None else match.expand(
                    str(rule.original_key))
                if source not in original:
                    raise StructureMismatchError(f"transformation key {source!r} is not in the "
                                                 "original tree")
                value = original[source]
                new[key] = value if rule.value_fn is None else rule.value_fn(value)
        if not matched:
            if key in original:
                if default_to_original:
                    new[key] = original[key]
            else:
                unmatched.append(key)
    if unmatched:
        log.info("keys not taken from the original tree: %s", ", ".join(unmatched))
    return from_flat_dict(new, target=new_tree, sep="/")


def merge_trees(*trees: Any, target: Any = None) -> Any:
    """The trees' leaves by key path in one tree (a later tree's leaf wins); nested dicts,
    or ``target``'s structure."""
    return from_flat_dict(functools.reduce(lambda a, b: {**a, **b},
                                           (to_flat_dict(t) for t in trees), {}), target=target)


def intersect_trees(*trees: Any, target: Any = None) -> Any:
    """The key paths every tree has, with the last tree's leaves; nested dicts, or
    ``target``'s structure."""
    flats = [to_flat_dict(t) for t in trees]
    common = set.intersection(*(set(f) for f in flats)) if flats else set()
    return from_flat_dict({k: v for k, v in flats[-1].items() if k in common}, target=target)


__all__ = ["MultiValueFn", "RestoreTransform", "Transform", "ValueFn", "apply_transformations",
           "intersect_trees", "merge_trees"]
