"""Teacher registry, resolution and loading: presets, errors, nf4/int8 on CPU against fp32, the real stories260K."""

from __future__ import annotations

import dataclasses
import json
import re
import time
from pathlib import Path

import pytest
import torch

from kava.core.errors import ConfigError
from kava.core.models import ModelPreset, ModelSource, describe_model, load_pretrained
from kava.extract.teachers import PRESETS, format_preset_table, list_presets, resolve_teacher

TEXT = "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May."


def _byte_level_tokenizer():
    """A real fast byte-level BPE with no merges: exactly 256 tokens, one per byte, with character offsets."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {ch: i for i, ch in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=backend)


@pytest.fixture(scope="module")
def tiny_qwen(tmp_path_factory) -> Path:
    """A seeded tiny Qwen2 (GQA: 4 query heads, 2 KV heads, head dim 16) saved with its tokenizer."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    config = Qwen2Config(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
    )
    path = tmp_path_factory.mktemp("tiny_qwen2")
    Qwen2ForCausalLM(config).save_pretrained(path)
    _byte_level_tokenizer().save_pretrained(path)
    return path


@pytest.fixture
def fake_hub_cache(tmp_path, monkeypatch) -> Path:
    """A Hugging Face cache holding only the presets' config.json, so presets resolve offline.

    huggingface_hub reads HF_HUB_CACHE once at import, so the constant is patched rather than the environment.
    """
    from huggingface_hub import constants

    commit = "0" * 40
    for hf_id in {p.hf_id for p in list_presets()}:
        repo = tmp_path / ("models--" + hf_id.replace("/", "--"))
        (repo / "refs").mkdir(parents=True)
        (repo / "refs" / "main").write_text(commit)
        snapshot = repo / "snapshots" / commit
        snapshot.mkdir(parents=True)
        (snapshot / "config.json").write_text("{}")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    return tmp_path


