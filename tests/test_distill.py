"""`kava distill` end to end: a real store from the real stories260K extraction, real students loaded through
`from_pretrained` (or built from a preset on the store's tokenizer), real checkpoints on disk.

The strongest check is a student that *is* the teacher: stories260K distilled against its own stored K/V (identity
layer map) must see keys, values and attention that already match (cosine 1, KL 0) in its first step — which holds
only if capture, RoPE handling, layer mapping, projector initialisation, masking and the loader all line up.
"""

from __future__ import annotations

import json
import math
import shutil
import signal
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from helpers import ENV, KAVA, asset_path, sigkill_when

from kava.core.errors import ConfigError, SchemaError
from kava.distill.config import DistillConfig
from kava.distill.loader import LoaderConfig, StreamLoader, TeacherRequest
from kava.distill.trainer import TrainingError, run_distill
from kava.extract.capture import capture_qkv
from kava.extract.config import ExtractConfig
from kava.extract.recipe import run_extract
from kava.kvstore import KVStore
from kava.pipelines.cli import main

STORIES = "models/stories260K_hf_derived"
TEACHER = "stories260K_hf_derived"
FAST = {"batch_size": 4, "progress": False, "checkpoint_every": 0}


ONE_TORCH_THREAD = True  # see conftest.one_torch_thread


def extract(teacher: Path | str, store: Path, **options: Any):
    opts = {"limit": 40, "shard_tokens": 1024, "batch_size": 8, "progress": False, "calibration_samples": 0,
            **options}
    return run_extract(ExtractConfig.from_dict(dict(teacher=str(teacher), store=str(store), **opts)),
                       log=lambda _: None)


def distill(out: Path, **options: Any):
    return run_distill(DistillConfig.from_dict(dict(out=str(out), **{**FAST, **options})), log=lambda _: None)


def metrics(out: Path) -> list[dict[str, float]]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def store(tmp_path_factory, stories) -> Path:
    """stories260K over 40 synthetic problems with Q, identity layer map (5 student layers), ~9 shards."""
    path = tmp_path_factory.mktemp("distill") / "kv.zarr"
    extract(stories, path, with_q=True)
    return path


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory, stories) -> Path:
    """A seeded 5-layer Llama on the stories tokenizer, saved and loaded back like any checkpoint."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

    tok = AutoTokenizer.from_pretrained(stories)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=5,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024)
    torch.manual_seed(3)
    path = tmp_path_factory.mktemp("models") / "tiny-llama"
    AutoModelForCausalLM.from_config(config).save_pretrained(path)
    tok.save_pretrained(path)
    return path


# ---------------------------------------------------------------------------------------------------------------------
# Correctness of the objective, end to end


def test_the_teacher_as_its_own_student_already_matches_its_stored_kv(tmp_path, store, stories):
    distill(tmp_path / "self", store=str(store), student=str(stories), loss="structural", project="teacher",
            steps=1, lr=1e-9)
    m = metrics(tmp_path / "self")[0]
    # fp16 storage rounds K/V to ~1e-3 relative: cosine within 1e-5 of 1, KL within 1e-4 of 0.
    for layer in range(5):
        assert m[f"cos_k/L{layer}"] == pytest.approx(1.0, abs=1e-5)
        assert m[f"cos_v/L{layer}"] == pytest.approx(1.0, abs=1e-5)
    assert m["loss/k"] < 1e-5 and m["loss/v"] < 1e-5
    assert 0 <= m["loss/attn"] < 1e-4


def test_one_forward_per_micro_batch_and_its_capture_equals_extractions(tmp_path, store, stories):
    """The student's K/V come from the training forward itself, and equal what extraction captures."""
    from kava.distill.module import DistillModule, build_objective
    from kava.distill.run_data import resolve_data
    from kava.distill.student import load_student

    cfg = DistillConfig(student=str(stories), out=str(tmp_path), store=str(store), batch_size=3)
    data = resolve_data(cfg, tmp_path, lambda _: None)
    student = load_student(cfg.student, tokenizer=data.tokenizer)
    module = DistillModule(student, build_objective(cfg, data, student), cfg)
    batch = next(iter(StreamLoader(data.loader_config(cfg, rank=0, world_size=1))))
    calls = []
    handle = student.inner.model.register_forward_hook(lambda *_: calls.append(1))
    seen: dict[int, torch.Tensor] = {}
    original = module.objective.forward

    def spy(student_kv, b):
        seen.update({k: student_kv.key(k, "pre").detach().clone() for k in student_kv.keys})
        return original(student_kv, b)

    module.objective.forward = spy
    module.eval()  # no dropout either way; eval lets capture_qkv run on the same model below
    _, terms = module(batch)
    handle.remove()
    assert len(calls) == 1
    # Cross-entropy on the completion tokens equals transformers' own loss with the prompt and padding masked.
    targets = torch.full_like(batch.input_ids, -100)
    for b, (ids, segs) in enumerate(zip(batch.input_ids.tolist(), batch.segment_ids.tolist())):
        first = next(t for t, seg in enumerate(segs) if seg in (1, 2))  # reasoning or answer; padding is -1
        last = max(t for t, seg in enumerate(segs) if seg >= 0)
        targets[b, first:last + 1] = torch.tensor(ids[first:last + 1])
    with torch.no_grad():
        reference_ce = student.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                                     labels=targets).loss
    torch.testing.assert_close(terms["loss/ce"], reference_ce)
    reference = capture_qkv(student.inner, batch.input_ids, batch.attention_mask, k_rope="pre")
    for layer, keys in seen.items():
        valid = batch.attention_mask.bool()
        torch.testing.assert_close(keys.permute(0, 2, 1, 3)[valid], reference.keys[layer].permute(0, 2, 1, 3)[valid])


