"""`kava estimate` for compressed teachers (eviction budgets): the kept share, the bytes per original token with
their int32 positions, and the real-scale plan's budget columns, checked against numbers worked out by hand."""

from __future__ import annotations

import json
import subprocess

import numpy as np
import pytest
from click.testing import CliRunner
from helpers import ENV, KAVA, asset_path

from kava.extract.estimate import evicted_bytes_per_token, kept_share
from kava.pipelines.cli import main
from kava.pipelines.config import load_config
from kava.pipelines.scale import PLAN_BUDGET_DTYPES, PLAN_BUDGETS, format_plan, plan

# Two samples: prompt (0), reasoning (1), answer (2). A: 2 + 8 + 1 tokens; B: 1 + 3 + 2.
SEGMENTS = [np.array([0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 2]), np.array([0, 1, 1, 1, 2, 2])]


def test_kept_share_keeps_the_rest_whole_and_rounds_each_sample_up():
    assert kept_share(SEGMENTS, None) == 1.0
    # 25%: A keeps 3 + ceil(8 / 4) = 5 of 11 rows, B 3 + ceil(0.75) = 4 of 6.
    assert kept_share(SEGMENTS, 0.25) == pytest.approx(9 / 17)
    # 10%: A 3 + ceil(0.8) = 4, B 3 + 1 = 4.
    assert kept_share(SEGMENTS, 0.1) == pytest.approx(8 / 17)
    # A count of 2 rows a sample: A 5, B 5.
    assert kept_share(SEGMENTS, 2) == pytest.approx(10 / 17)
    # Over reasoning and answer: A 2 + ceil(9 / 4) = 5, B 1 + ceil(5 / 4) = 3.
    assert kept_share(SEGMENTS, 0.25, ("reasoning", "answer")) == pytest.approx(8 / 17)
    assert kept_share([np.array([], int)], 0.1) == 1.0


def test_bytes_per_original_token_count_the_kept_rows_and_their_positions():
    # 2 layers, 2 KV heads, head_dim 8. float16 K+V: 2 arrays x 2 x 2 x 8 values x 2 B = 128 B a token; a kept
    # row's positions: 2 layers x 2 heads x 4 B = 16 B.
    assert evicted_bytes_per_token(2, 2, 8, "float16", None) == 128
    assert evicted_bytes_per_token(2, 2, 8, "float16", 0.5) == 0.5 * (128 + 16)
    # int4: K 2 x 2 x 8 x 0.5 = 16 B + a float16 scale and zero per channel and 64 tokens (2 x 2 x 8 x 4 / 64 = 2);
    # V 16 B + a scale and zero per token and head (head_dim 8 < 128 channels: 2 x 2 x 4 = 16). 50 B a token.
    assert evicted_bytes_per_token(2, 2, 8, "int4", None) == 50
    assert evicted_bytes_per_token(2, 2, 8, "int4", 0.25) == 0.25 * (50 + 16)
    # Q on 1 layer x 4 heads (float16: 64 B) sits on the kept rows too; positions are per K/V layer and head.
    assert evicted_bytes_per_token(2, 2, 8, "float16", None, q_layers=1, q_heads=4) == 128 + 64
    assert evicted_bytes_per_token(2, 2, 8, "float16", 0.5, q_layers=1, q_heads=4) == 0.5 * (128 + 64 + 16)


@pytest.fixture(scope="module")
def real_plan() -> dict:
    """The real-scale config planned over 40 GSM8K problems with the real Qwen2 tokenizer, 46 ms a step."""
    return plan(
        load_config("gsm8k-qwen7b4bit-to-qwen0.5b"),
        student_tokenizer=str(asset_path("tokenizers/qwen2")),
        data_files=str(asset_path("gsm8k/train.jsonl")),
        limit=40,
        step_seconds=0.046,
    )


