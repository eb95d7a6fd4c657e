"""Layer maps: proportional, explicit (the --layer-map string and list forms) and CKA top-k."""

from __future__ import annotations

import numpy as np
import pytest

from kava.core.errors import ConfigError, ShapeError
from kava.extract.layer_map import cka_top_k, explicit, format_layer_map, parse_layer_map, proportional
from kava.kvstore.manifest import LayerMap


def _layers(m: LayerMap) -> list[list[int]]:
    return [[t for t, _ in src] for src in m.sources]


@pytest.mark.parametrize(
    ("teacher", "student", "want"),
    [
        (28, 24, None),
        (5, 2, [[0], [4]]),
        (28, 1, [[27]]),
        (4, 4, [[0], [1], [2], [3]]),
        (2, 5, [[0], [0], [0], [1], [1]]),  # a deeper student repeats teacher layers; round() halves to even
    ],
)
def test_proportional_maps_ends_to_ends(teacher, student, want):
    m = proportional(teacher, student)
    assert m.method == "proportional" and m.student_layers == student
    layers = _layers(m)
    assert layers[-1] == [teacher - 1]
    if student > 1:
        assert layers[0] == [0]
    flat = [src[0] for src in layers]
    assert flat == sorted(flat)  # monotone
    if want is not None:
        assert layers == want
    assert all(src == ((t[0], 1.0),) for src, t in zip(m.sources, layers))


def test_explicit_one_layer_per_student_layer():
    m = explicit("0, 4,8,12 ", teacher_layers=13, student_layers=4)
    assert m.method == "explicit"
    assert m.sources == (((0, 1.0),), ((4, 1.0),), ((8, 1.0),), ((12, 1.0),))


def test_explicit_weighted_entries_are_normalised():
    m = explicit("0:0.5+1:0.5,3,5+6,7:3+2:1", teacher_layers=8, student_layers=4)
    assert m.sources[0] == ((0, 0.5), (1, 0.5))
    assert m.sources[1] == ((3, 1.0),)
    assert m.sources[2] == ((5, 0.5), (6, 0.5))  # no weights: equal
    assert m.sources[3] == ((7, 0.75), (2, 0.25))  # order as given, weights normalised
    for src in m.sources:
        assert sum(w for _, w in src) == pytest.approx(1.0)


def test_explicit_sequence_forms_and_round_trip():
    spec = [0, "1:2+2:2", {3: 1.0, 0: 3.0}, [[2, 0.25], [3, 0.75]]]
    m = explicit(spec, teacher_layers=4, student_layers=4)
    assert m.sources == (((0, 1.0),), ((1, 0.5), (2, 0.5)), ((3, 0.25), (0, 0.75)), ((2, 0.25), (3, 0.75)))
    # The stored form (LayerMap.to_dict) and the CLI string both parse back to the same map.
    assert explicit(m.to_dict()["sources"], 4, 4).sources == m.sources
    assert format_layer_map(m) == "0,1:0.5+2:0.5,3:0.25+0:0.75,2:0.25+3:0.75"
    assert explicit(format_layer_map(m), 4, 4).sources == m.sources


@pytest.mark.parametrize(
    ("spec", "match"),
    [
        ("0,4,8", r"--layer-map: expected 4 entries, one per student layer\. Got 3 instead.*e\.g\. '0,4,8,12'"),
        ("", r"--layer-map: expected 4 entries.*Got 0 instead"),
        ("0,4,8,13", r"--layer-map: entry 3 names teacher layer 13; expected a layer in \[0, 13\).*Use 12"),
        ("0,-1,8,12", r"entry 1 names teacher layer -1"),
        ("0,a,8,12", r"--layer-map: entry 1 \(student layer 1\) should be teacher layers.*'3:0\.7\+4:0\.3'"),
        ("0,4:x,8,12", r"entry 1 .*optional ':weight'"),
        ("0,4+4,8,12", r"entry 1 .*names a teacher layer twice"),
        ("0,4:1+5,8,12", r"entry 1 .*weights for some layers only"),
        ("0,4:0+5:1,8,12", r"entry 1 .*positive, finite weights"),
        ("0,4:-1,8,12", r"entry 1 .*positive, finite weights"),
        ("0,4:nan,8,12", r"entry 1 .*positive, finite weights"),
        ("0,,8,12", r"entry 1 .*should be teacher layers"),
    ],
)
def test_explicit_errors_name_the_flag_and_the_fix(spec, match):
    with pytest.raises(ConfigError, match=match):
        explicit(spec, teacher_layers=13, student_layers=4)