def test_a_seeded_run_pins_its_first_losses(tmp_path, store):
    distill(tmp_path / "a", store=str(store), student="tiny-llama", steps=3)
    losses = [(m["loss/ce"], m["loss/k"], m["loss/v"]) for m in metrics(tmp_path / "a")]
    # Pinned from this seeded run: the preset's init, the projectors' init and the data order all depend on --seed.
    # (Samples end with the grid's EOS: a CE target, with no K/V target.)
    expected = [(6.189687, 0.946078, 0.991135), (6.051600, 0.721480, 0.923295), (5.981612, 0.548732, 0.895280)]
    np.testing.assert_allclose(losses, expected, atol=1e-4)


def test_ce_only_baseline_sees_the_same_batches_through_the_same_loop(tmp_path, store):
    distill(tmp_path / "kv", store=str(store), student="tiny-llama", steps=4)
    distill(tmp_path / "ce", store=str(store), student="tiny-llama", steps=4, kv_weight=0)
    kv, ce = metrics(tmp_path / "kv"), metrics(tmp_path / "ce")
    assert [m["tokens"] for m in kv] == [m["tokens"] for m in ce]
    assert "loss/kv" in kv[0] and "loss/kv" not in ce[0]
    assert kv[0]["loss/ce"] == pytest.approx(ce[0]["loss/ce"], abs=1e-6)  # same init, same first batch
    assert not (tmp_path / "ce" / "projectors.safetensors").exists()


def test_without_a_store_it_fine_tunes_on_a_dataset(tmp_path, assets):
    gpt2 = assets("tokenizers/gpt2")
    out = tmp_path / "ft"
    result = distill(out, student="tiny-qwen2", tokenizer=str(gpt2), dataset="gsm8k",
                     data_files=str(assets("gsm8k/test.jsonl")), split="test", limit=24, steps=3, lr=1e-3)
    assert result.steps == 3 and result.teachers == []
    assert KVStore.open(out / "grid.zarr").num_samples == 24
    losses = [m["loss/ce"] for m in metrics(out)]
    assert all(math.isfinite(x) for x in losses) and losses[0] == pytest.approx(math.log(50257), abs=0.3)


# ---------------------------------------------------------------------------------------------------------------------
# Outputs, checkpoints, resume