def test_the_plan_sizes_each_budget_from_the_data(real_plan):
    p = real_plan
    (t,) = p["teachers"]
    b = t["budgets"]
    assert b["segments"] == ["reasoning"] and (b["layers"], b["q_layers"]) == (24, 4)
    assert [(r["budget"], r["kv_dtype"]) for r in b["rows"]] == [
        (x, d) for x in PLAN_BUDGETS for d in PLAN_BUDGET_DTYPES
    ]
    rows = {(r["budget"], r["kv_dtype"]): r for r in b["rows"]}
    share = p["reasoning_share"]
    assert 0.2 < share < 0.8  # GSM8K's worked solutions are a good part of each problem
    tokens, step_tokens = p["student_tokens"], p["mean_tokens"] * 32  # 16 samples x 2 accumulation a step
    kv16 = 2 * 24 * 4 * 128 * 2  # K+V fp16 a token on the 24 mapped layers
    whole = rows[(None, "float16")]
    assert whole["kept_share"] == 1 and whole["kv_bytes_per_token"] == kv16
    assert whole["kv_bytes"] == kv16 * tokens  # the sizes table's figure for the proportional map
    assert whole["kv_bytes"] == next(
        s["kv_bytes"] for s in t["sizes"] if s["n_layers"] == 24 and s["kv_dtype"] == "float16"
    )
    assert whole["kv_gb_s"] == pytest.approx(kv16 * step_tokens / 0.046 / 1e9, rel=1e-3)
    for budget in (0.25, 0.1):
        r = rows[(budget, "float16")]
        kept = r["kept_share"]
        # Prompt and answer whole, the budget of the reasoning (rounded up per sample, under a row each).
        assert 1 - share + budget * share <= kept < 1 - share + budget * share + p["samples"] / tokens
        per_token = kept * (kv16 + 24 * 4 * 4)  # + an int32 position per kept (row, layer, head)
        assert r["kv_bytes_per_token"] == pytest.approx(per_token)
        assert r["kv_bytes"] == pytest.approx(per_token * tokens)
        assert r["kv_gb_s"] == pytest.approx(per_token * step_tokens / 0.046 / 1e9, rel=1e-3)
        # Q on the 4 attention layers (28 heads) is on the kept rows too.
        assert r["kv_q_bytes_per_token"] == pytest.approx(kept * (kv16 + 4 * 28 * 128 * 2 + 24 * 4 * 4))
        assert rows[(budget, "int4")]["kv_bytes_per_token"] == pytest.approx(
            kept * (rows[(None, "int4")]["kv_bytes_per_token"] + 24 * 4 * 4)
        )
    assert rows[(0.1, "int4")]["kv_bytes"] < rows[(0.25, "int4")]["kv_bytes"] < rows[(None, "int4")]["kv_bytes"]


def plan_args(limit: int) -> list[str]:
    """`kava estimate` of the real-scale config over ``limit`` GSM8K problems, 46 ms a step."""
    tokenizer, data = asset_path("tokenizers/qwen2"), asset_path("gsm8k/train.jsonl")
    run = ["--run-config", "gsm8k-qwen7b4bit-to-qwen0.5b", "--step-seconds", "0.046", "--limit", str(limit)]
    return ["estimate", *run, "--student-tokenizer", str(tokenizer), "--data-files", str(data)]


def test_the_plan_prints_the_budget_columns(real_plan):
    out = CliRunner().invoke(main, plan_args(40), catch_exceptions=False)
    assert out.exit_code == 0, out.stderr
    text = out.stdout
    assert text == format_plan(real_plan) + "\n"
    lines = text.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("budget"))
    assert (
        lines[header].split() == "budget kept rows dtype K+V/token K+V store per GPU +Q/token +Q store per GPU".split()
    )
    table = [line.split() for line in lines[header + 1 : header + 1 + len(PLAN_BUDGETS) * len(PLAN_BUDGET_DTYPES)]]
    assert [(r[0], r[2]) for r in table] == [(b, d) for b in ("whole", "25%", "10%") for d in PLAN_BUDGET_DTYPES]
    assert all(r[1] == "100.0%" for r in table[:4]) and "int32 positions" in text
    # label, kept, dtype, then K+V (a token, the store, per GPU) and the same with Q: 15 fields, units included.
    assert all(
        len(r) == 15 and r[4] == r[10] == "KiB" and r[6] == r[12] == "GiB" and r[8] == r[14] == "GB/s" for r in table
    )
    rows = real_plan["teachers"][0]["budgets"]["rows"]
    assert [float(r[7]) for r in table] == [round(r["kv_gb_s"], 2) for r in rows]


def test_estimate_of_an_extract_command_counts_the_kept_rows(stories):
    args = ["estimate", "--teacher", str(stories), "--timed-samples", "2", "--json"]
    args += ["--limit", "12", "--no-progress", "--calibration-samples", "0"]
    whole = json.loads(CliRunner().invoke(main, args, catch_exceptions=False).stdout)
    out = CliRunner().invoke(main, [*args, "--kv-budget", "0.1"], catch_exceptions=False)
    assert out.exit_code == 0, out.stderr
    e = json.loads(out.stdout)
    share = e["eviction"]["kept_share"]
    assert e["eviction"]["budget"] == 0.1 and e["eviction"]["segments"] == ["reasoning"] and 0 < share < 1
    f16, f16_whole = e["storage"][0], whole["storage"][0]
    # stories260K: 5 layers x 4 KV heads x 8; K+V 640 B a token whole, the kept share of it plus 80 B of positions.
    assert f16_whole["bytes_per_token"] == 640
    assert f16["bytes_per_token"] == pytest.approx(share * (640 + 5 * 4 * 4))


@pytest.mark.integration
def test_kava_estimate_prints_the_budget_table():
    proc = subprocess.run([*KAVA, *plan_args(20)], capture_output=True, text=True, env=ENV, timeout=120)
    assert proc.returncode == 0, proc.stderr
    rows = [line.split() for line in proc.stdout.splitlines() if line.startswith(("whole ", "25% ", "10% "))]
    assert [(r[0], r[2]) for r in rows] == [(b, d) for b in ("whole", "25%", "10%") for d in PLAN_BUDGET_DTYPES]
