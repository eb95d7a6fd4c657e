"""Curves over steps across seeds and the compute ratio, against hand-worked examples."""

from __future__ import annotations

import math

import pytest

from kava.analysis.convergence import band_plot, compute_ratio, mean_curve, steps_to_reach


def test_mean_curve_averages_the_seeds_that_have_each_step():
    curve = mean_curve({1: [(150, 0.2), (600, 0.4)], 2: [(600, 0.6), (150, 0.4), (2400, math.nan)]})
    assert curve == [(150.0, pytest.approx(0.3), 0.2, 0.4), (600.0, pytest.approx(0.5), 0.4, 0.6)]


def test_steps_to_reach_is_the_first_checkpoint_at_the_level():
    curve = [(600, 0.5), (150, 0.2), (2400, 0.7)]
    assert steps_to_reach(curve, 0.5) == 600
    assert steps_to_reach(curve, 0.71) is None
    assert steps_to_reach([(150, 2.0), (600, 1.0)], 1.5, higher=False) == 600


def test_compute_ratio_against_the_baselines_best():
    ce = {1: [(150, 0.10), (600, 0.30), (2400, 0.40)], 2: [(150, 0.12), (600, 0.34), (2400, 0.44)]}
    kv = {1: [(150, 0.38), (600, 0.45), (2400, 0.5)], 2: [(150, 0.40), (600, 0.47), (2400, 0.52)]}
    r = compute_ratio(kv, ce, names=("kv", "ce"))
    assert r.level == pytest.approx(0.42) and r.baseline_steps == 2400
    assert r.variant_steps == 600 and r.ratio == 4.0  # kv passes 0.42 at 600 (0.46), not at 150 (0.39)
    never = compute_ratio(ce, kv, names=("ce", "kv"))
    assert never.variant_steps is None and never.ratio is None
    loss = compute_ratio({1: [(150, 1.0), (600, 0.8)]}, {1: [(150, 1.2), (600, 0.9), (2400, 0.85)]},
                         higher=False)
    assert loss.level == 0.85 and loss.baseline_steps == 2400 and loss.variant_steps == 600
    with pytest.raises(ValueError, match="Expected checkpoints of 'ce'"):
        compute_ratio(kv, {}, names=("kv", "ce"))


def test_band_plot_writes_a_png(tmp_path):
    path = band_plot({"ce": {1: [(150, 10.0), (600, 20.0)], 2: [(150, 12.0), (600, 26.0)]},
                      "kv": {1: [(150, 30.0), (600, 35.0)]}}, tmp_path / "acc.png",
                     xlabel="step", ylabel="accuracy %", title="accuracy", logx=True)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 5000
    empty = band_plot({}, tmp_path / "none.png", xlabel="x", ylabel="y", title="t")
    assert empty.is_file()