@pytest.mark.integration
def test_cli_outputs_load_back(tmp_path, store):
    out = tmp_path / "run"
    proc = subprocess.run([*KAVA, "distill", "--store", str(store), "--student", "tiny-llama", "--out", str(out),
                           "--steps", "2", "--batch-size", "4", "--loss", "mercator", "--no-progress", "--json"],
                          capture_output=True, text=True, env=ENV, timeout=180)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["steps"] == 2 and result["teachers"] == [TEACHER]
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.num_hidden_layers == 5  # the preset took the store's layer-map depth
    assert len(AutoTokenizer.from_pretrained(out)) == 512
    heads = load_file(out / "projectors.safetensors")
    assert any(k.startswith("projectors.") for k in heads)
    rows = metrics(out)
    assert [r["step"] for r in rows] == [1, 2]
    for key in ("loss/ce", "loss/k", "loss/v", "loss/kv", "lr", "tokens_per_s", "data_wait_s", "cos_k/L4",
                "target_var"):
        assert key in rows[0]
    manifest = json.loads((out / "kava.json").read_text())
    assert manifest["template"] == "plain" and manifest["teachers"] == [TEACHER]
    import yaml

    assert yaml.safe_load((out / "config.yaml").read_text())["student"] == "tiny-llama"

    # kava eval reads the trained directory back: only JSON on stdout, one JSONL line per item beside the model.
    scored = subprocess.run([*KAVA, "eval", "--model", str(out), "--dataset", "synthetic", "--split", "test",
                             "--limit", "3", "--max-new-tokens", "8", "--no-progress", "--json"],
                            capture_output=True, text=True, env=ENV, timeout=180)
    assert scored.returncode == 0, scored.stderr
    report = json.loads(scored.stdout)
    assert report["n"] == 3 and report["template"] == "plain" and 0 <= report["accuracy"] <= 1
    items = [json.loads(line) for line in Path(report["out"]).read_text().splitlines()]
    assert [i["sample_id"] for i in items] == [f"synthetic/test/{i:06d}" for i in range(3)]
    # Generations cut off at the 8-token budget are counted, and more than 5% of them earn a warning naming the fix.
    cut = sum(i["stop"] == "budget" for i in items)
    assert report["budget_stops"] == cut and report["max_new_tokens"] == 8
    assert ("stopped at the 8-token budget" in scored.stderr and "Raise --max-new-tokens" in scored.stderr) == (cut > 0)


@pytest.mark.integration
def test_killed_run_resumes_with_the_uninterrupted_loss_sequence(tmp_path, store):
    common = dict(store=str(store), student="tiny-llama", steps=8, loss="structural", grad_accum=2)
    distill(tmp_path / "whole", **common, checkpoint_every=3)
    out = tmp_path / "killed"
    args = [*KAVA, "distill", "--store", str(store), "--student", "tiny-llama", "--out", str(out), "--steps", "8",
            "--loss", "structural", "--grad-accum", "2", "--batch-size", "4", "--checkpoint-every", "3",
            "--no-progress"]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
    err = sigkill_when(proc, lambda: (out / "checkpoints" / "step-000003").exists())
    assert proc.returncode == -signal.SIGKILL, err
    assert not (out / "kava.json").exists()

    refused = CliRunner().invoke(main, args[3:-1] + ["--no-progress"])
    assert refused.exit_code == 1 and "--resume" in refused.output
    with pytest.raises(ConfigError, match=r"--lr: 0.0003 in the checkpoint, 0.001 now"):
        distill(out, **common, checkpoint_every=3, resume=True, lr=1e-3)
    distill(out, **common, checkpoint_every=3, resume=True)
    whole, resumed = metrics(tmp_path / "whole"), metrics(out)
    assert [m["step"] for m in resumed] == list(range(1, 9))
    for a, b in zip(whole, resumed):
        assert a["loss/total"] == b["loss/total"] and a["loss/attn"] == b["loss/attn"]


def test_nan_loss_stops_with_a_checkpoint_and_names_step_and_term(tmp_path, store, stories):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = tmp_path / "nan-student"
    model = AutoModelForCausalLM.from_pretrained(stories)
    with torch.no_grad():
        model.model.norm.weight[0] = float("nan")  # every logit NaN, K/V fine: CE is the term that breaks
    model.save_pretrained(path)
    AutoTokenizer.from_pretrained(stories).save_pretrained(path)
    with pytest.raises(TrainingError, match=r"Loss term loss/ce is nan at step 1 .*nan-step-1"):
        distill(tmp_path / "run", store=str(store), student=str(path), steps=3)
    assert (tmp_path / "run" / "checkpoints" / "nan-step-1" / "weights.safetensors").exists()


# peft reads transformers' deprecated is_gradient_checkpointing when it wraps a model (here: the test's reference).
@pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing:FutureWarning")
def test_lora_student_trains_adapters_and_saves_a_merged_model(tmp_path, store, tiny_llama):
    out = tmp_path / "lora"
    result = distill(out, store=str(store), student=str(tiny_llama), lora_r=4, steps=2, lr=1e-2)
    assert result.parameters["student_trainable"] < result.parameters["student_total"] / 2
    assert (out / "adapter" / "adapter_config.json").exists()
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    merged = AutoModelForCausalLM.from_pretrained(out).eval()
    base = AutoModelForCausalLM.from_pretrained(tiny_llama).eval()
    adapted = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_llama), out / "adapter").eval()
    ids = torch.tensor([[1, 50, 60, 70, 80]])
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, adapted(ids).logits, atol=1e-5, rtol=1e-5)
        assert not torch.allclose(merged(ids).logits, base(ids).logits)