def _kv(model, input_ids: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per layer (K, V) as float32, each (B, kv_heads, T, head_dim); K after RoPE."""
    with torch.no_grad():
        out = model(input_ids, use_cache=True)
    return [(layer.keys.float(), layer.values.float()) for layer in out.cache.layers]


def _agreement(ref: torch.Tensor, got: torch.Tensor) -> tuple[float, float]:
    """(relative Frobenius error, mean cosine over head_dim vectors)."""
    rel = ((got - ref).norm() / ref.norm()).item()
    cos = torch.nn.functional.cosine_similarity(got, ref, dim=-1).mean().item()
    return rel, cos


# --- registry --------------------------------------------------------------------------------------------------


def test_presets_registry():
    expected = {
        "qwen-7b-4bit": ("Qwen/Qwen2.5-7B-Instruct", "nf4", "bfloat16"),
        "qwen-1.5b": ("Qwen/Qwen2.5-1.5B-Instruct", "none", "bfloat16"),
        "qwen-0.5b": ("Qwen/Qwen2.5-0.5B-Instruct", "none", "bfloat16"),
        "llama-3.2-1b": ("meta-llama/Llama-3.2-1B-Instruct", "none", "bfloat16"),
        "llama-3.2-3b-4bit": ("meta-llama/Llama-3.2-3B-Instruct", "nf4", "bfloat16"),
    }
    presets = {p.name: p for p in list_presets()}
    for name, (hf_id, quantization, dtype) in expected.items():
        assert (presets[name].hf_id, presets[name].quantization, presets[name].dtype) == (hf_id, quantization, dtype)
    assert presets == PRESETS
    with pytest.raises(dataclasses.FrozenInstanceError):
        presets["qwen-7b-4bit"].hf_id = "x/y"  # type: ignore[misc]
    with pytest.raises(ConfigError, match="Expected quantization"):
        ModelPreset("bad", "x/y", "fp4", "bfloat16", "")  # type: ignore[arg-type]


def test_preset_table_lists_every_preset():
    table = format_preset_table()
    for preset in list_presets():
        line = next(line for line in table.splitlines() if line.startswith(preset.name + " "))
        assert preset.hf_id in line and preset.quantization in line
    assert "hub id (org/name)" in table


def test_preset_resolves_with_its_quantization(fake_hub_cache):
    source = resolve_teacher("qwen-7b-4bit")
    assert source == ModelSource(
        name="qwen-7b-4bit",
        model_id="Qwen/Qwen2.5-7B-Instruct",
        revision=None,
        quantization="nf4",
        dtype="bfloat16",
        device="cpu",
        trust_remote_code=False,
        is_local=False,
    )
    assert json.loads(json.dumps(source.to_dict())) == source.to_dict()
    # Flags override the preset; int8 takes its own default compute dtype (bitsandbytes casts to float16).
    assert resolve_teacher("Qwen-1.5B", load_in_4bit=True).quantization == "nf4"
    eight = resolve_teacher("qwen-7b-4bit", load_in_8bit=True)
    assert (eight.quantization, eight.dtype) == ("int8", "float16")
    assert resolve_teacher("qwen-0.5b", dtype=torch.float32).dtype == "float32"
    # A cached hub id that is not a preset resolves too.
    hub = resolve_teacher("meta-llama/Llama-3.2-1B-Instruct", revision="main")
    assert (hub.name, hub.is_local, hub.revision) == ("meta-llama/Llama-3.2-1B-Instruct", False, "main")


# --- resolution errors -------------------------------------------------------------------------------------------


def test_unknown_teacher_suggests_close_presets():
    close = r"Unknown teacher 'qwen-7b-4bt'\. Did you mean: qwen-7b-4bit.*--list-teachers"
    with pytest.raises(ConfigError, match=close):
        resolve_teacher("qwen-7b-4bt")
    with pytest.raises(ConfigError, match=r"Unknown teacher 'zzz'\. Run `kava extract --list-teachers`"):
        resolve_teacher("zzz")


def test_both_quantization_flags_rejected(tiny_qwen):
    message = "Can't set both --load-in-4bit and --load-in-8bit. Choose one."
    with pytest.raises(ConfigError, match=re.escape(message)):
        resolve_teacher(str(tiny_qwen), load_in_4bit=True, load_in_8bit=True)


def test_every_problem_reported_at_once():
    with pytest.raises(ConfigError, match="Found 4 problems") as info:
        resolve_teacher("qwen-7b-4bt", load_in_4bit=True, load_in_8bit=True, dtype="fp8", device="tpu")
    message = str(info.value)
    for part in ("--load-in-4bit", "--dtype", "--device", "Did you mean: qwen-7b-4bit"):
        assert part in message


def test_local_path_errors(tmp_path, tiny_qwen):
    with pytest.raises(ConfigError, match="does not exist or is not a directory"):
        resolve_teacher(str(tmp_path / "missing" / "model"))
    with pytest.raises(ConfigError, match="Expected a model directory with a config.json"):
        resolve_teacher(str(tmp_path))
    with pytest.raises(ConfigError, match="--revision applies to hub ids only"):
        resolve_teacher(str(tiny_qwen), revision="main")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error shown when CUDA is missing")
def test_cuda_without_cuda_rejected(tiny_qwen):
    with pytest.raises(ConfigError, match=r"--device cuda:0 needs CUDA.*Use --device cpu"):
        resolve_teacher(str(tiny_qwen), device="cuda")


def test_offline_uncached_hub_id_fails_fast(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.perf_counter()
    with pytest.raises(ConfigError, match=r"kava-tests/never-cached-model is not cached.*HF_HUB_OFFLINE=1") as info:
        resolve_teacher("kava-tests/never-cached-model")
    elapsed = time.perf_counter() - start
    assert elapsed < 5.0, f"took {elapsed:.1f} s; the cache check must not wait on the network"
    for fix in ("hf download kava-tests/never-cached-model", "HF_HOME", "local model directory"):
        assert fix in str(info.value)


def test_trust_remote_code_off_by_default(tmp_path):
    """A checkpoint with its own modelling code is refused, and that code never runs, unless the flag is set."""
    sentinel = tmp_path / "remote_code_ran"
    (tmp_path / "config.json").write_text(
        json.dumps(
            {
                "model_type": "kava_remote_probe",
                "auto_map": {
                    "AutoConfig": "modeling_probe.ProbeConfig",
                    "AutoModelForCausalLM": "modeling_probe.ProbeForCausalLM",
                },
            }
        )
    )
    (tmp_path / "modeling_probe.py").write_text(f"open({str(sentinel)!r}, 'w').close()\n")
    _byte_level_tokenizer().save_pretrained(tmp_path)

    source = resolve_teacher(str(tmp_path))
    assert source.trust_remote_code is False
    with pytest.raises(ConfigError, match="ships its own modelling code.*pass --trust-remote-code"):
        load_pretrained(source)
    assert not sentinel.exists()
    assert resolve_teacher(str(tmp_path), trust_remote_code=True).trust_remote_code is True


# --- loading -----------------------------------------------------------------------------------------------------


def test_nf4_on_cpu_matches_fp32(tiny_qwen):
    fp32_source = resolve_teacher(str(tiny_qwen))
    nf4_source = resolve_teacher(str(tiny_qwen), load_in_4bit=True)
    assert (nf4_source.quantization, nf4_source.dtype) == ("nf4", "bfloat16")
    fp32, tokenizer = load_pretrained(fp32_source)
    nf4, _ = load_pretrained(nf4_source)

    import bitsandbytes as bnb

    assert isinstance(nf4.model.layers[0].self_attn.k_proj, bnb.nn.Linear4bit)
    assert not nf4.training and not any(p.requires_grad for p in nf4.parameters())
    input_ids = tokenizer(TEXT, return_tensors="pt").input_ids  # (1, T) one token per byte
    ref, got = _kv(fp32, input_ids), _kv(nf4, input_ids)
    for layer, ((k_ref, v_ref), (k, v)) in enumerate(zip(ref, got)):
        assert k.shape == k_ref.shape == (1, 2, input_ids.shape[1], 16)
        for name, a, b in (("K", k_ref, k), ("V", v_ref, v)):
            rel, cos = _agreement(a, b)
            # Measured here (seed 0, random init, bf16 compute): relative error 0.091-0.118, mean cosine
            # 0.9928-0.9956 over both layers, K and V; nf4 of Gaussian weights alone is ~0.1 per weight matrix.
            assert rel < 0.14 and cos > 0.99, f"layer {layer} {name}: rel {rel:.4f} cos {cos:.4f}"

    meta = describe_model(nf4, nf4_source)
    assert meta["architecture"] == "Qwen2ForCausalLM"
    assert (meta["quantization"], meta["dtype"], meta["is_local"]) == ("nf4", "bfloat16", True)
    assert (meta["num_layers"], meta["num_kv_heads"], meta["head_dim"]) == (2, 2, 16)
    # transformers counts each packed 4-bit byte as two parameters, so the count matches the fp32 model.
    assert meta["num_params"] == describe_model(fp32, fp32_source)["num_params"] == fp32.num_parameters()


def test_nf4_kernel_matches_its_dequantized_weights(tiny_qwen):
    """The CPU 4-bit kernels compute what the stored nf4 weights say: fp32 run on the dequantized weights.

    Dequantize before the first forward: on CPUs with AVX512-BF16, bitsandbytes repacks the weights in place on the
    first eval/no-grad forward for its fused kernel, which then works in bfloat16 whatever the compute dtype.
    """
    import bitsandbytes as bnb
    import bitsandbytes.functional as F

    nf4, tokenizer = load_pretrained(resolve_teacher(str(tiny_qwen), load_in_4bit=True, dtype="float32"))
    reference, _ = load_pretrained(resolve_teacher(str(tiny_qwen)))
    quantized = dict(nf4.named_modules())
    for name, module in reference.named_modules():
        if isinstance(quantized.get(name), bnb.nn.Linear4bit):
            weight = quantized[name].weight
            module.weight.data = F.dequantize_4bit(weight.data, weight.quant_state).float()
    input_ids = tokenizer(TEXT, return_tensors="pt").input_ids
    for (k_ref, v_ref), (k, v) in zip(_kv(reference, input_ids), _kv(nf4, input_ids)):
        for a, b in ((k_ref, k), (v_ref, v)):
            rel, _ = _agreement(a, b)
            # Measured here: 3.2e-3 to 3.8e-3 (the fused AVX512-BF16 kernel rounds activations to bfloat16; elsewhere
            # bitsandbytes dequantizes and multiplies in float32). ~25x below the nf4-vs-fp32 error above.
            assert rel < 6e-3, f"rel {rel:.2e}"


def test_int8_on_cpu_matches_fp32(tiny_qwen):
    fp32, tokenizer = load_pretrained(resolve_teacher(str(tiny_qwen)))
    source = resolve_teacher(str(tiny_qwen), load_in_8bit=True)
    assert (source.quantization, source.dtype) == ("int8", "float16")
    int8, _ = load_pretrained(source)

    import bitsandbytes as bnb

    assert isinstance(int8.model.layers[0].self_attn.v_proj, bnb.nn.Linear8bitLt)
    input_ids = tokenizer(TEXT, return_tensors="pt").input_ids
    for layer, ((k_ref, v_ref), (k, v)) in enumerate(zip(_kv(fp32, input_ids), _kv(int8, input_ids))):
        for name, a, b in (("K", k_ref, k), ("V", v_ref, v)):
            rel, cos = _agreement(a, b)
            # Measured here (float16 compute): relative error 0.0085-0.0102, mean cosine >= 0.99995.
            assert rel < 0.015 and cos > 0.9999, f"layer {layer} {name}: rel {rel:.4f} cos {cos:.4f}"
    assert describe_model(int8, source)["quantization"] == "int8"


def test_real_stories260k_by_path_greedy_decodes(assets):
    path = assets("models/stories260K_hf_derived")
    source = resolve_teacher(str(path))
    assert (source.is_local, source.model_id, source.quantization, source.dtype) == (True, str(path), "none", "auto")
    model, tokenizer = load_pretrained(source)
    assert tokenizer.is_fast

    out = model.generate(torch.tensor([[1]]), max_new_tokens=40, do_sample=False)
    text = tokenizer.decode(out[0])
    # The reference decode from the assets README.
    assert text.startswith("<s> Once upon a time, there was a little girl named Lily. She loved to play outside")

    meta = describe_model(model, source)
    assert meta["architecture"] == "LlamaForCausalLM"
    assert (meta["num_layers"], meta["num_attention_heads"], meta["num_kv_heads"], meta["head_dim"]) == (5, 8, 4, 8)
    assert (meta["dtype"], meta["num_params"], meta["revision"]) == ("float32", 260032, None)
