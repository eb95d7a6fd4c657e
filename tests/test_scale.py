"""`kava estimate --run-config`: the real-scale plan, from the real GSM8K and the real Qwen2 tokenizer."""

from __future__ import annotations

import json
import subprocess

import pytest
from helpers import ENV, KAVA

from kava.core.errors import ConfigError
from kava.pipelines.config import load_config
from kava.pipelines.scale import KNOWN_GEOMETRY, geometry, plan

REAL = "gsm8k-qwen7b4bit-to-qwen0.5b"


def test_plan_sizes_are_the_geometry_times_the_tokens(assets):
    cfg = load_config(REAL)
    p = plan(cfg, student_tokenizer=str(assets("tokenizers/qwen2")), data_files=str(assets("gsm8k/train.jsonl")),
             limit=100, tokens_per_s=1000.0, step_seconds=2.0)
    assert p["samples"] == 100 and p["student_layers"] == 24  # Qwen2.5-0.5B's published depth
    (t,) = p["teachers"]
    assert (t["geometry"]["layers"], t["geometry"]["kv_heads"], t["geometry"]["head_dim"]) == (28, 4, 128)
    fp16_all = next(s for s in t["sizes"] if s["n_layers"] == 28 and s["kv_dtype"] == "float16")
    assert fp16_all["kv_bytes"] == 2 * 28 * 4 * 128 * 2 * p["student_tokens"]  # K and V, fp16
    assert fp16_all["kv_q_bytes"] - fp16_all["kv_bytes"] == 28 * 28 * 128 * 2 * p["student_tokens"]
    int8 = next(s for s in t["sizes"] if s["n_layers"] == 28 and s["kv_dtype"] == "int8")
    assert int8["kv_bytes_per_token"] == 2 * (28 * 4 * 128 + 28 * 4 * 2)  # + an fp16 scale per (layer, head)
    assert t["gpu_hours"] == pytest.approx(p["student_tokens"] / 1000 / 3600)
    # The config stores K/V on the 24 mapped layers and Q on the 4 attention layers; a step reads 32 samples.
    per_token = 2 * 24 * 4 * 128 * 2 + 4 * 28 * 128 * 2
    assert t["step"]["bytes"] == pytest.approx(per_token * p["mean_tokens"] * 32, rel=1e-3)
    assert t["step"]["needed_mb_s"] == pytest.approx(t["step"]["bytes"] / 2.0 / 1e6)


def test_geometry_prefers_a_local_config_and_names_what_it_cannot_find(tmp_path):
    from transformers import LlamaConfig

    LlamaConfig(num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, hidden_size=64).save_pretrained(
        tmp_path)
    assert geometry(str(tmp_path)) == ((3, 4, 2, 16), "local config")
    assert geometry("Qwen/Qwen2.5-7B-Instruct") == (KNOWN_GEOMETRY["Qwen/Qwen2.5-7B-Instruct"], "published config")
    with pytest.raises(ConfigError, match="org/unknown: its config is not in the local cache"):
        geometry("org/unknown")


def test_configs_that_train_their_teachers_are_not_planned():
    with pytest.raises(ConfigError, match="pretrained teachers"):
        plan(load_config("default"))


@pytest.mark.integration
def test_estimate_cli_prints_the_plan_as_json(assets):
    proc = subprocess.run([*KAVA, "estimate", "--run-config", REAL,
                           "--student-tokenizer", str(assets("tokenizers/qwen2")),
                           "--data-files", str(assets("gsm8k/train.jsonl")), "--limit", "50", "--json"],
                          capture_output=True, text=True, env=ENV, timeout=120)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["samples"] == 50 and out["teachers"][0]["model"] == "Qwen/Qwen2.5-7B-Instruct"