# ---------------------------------------------------------------------------------------------------------------------
# Several teachers, projectors


@pytest.fixture(scope="module")
def two_teachers(tmp_path_factory, store, tiny_llama) -> Path:
    path = tmp_path_factory.mktemp("two") / "kv.zarr"
    shutil.copytree(store, path)
    extract(tiny_llama, path, name="tiny", student_layers=5)
    return path


@pytest.mark.parametrize("fusion", ["fixed", "similarity", "learnable"])
def test_multi_teacher_fusion_logs_router_weights(tmp_path, two_teachers, fusion):
    weights = {"fusion_weights": "0.7,0.3"} if fusion == "fixed" else {}
    distill(tmp_path / fusion, store=str(two_teachers), student="tiny-qwen2", teachers=f"{TEACHER},tiny",
            fusion=fusion, steps=2, **weights)
    m = metrics(tmp_path / fusion)[0]
    assert m[f"router/{TEACHER}"] + m["router/tiny"] == pytest.approx(1.0, abs=1e-5)
    if fusion == "fixed":
        assert m[f"router/{TEACHER}"] == pytest.approx(0.7, abs=1e-5)
    if fusion == "learnable":  # starts uniform
        assert m["router/entropy"] == pytest.approx(math.log(2), abs=1e-3)


@pytest.mark.parametrize("projector,project,share", [("flat", "student", False), ("structured", "teacher", True),
                                                     ("structured", "student", False)])
def test_projector_choices_train_and_report_their_size(tmp_path, store, projector, project, share):
    result = distill(tmp_path / "p", store=str(store), student="tiny-qwen2", projector=projector, project=project,
                     share_dim_proj=share, loss="mse", steps=2)
    # tiny-qwen2: 2 KV heads x 32 dims; stories260K: 4 KV heads x 8 dims; 5 layers, K and V.
    s, t = (2, 32), (4, 8)
    src, dst = (s, t) if project == "student" else (t, s)
    if projector == "flat":
        per = src[0] * src[1] * dst[0] * dst[1]
    else:
        per = dst[0] * src[0] + (1 if share else dst[0]) * src[1] * dst[1]
    assert result.parameters[f"projector/{TEACHER}"] == 2 * 5 * per
    assert all(math.isfinite(m["loss/total"]) for m in metrics(tmp_path / "p"))


# ---------------------------------------------------------------------------------------------------------------------
# Refusals: before training, naming what the store has


def test_unknown_teacher_and_missing_queries_are_refused_listing_the_store(tmp_path, store, two_teachers):
    with pytest.raises(SchemaError, match=rf"no teacher 'gpt9'. The store has: {TEACHER}, tiny"):
        distill(tmp_path / "a", store=str(two_teachers), student="tiny-llama", teachers="gpt9")
    with pytest.raises(SchemaError, match=rf"The store has 2: {TEACHER}, tiny. Pick with --teachers"):
        distill(tmp_path / "b", store=str(two_teachers), student="tiny-llama")
    with pytest.raises(SchemaError, match=r"'tiny' has no stored queries.*--with-q"):
        distill(tmp_path / "c", store=str(two_teachers), student="tiny-llama", teachers="tiny", loss="structural")
    with pytest.raises(ConfigError, match=r"--kv-layers \[7\]: the store's layer map has student layers 0-4"):
        distill(tmp_path / "d", store=str(store), student="tiny-llama", kv_layers="1,7")
    assert not any((tmp_path / n / "metrics.jsonl").exists() for n in "abcd")


def test_student_with_another_tokenizer_or_depth_is_refused(tmp_path, store, assets):
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

    def save(name: str, tok_path: Path, layers: int) -> Path:
        tok = AutoTokenizer.from_pretrained(tok_path)
        cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                          num_attention_heads=4, num_key_value_heads=2)
        AutoModelForCausalLM.from_config(cfg).save_pretrained(tmp_path / name)
        tok.save_pretrained(tmp_path / name)
        return tmp_path / name

    gpt2_student = save("gpt2-student", assets("tokenizers/gpt2"), 5)
    with pytest.raises(ConfigError, match=r"grid was cut with the tokenizer of .* Re-extract with --student-tokenizer"):
        distill(tmp_path / "a", store=str(store), student=str(gpt2_student))
    shallow = save("shallow", asset_path(STORIES), 3)
    with pytest.raises(ConfigError, match=r"layer map is for a 5-layer student; .* has 3 layers"):
        distill(tmp_path / "b", store=str(store), student=str(shallow))


