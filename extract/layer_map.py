"""Which teacher layers feed which student layer: proportional, explicit, or chosen by CKA.

Every function returns a :class:`kava.kvstore.manifest.LayerMap`: ``sources[s]`` is a tuple of
``(teacher_layer, weight)`` pairs for student layer ``s``, weights summing to 1. Layers count from 0.

The ``--layer-map`` flag (and the ``layer_map`` config field) takes one of:

- ``proportional`` — student layer ``s`` takes teacher layer ``round(s (L_t - 1) / (L_s - 1))``: ends map to ends.
- ``cka`` — each student layer takes its ``k`` most similar teacher layers by CKA, weights ∝ CKA
  (:func:`cka_top_k`; needs a calibration CKA matrix).
- an explicit list, one entry per student layer, comma-separated: ``"0,4,8,12"``; an entry may mix teacher layers
  joined by ``+`` with optional ``:weight`` (``"0:0.5+1:0.5,3,5+6"``; weights are normalised, and an entry
  without weights weighs its layers equally). See :func:`explicit`, and :func:`format_layer_map` for the inverse.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from kava.core.errors import ConfigError, ShapeError
from kava.kvstore.manifest import LayerMap, proportional_layer_map

from .cka import ESTIMATORS

__all__ = ["cka_top_k", "explicit", "format_layer_map", "parse_layer_map", "proportional"]

_FLAG = "--layer-map"
Source = tuple[tuple[int, float], ...]


def proportional(teacher_layers: int, student_layers: int) -> LayerMap:
    """Student layer ``s`` of ``L_s`` takes teacher layer ``round(s (L_t - 1) / (L_s - 1))``, weight 1.

    The first student layer takes teacher layer 0 and the last takes ``L_t - 1``; a one-layer student takes the
    teacher's last layer.

    Raises:
        ConfigError: a layer count is below 1.
    """
    return proportional_layer_map(teacher_layers, student_layers)


def format_layer_map(layer_map: LayerMap) -> str:
    """The ``--layer-map`` string of a map: ``"0,4,8"``, or ``"0:0.5+1:0.5,..."`` where an entry mixes layers.

    ``explicit(format_layer_map(m), ...)`` gives back ``m``'s sources (weights to ``repr`` precision).
    """
    entries = []
    for src in layer_map.sources:
        if len(src) == 1:
            entries.append(str(src[0][0]))
        else:
            entries.append("+".join(f"{t}:{w!r}" for t, w in src))
    return ",".join(entries)


def explicit(spec: str | Sequence[Any], teacher_layers: int, student_layers: int) -> LayerMap:
    """A layer map given by hand, one entry per student layer.

    Args:
        spec: a ``--layer-map`` string (``"0,4,8,12"`` or ``"0:0.5+1:0.5,3,..."``, see the module docstring), or a
            sequence with one entry per student layer, each an ``int`` teacher layer, an entry string such as
            ``"0:0.5+1:0.5"``, a mapping ``{teacher_layer: weight}``, or a list of ``(teacher_layer, weight)``
            pairs (the form ``LayerMap.to_dict()`` writes).
        teacher_layers: ``L_t``, the teacher's layer count.
        student_layers: ``L_s``, the student's layer count.

    Returns:
        A ``LayerMap`` with method ``explicit``; each entry's weights normalised to sum to 1, its teacher layers in
        the order given.

    Raises:
        ConfigError: the wrong number of entries, a layer outside ``[0, L_t)``, a layer twice in one entry, a
            weight that is not a positive finite number, or text that does not parse. The message names
            ``--layer-map`` and shows a valid example.
    """
    _check_counts(teacher_layers, student_layers)
    if isinstance(spec, np.ndarray):
        spec = spec.tolist()
    if isinstance(spec, str):
        text = spec.strip()
        raw = [] if not text else [_parse_entry(e, s) for s, e in enumerate(text.split(","))]
    elif isinstance(spec, Sequence):
        raw = [_entry_from_value(v, s) for s, v in enumerate(spec)]
    else:
        raise ConfigError(
            f"{_FLAG}: expected a string such as '0,4,8' or a list with one entry per student layer. Got "
            f"{type(spec).__name__} instead."
        )
    if len(raw) != student_layers:
        raise ConfigError(
            f"{_FLAG}: expected {student_layers} entries, one per student layer. Got {len(raw)} instead "
            f"({_show(spec)}). Give one teacher layer (or '+'-joined weighted layers) per student layer, e.g. "
            f"'{format_layer_map(proportional(teacher_layers, student_layers))}', or use 'proportional'."
        )
    sources = tuple(_normalise(terms, s, teacher_layers) for s, terms in enumerate(raw))
    return LayerMap("explicit", sources)


def cka_top_k(cka: Any, k: int = 2, *, estimator: str) -> LayerMap:
    """Each student layer takes its ``k`` most similar teacher layers, weighted in proportion to CKA.

    Args:
        cka: ``[L_s, L_t]`` CKA matrix, rows student layers, columns teacher layers (e.g.
            ``CKAAccumulator.matrix(...)`` with the student as ``a``; transpose one made the other way round).
        k: how many teacher layers per student layer, ``1 <= k <= L_t``.
        estimator: ``"biased"`` or ``"unbiased"``, the estimator that made ``cka``; recorded in the map.

    Returns:
        A ``LayerMap`` with method ``cka``. Negative CKA (possible with the unbiased estimator) is clipped to 0
        and NaN (undefined: a constant layer) counts as 0; teacher layers whose clipped CKA is 0 are dropped, so
        an entry may have fewer than ``k`` layers. Equal CKA values go to the lower teacher layer. Within an
        entry, layers are ordered from most to least similar. A student layer whose ``k`` best values are all
        ``<= 0`` falls back to its proportional teacher layer. ``details`` records ``k``, ``estimator`` and
        ``proportional_fallback`` (the student layers that fell back).

    Raises:
        ShapeError: ``cka`` is not a non-empty 2-D matrix.
        ConfigError: ``k`` is out of range, or the estimator is unknown.
    """
    c = np.asarray(cka, dtype=np.float64)
    if c.ndim != 2 or 0 in c.shape:
        raise ShapeError(
            f"Expected a CKA matrix [student_layers, teacher_layers]. Got shape {c.shape} instead. "
            "Run the CKA calibration first."
        )
    n_s, n_t = c.shape
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 1 <= k <= n_t:
        raise ConfigError(
            f"Expected k as an integer in [1, {n_t}] (the teacher's layer count). Got {k!r} instead."
        )
    if estimator not in ESTIMATORS:
        raise ConfigError(
            f"Expected estimator as one of {', '.join(ESTIMATORS)} (the one that made the CKA matrix). "
            f"Got {estimator!r} instead."
        )
    score = np.clip(np.nan_to_num(c, nan=0.0, posinf=0.0, neginf=0.0), 0.0, None)
    # A stable sort of -score keeps equal scores in teacher-layer order, so ties go to the lower layer.
    top = np.argsort(-score, axis=1, kind="stable")[:, :k]  # [L_s, k]
    fallback_map = proportional(n_t, n_s)
    sources: list[Source] = []
    fell_back: list[int] = []
    for s in range(n_s):
        layers = top[s]
        w = score[s, layers]
        layers, w = layers[w > 0], w[w > 0]
        if not len(layers):
            sources.append(fallback_map.sources[s])
            fell_back.append(s)
            continue
        total = float(w.sum())
        sources.append(tuple((int(t), float(x) / total) for t, x in zip(layers, w)))
    return LayerMap(
        "cka", tuple(sources), {"k": int(k), "estimator": estimator, "proportional_fallback": fell_back}
    )


def parse_layer_map(
    value: str | Sequence[Any],
    teacher_layers: int,
    student_layers: int,
    *,
    cka: Any = None,
    k: int = 2,
    estimator: str | None = None,
) -> LayerMap:
    """Build the layer map a ``--layer-map`` value asks for.

    Args:
        value: ``"proportional"``, ``"cka"`` or an explicit list (string or sequence, see :func:`explicit`).
        teacher_layers: ``L_t``.
        student_layers: ``L_s``.
        cka: for ``"cka"``: the ``[L_s, L_t]`` calibration CKA matrix; ignored otherwise.
        k: for ``"cka"``: teacher layers per student layer.
        estimator: for ``"cka"``: the estimator that made ``cka`` (``"biased"`` or ``"unbiased"``).

    Raises:
        ConfigError: as :func:`explicit` and :func:`cka_top_k`; ``"cka"`` without a matrix or estimator, or a
            matrix of the wrong shape.
    """
    _check_counts(teacher_layers, student_layers)
    method = value.strip().lower() if isinstance(value, str) else None
    if method == "proportional":
        return proportional(teacher_layers, student_layers)
    if method == "cka":
        if cka is None or estimator is None:
            raise ConfigError(
                f"{_FLAG} cka: expected a CKA matrix and the estimator that made it. Got "
                f"{'no matrix' if cka is None else 'no estimator'} instead. Run the CKA calibration first, or "
                f"choose '{_FLAG} proportional'."
            )
        shape = np.shape(cka)
        if shape != (student_layers, teacher_layers):
            raise ConfigError(
                f"{_FLAG} cka: expected a CKA matrix [student_layers, teacher_layers] = "
                f"[{student_layers}, {teacher_layers}]. Got shape {tuple(shape)} instead. Put student layers on "
                "the rows (transpose a teacher-by-student matrix)."
            )
        return cka_top_k(cka, k, estimator=estimator)
    return explicit(value, teacher_layers, student_layers)


# --------------------------------------------------------------------------------------------------------------
# Parsing helpers: each entry becomes a list of (teacher_layer, weight or None) terms, then is checked.


def _check_counts(teacher_layers: int, student_layers: int) -> None:
    if teacher_layers < 1 or student_layers < 1:
        raise ConfigError(
            f"Expected positive layer counts. Got teacher={teacher_layers}, student={student_layers} instead."
        )


def _show(spec: Any) -> str:
    text = repr(spec)
    return text if len(text) <= 80 else text[:77] + "..."


def _bad_entry(s: int, entry: Any, why: str) -> ConfigError:
    return ConfigError(
        f"{_FLAG}: entry {s} (student layer {s}) {why}. Got {_show(entry)} instead. Write a teacher layer such as "
        "'3', or weighted layers such as '3:0.7+4:0.3'."
    )


def _parse_entry(entry: str, s: int) -> list[tuple[int, float | None]]:
    """``"3"``, ``"3+4"`` or ``"3:0.7+4:0.3"`` → ``[(3, 0.7), (4, 0.3)]`` (weight ``None`` where not given)."""
    terms: list[tuple[int, float | None]] = []
    for term in entry.split("+"):
        layer, sep, weight = term.partition(":")
        try:
            t = int(layer.strip())
            w = float(weight.strip()) if sep else None
        except ValueError as e:
            raise _bad_entry(s, entry, "should be teacher layers with optional ':weight', joined by '+'") from e
        terms.append((t, w))
    return terms


def _entry_from_value(value: Any, s: int) -> list[tuple[int, float | None]]:
    """One entry of a sequence spec → terms (see :func:`explicit` for the accepted forms)."""
    if isinstance(value, str):
        return _parse_entry(value, s)
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        return [(int(value), None)]
    if isinstance(value, Mapping):
        items = list(value.items())
    elif isinstance(value, Sequence) and all(isinstance(p, Sequence) and len(p) == 2 for p in value):
        items = [tuple(p) for p in value]
    else:
        raise _bad_entry(s, value, "should be a teacher layer, a {layer: weight} mapping or [layer, weight] pairs")
    terms: list[tuple[int, float | None]] = []
    for t, w in items:
        if isinstance(t, bool) or not isinstance(t, (int, np.integer)) or isinstance(w, bool):
            raise _bad_entry(s, value, "should pair integer teacher layers with numeric weights")
        try:
            terms.append((int(t), float(w)))
        except (TypeError, ValueError) as e:
            raise _bad_entry(s, value, "should pair integer teacher layers with numeric weights") from e
    return terms


def _normalise(terms: list[tuple[int, float | None]], s: int, teacher_layers: int) -> Source:
    """Check one entry's terms and return them with weights summing to 1."""
    if not terms:
        raise _bad_entry(s, terms, "should name at least one teacher layer")
    layers = [t for t, _ in terms]
    for t in layers:
        if not 0 <= t < teacher_layers:
            raise ConfigError(
                f"{_FLAG}: entry {s} names teacher layer {t}; expected a layer in [0, {teacher_layers}) "
                f"(the teacher has {teacher_layers} layers, counted from 0). Use {teacher_layers - 1} for the last."
            )
    if len(set(layers)) != len(layers):
        raise _bad_entry(s, terms, "names a teacher layer twice; give each layer once with its total weight")
    given = [w for _, w in terms if w is not None]
    if given and len(given) != len(terms):
        raise _bad_entry(s, terms, "gives weights for some layers only; give one for every layer or for none")
    weights = [1.0] * len(terms) if not given else given
    if any(not math.isfinite(w) or w <= 0 for w in weights):
        raise _bad_entry(s, terms, "needs positive, finite weights (they are normalised to sum to 1)")
    total = math.fsum(weights)
    return tuple((t, w / total) for t, w in zip(layers, weights))
