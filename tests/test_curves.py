"""Report figures (kava.analysis.curves): every plot written, read back as pixels, and its edge cases.

Records look like ``metrics.jsonl`` lines from three seeds of a CE-only student and a KV-distilled one. Each PNG is
loaded back with ``matplotlib.image.imread`` and checked for its size and for actually holding a drawing. Warnings
are errors in this suite, so a stray "mean of empty slice" or legend warning fails the test that caused it.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from matplotlib.image import imread

from kava.analysis import curves
from kava.analysis.curves import accuracy_bars, eval_curve, layer_cosine, learning_curves
from kava.analysis.stats import compare
from kava.core.errors import ConfigError

DPI = 40  # small images keep the file fast; layout does not depend on dpi
LAYERS = 4


def make_runs(n_seeds: int = 3, steps: int = 50) -> dict[str, list[list[dict[str, float]]]]:
    rng = np.random.default_rng(0)
    runs: dict[str, list[list[dict[str, float]]]] = {"ce-only": [], "kava": []}
    for name, seeds in runs.items():
        for _ in range(n_seeds):
            records = []
            for t in range(steps):
                r = {"step": 10 * t, "loss/ce": 3 * math.exp(-t / 15) + 0.5 + 0.05 * rng.standard_normal()}
                if name == "kava":
                    # loss/k spans more than two decades, so its panel goes logarithmic.
                    r["loss/k"] = 2 * math.exp(-t / 5) + 0.005 * (1 + rng.random())
                    r["loss/v"] = 1.5 * math.exp(-t / 8) + 0.05 * (1 + rng.random())
                    r["loss/kv"] = r["loss/k"] + r["loss/v"]
                    for layer in range(LAYERS):
                        r[f"cos_k/L{layer}"] = 0.9 - 0.05 * layer + 0.01 * rng.standard_normal()
                        r[f"cos_v/L{layer}"] = 0.7 - 0.03 * layer + 0.01 * rng.standard_normal()
                r["loss/total"] = r["loss/ce"] + r.get("loss/kv", 0.0)
                records.append(r)
            seeds.append(records)
    return runs


@pytest.fixture(scope="module")
def runs():
    return make_runs()


def check_png(path, min_size: tuple[int, int] = (100, 80), *, data: bool = True) -> np.ndarray:
    """The file is a PNG of at least ``min_size`` (width, height) pixels that is not one flat colour, and holds
    coloured marks (curves, bars) when ``data``, none when not (text and frames are grey)."""
    assert path.suffix == ".png" and path.is_file()
    img = imread(path)[..., :3]
    h, w = img.shape[:2]
    assert w >= min_size[0] and h >= min_size[1]
    assert img.std() > 0.02, "image is blank"
    coloured = (img.max(axis=-1) - img.min(axis=-1) > 0.25).mean()
    assert coloured > 0.002 if data else coloured == 0
    return img


def no_temp_files(folder) -> None:
    assert not [p.name for p in folder.rglob("*") if ".tmp" in p.name]


def test_loss_key_order(runs):
    assert curves.loss_keys(runs) == ["loss/ce", "loss/k", "loss/v", "loss/kv", "loss/total"]
    odd = {"a": [[{"step": 0, "loss/total": 1.0, "loss/zeta": 1.0, "loss/attn": 1.0, "lr": 1e-4}]]}
    assert curves.loss_keys(odd) == ["loss/attn", "loss/zeta", "loss/total"]


def test_over_seeds_and_smoothing():
    seeds = [
        [{"step": 0, "loss/ce": 1.0}, {"step": 1, "loss/ce": 3.0}],
        [{"step": 0, "loss/ce": 3.0}, {"step": 2, "loss/ce": 5.0}, {"step": 3, "loss/ce": float("nan")}],
    ]
    steps, mean, lo, hi = curves.over_seeds(seeds, "loss/ce", smooth=0)
    np.testing.assert_array_equal(steps, [0, 1, 2])  # union of steps; the NaN step is dropped
    np.testing.assert_array_equal(mean, [2.0, 3.0, 5.0])
    np.testing.assert_array_equal(lo, [1.0, 3.0, 5.0])
    np.testing.assert_array_equal(hi, [3.0, 3.0, 5.0])
    assert curves.over_seeds(seeds, "loss/k", smooth=0) is None

    y = np.arange(10.0) ** 2
    naive = [y[max(0, i - 2):i + 1].mean() for i in range(10)]
    np.testing.assert_allclose(curves.smooth_series(y, 3), naive)
    np.testing.assert_array_equal(curves.smooth_series(y, 0), y)


def test_learning_curves(runs, tmp_path):
    path = learning_curves(runs, tmp_path / "loss.png", smooth=5, dpi=DPI)
    assert path == tmp_path / "loss.png"
    img = check_png(path)
    # 5 keys -> 3 columns x 2 rows at 4.6 x 3.4 inches each (plus 0.5 in for the legend)
    assert img.shape[:2] == (round((3.4 * 2 + 0.5) * DPI), round(4.6 * 3 * DPI))
    no_temp_files(tmp_path)


def test_learning_curves_missing_keys(runs, tmp_path):
    # loss/k exists only for kava; loss/attn for nobody; a single seed has no band.
    one_seed = {"ce-only": runs["ce-only"][:1], "kava": runs["kava"][:1]}
    check_png(learning_curves(one_seed, tmp_path / "k.png", keys=["loss/k", "loss/attn"], dpi=DPI))
    check_png(learning_curves({"ce-only": runs["ce-only"]}, tmp_path / "ce.png", keys=["loss/k"], dpi=DPI), data=False)
    check_png(learning_curves({}, tmp_path / "empty.png", dpi=DPI), data=False)
    check_png(learning_curves(runs, tmp_path / "none.png", keys=["loss/attn"], dpi=DPI), data=False)
    with pytest.raises(ConfigError, match="smooth >= 0"):
        learning_curves(runs, tmp_path / "bad.png", smooth=-1)


def test_layer_cosine(runs, tmp_path):
    img = check_png(layer_cosine(runs, tmp_path / "cos.png", last=10, dpi=DPI))
    assert img.shape[:2] == (4 * DPI, 11 * DPI)
    # One seed (no std), and a variant logging K cosine only.
    k_only = [[{k: v for k, v in r.items() if not k.startswith("cos_v")} for r in seed] for seed in runs["kava"]]
    check_png(layer_cosine({"kava": runs["kava"][:1], "k-only": k_only}, tmp_path / "cos1.png", dpi=DPI))
    check_png(layer_cosine({"k-only": k_only}, tmp_path / "cos2.png", dpi=DPI))  # the V panel says so
    with pytest.raises(ConfigError, match="last >= 1"):
        layer_cosine(runs, tmp_path / "bad.png", last=0)


def test_layer_cosine_means():
    seed = [{"step": i, "cos_k/L0": float(i), "cos_v/L1": 1.0} for i in range(10)]
    means = curves.layer_means([seed, seed], last=4)
    assert means == {"k": {0: [7.5, 7.5]}, "v": {1: [1.0, 1.0]}}  # mean of steps 6..9


def test_layer_cosine_none_logged(runs, tmp_path):
    path = layer_cosine({"ce-only": runs["ce-only"]}, tmp_path / "none.png", dpi=DPI)
    check_png(path, min_size=(200, 100), data=False)  # only the "no K/V cosine logged" message and title


def test_accuracy_bars(tmp_path):
    points = {"ce-only": [0.21, 0.23, 0.22], "kava": [0.31, 0.29, 0.33], "kava-attn": [0.24, 0.22, 0.25]}
    rows = compare(points, "ce-only", n_resamples=500)
    assert rows[1].significant
    path = accuracy_bars(rows, tmp_path / "bars.png", title="GSM8K", points=points, extra={"teacher": 0.62},
                         dpi=DPI)
    check_png(path)
    # No points, a one-seed variant (undefined CI), no reference line.
    rows = compare({"ce-only": [0.2, 0.22], "one": [0.3]}, "ce-only", n_resamples=200)
    check_png(accuracy_bars(rows, tmp_path / "bars1.png", title="one seed", dpi=DPI))
    # Nothing for a legend (one seed, no CI, no points, no reference): no "no artists" warning.
    rows = compare({"ce-only": [0.2]}, "ce-only")
    check_png(accuracy_bars(rows, tmp_path / "bars2.png", title="x", dpi=DPI), data=False)  # the baseline is grey
    with pytest.raises(ConfigError, match="at least one Comparison"):
        accuracy_bars([], tmp_path / "none.png", title="x")
    no_temp_files(tmp_path)


def test_eval_curve(tmp_path):
    pts = {"ce-only": [(200, 0.15), (100, 0.1), (300, 0.2)], "kava": [(100, 0.12), (200, 0.2), (300, 0.28)]}
    check_png(eval_curve(pts, tmp_path / "eval.png", ylabel="GSM8K accuracy", dpi=DPI))
    check_png(eval_curve({"kava": []}, tmp_path / "eval_empty.png", ylabel="acc", dpi=DPI), data=False)


def test_atomic_write(tmp_path, monkeypatch):
    target = tmp_path / "sub" / "fig.png"  # parent folders are created
    eval_curve({"a": [(1, 0.5), (2, 0.6)]}, target, ylabel="acc", dpi=DPI)
    assert [p.name for p in target.parent.iterdir()] == ["fig.png"]

    # A failure between writing and renaming leaves the old figure in place and no temporary file behind.
    before = target.read_bytes()

    def fail(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(curves.os, "replace", fail)
    with pytest.raises(OSError, match="disk full"):
        eval_curve({"b": [(1, 0.1)]}, target, ylabel="acc", dpi=DPI)
    assert target.read_bytes() == before
    no_temp_files(tmp_path)


def test_other_formats_and_bad_extension(tmp_path):
    pts = {"a": [(1, 0.5), (2, 0.6)]}
    assert eval_curve(pts, tmp_path / "e.svg", ylabel="acc").read_text().lstrip().startswith("<?xml")
    with pytest.raises(ConfigError, match=r"\.png, \.pdf or \.svg"):
        eval_curve(pts, tmp_path / "e.docx", ylabel="acc")
    assert [p.name for p in tmp_path.iterdir()] == ["e.svg"]