def test_config_reports_every_problem_at_once():
    cfg = DistillConfig(student="tiny-llama", out="x", loss="cosine", steps=3, epochs=2, segment_weights="body=2",
                        fusion_weights="1,2", kv_layers="1,1", lr=-1.0)
    with pytest.raises(ConfigError, match=r"Found 6 problems") as e:
        cfg.validate()
    for fragment in ("--loss: expected one of mse, mercator, structural", "Can't set both --steps and --epochs",
                     "--segment-weights: expected name=weight", "--kv-layers", "--lr: expected a finite positive",
                     "--teachers and --kv-layers need --store"):
        assert fragment in str(e.value)


def test_attention_term_on_chosen_layers_only(tmp_path, store, stories):
    """The self-distilled teacher again: with the attention term on layer 4 alone, only layer 4's queries are
    captured, and its KL is still 0."""
    distill(tmp_path / "one", store=str(store), student=str(stories), loss="structural", project="teacher",
            attn_layers="4", steps=1, lr=1e-9)
    assert 0 <= metrics(tmp_path / "one")[0]["loss/attn"] < 1e-4
    with pytest.raises(ConfigError, match=r"--attn-layers 1: expected a subset of --kv-layers 0,2"):
        distill(tmp_path / "bad", store=str(store), student="tiny-llama", loss="structural", kv_layers="0,2",
                attn_layers="1")


def test_loader_reads_only_the_layers_the_run_maps(tmp_path, store):
    from kava.distill.run_data import resolve_data

    cfg = DistillConfig(student="tiny-llama", out=str(tmp_path), store=str(store), kv_layers="1,3")
    data = resolve_data(cfg, tmp_path, lambda _: None)
    request = data.loader_config(cfg, rank=0, world_size=1).teachers[0]
    assert request == TeacherRequest(TEACHER, layers=(1, 3), with_q=False)
    batch = next(iter(StreamLoader(LoaderConfig(store=str(store), teachers=(request,), batch_size=2))))
    assert batch.teachers[TEACHER].k.shape[1] == 2


def test_progress_line_says_the_time_left(tmp_path, store):
    from kava.distill.config import DistillConfig
    from kava.distill.outputs import format_duration

    assert [format_duration(s) for s in (0, 41.6, 185, 7620, -3)] == ["0s", "42s", "3m05s", "2h07m", "0s"]
    lines: list[str] = []
    run_distill(DistillConfig.from_dict(dict(out=str(tmp_path / "run"), store=str(store), student="tiny-llama",
                                             **{**FAST, "steps": 3, "progress": True, "log_every": 1})),
                log=lines.append)
    steps = [line for line in lines if line.startswith("step ")]
    assert [line.split()[1] for line in steps] == ["1/3", "2/3", "3/3"]
    assert all(" eta " in line for line in steps) and steps[-1].endswith("eta 0s")


def test_attention_implementation_of_the_student(tmp_path, store):
    """eager and sdpa are the same attention: the same first losses; flash attention is refused with the reason."""
    sdpa = distill(tmp_path / "sdpa", store=str(store), student="tiny-llama", steps=2, loss="structural")
    eager = distill(tmp_path / "eager", store=str(store), student="tiny-llama", steps=2, loss="structural",
                    attn_implementation="eager")
    assert sdpa.final["loss/total"] > 0
    for key in ("loss/ce", "loss/kv", "loss/attn"):
        assert metrics(tmp_path / "eager")[0][key] == pytest.approx(metrics(tmp_path / "sdpa")[0][key], rel=1e-4)
    assert eager.steps == 2
    with pytest.raises(ConfigError, match=r"--attn-implementation flash_attention_2: the student's Q/K/V are read by "
                                          r"wrapping its attention function.*Use sdpa"):
        distill(tmp_path / "flash", store=str(store), student="tiny-llama", attn_implementation="flash_attention_2")
    with pytest.raises(ConfigError, match=r"--attn-implementation: expected one of sdpa, eager. Got 'fast' instead"):
        distill(tmp_path / "fast", store=str(store), student="tiny-llama", attn_implementation="fast")