def test_explicit_rejects_ambiguous_values():
    with pytest.raises(ConfigError, match=r"entry 0 .*a teacher layer, a \{layer: weight\} mapping"):
        explicit([(3, 0.5)], teacher_layers=4, student_layers=1)  # a bare pair is not an entry: [[3, 0.5]] is
    with pytest.raises(ConfigError, match="integer teacher layers with numeric weights"):
        explicit([{1.5: 1.0}], teacher_layers=4, student_layers=1)
    with pytest.raises(ConfigError, match="expected a string such as '0,4,8'"):
        explicit(3, teacher_layers=4, student_layers=1)  # type: ignore[arg-type]


def test_cka_top_k_picks_the_most_similar_teacher_layers():
    cka = np.array(
        [
            [0.9, 0.6, 0.1, 0.0],
            [0.2, 0.3, 0.8, 0.4],
            [0.1, 0.2, 0.5, 0.95],
        ]
    )  # [L_s = 3, L_t = 4]
    m = cka_top_k(cka, k=2, estimator="unbiased")
    assert m.method == "cka"
    assert _layers(m) == [[0, 1], [2, 3], [3, 2]]  # most similar first
    assert [w for _, w in m.sources[0]] == pytest.approx([0.9 / 1.5, 0.6 / 1.5])
    assert m.details == {"k": 2, "estimator": "unbiased", "proportional_fallback": []}
    for src in m.sources:
        assert sum(w for _, w in src) == pytest.approx(1.0)
    # k = 1 is the argmax of each row.
    assert _layers(cka_top_k(cka, k=1, estimator="biased")) == [[int(i)] for i in cka.argmax(axis=1)]


def test_cka_top_k_ties_negatives_and_fallback():
    cka = np.array(
        [
            [0.5, 0.5, 0.5, 0.5],  # all tied: the lowest teacher layers win
            [-0.2, 0.3, np.nan, -0.1],  # one positive value: only that layer, weight 1
            [-0.3, -0.1, 0.0, np.nan],  # nothing positive: proportional fallback
        ]
    )
    m = cka_top_k(cka, k=2, estimator="unbiased")
    assert m.sources[0] == ((0, 0.5), (1, 0.5))
    assert m.sources[1] == ((1, 1.0),)
    assert m.sources[2] == proportional(4, 3).sources[2] == ((3, 1.0),)
    assert m.details["proportional_fallback"] == [2]
    # Deterministic: the same matrix always gives the same map.
    assert cka_top_k(cka, k=2, estimator="unbiased") == m


def test_cka_top_k_errors():
    with pytest.raises(ConfigError, match=r"Expected k as an integer in \[1, 4\]"):
        cka_top_k(np.ones((2, 4)), k=5, estimator="biased")
    with pytest.raises(ConfigError, match="Expected estimator as one of biased, unbiased"):
        cka_top_k(np.ones((2, 4)), k=1, estimator="rbf")
    with pytest.raises(ShapeError, match=r"\[student_layers, teacher_layers\]"):
        cka_top_k(np.ones(4), k=1, estimator="biased")


def test_parse_layer_map_dispatch():
    assert parse_layer_map("proportional", 28, 24) == proportional(28, 24)
    assert parse_layer_map(" Proportional ", 5, 2) == proportional(5, 2)
    assert parse_layer_map("0,2,4", 5, 3).sources == explicit("0,2,4", 5, 3).sources
    assert parse_layer_map([4, 0], 5, 2).sources == (((4, 1.0),), ((0, 1.0),))
    cka = np.eye(3, 5)
    m = parse_layer_map("cka", 5, 3, cka=cka, k=1, estimator="biased")
    assert _layers(m) == [[0], [1], [2]] and m.details["estimator"] == "biased"
    with pytest.raises(ConfigError, match="--layer-map cka: expected a CKA matrix and the estimator.*no estimator"):
        parse_layer_map("cka", 5, 3, cka=cka)
    with pytest.raises(ConfigError, match=r"--layer-map cka: .*\[3, 5\]\. Got shape \(5, 3\).*transpose"):
        parse_layer_map("cka", 5, 3, cka=cka.T, estimator="biased")
    with pytest.raises(ConfigError, match="--layer-map: entry 0"):
        parse_layer_map("ckaa", 5, 1)
