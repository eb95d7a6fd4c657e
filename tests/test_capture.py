"""Capture of per-layer Q/K/V (kava.extract.capture) against what the models themselves compute.

Tiny seeded models built from configs, saved and loaded back through ``from_pretrained`` (the path users take),
plus the real pretrained stories260K Llama. Oracles: the eager attention probabilities (``output_attentions``),
the KV cache of a normal forward, and each sample run alone (padding).
"""

from __future__ import annotations

import importlib
import json
import sys

import pytest
import torch
import transformers
from transformers import AutoModelForCausalLM

from kava.core.errors import ConfigError, KavaError, ShapeError
from kava.extract.capture import QKVCapture, attention_capture, attention_geometry, capture_qkv
from kava.extract.rope import apply_rope, invert_rope, rope_params

SEED = 0
VOCAB = 128
SMALL = dict(vocab_size=VOCAB, bos_token_id=1, eos_token_id=2, pad_token_id=0, max_position_embeddings=64)
LLAMA_LIKE = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, **SMALL)

# name -> (config class, kwargs). Each one exercises something the capture must get right.
TINY = {
    "llama": ("LlamaConfig", dict(num_attention_heads=4, num_key_value_heads=4, **LLAMA_LIKE)),
    # GQA, q/k/v biases
    "qwen2": ("Qwen2Config", dict(num_attention_heads=4, num_key_value_heads=2, **LLAMA_LIKE)),
    # q/k RMSNorm before RoPE; head_dim (16) != hidden_size / heads (8)
    "qwen3": ("Qwen3Config", dict(num_attention_heads=4, num_key_value_heads=2, head_dim=16, **LLAMA_LIKE)),
    # MQA and a sliding window shorter than the sequence (mask must reach the wrapped sdpa)
    "mistral": ("MistralConfig", dict(num_attention_heads=4, num_key_value_heads=1, sliding_window=4, **LLAMA_LIKE)),
    # no RoPE, fused c_attn, Conv1D; three layers
    "gpt2": ("GPT2Config", dict(n_layer=3, n_head=4, n_embd=32, n_positions=64, vocab_size=VOCAB, bos_token_id=1,
                                eos_token_id=2)),
    # per-layer softmax scale (1/sqrt(d)/(layer+1)); on eager, GPT-2 attends through its own fp32 upcast path
    "gpt2-upcast": ("GPT2Config", dict(n_layer=2, n_head=4, n_embd=32, n_positions=64, vocab_size=VOCAB,
                                       bos_token_id=1, eos_token_id=2, scale_attn_by_inverse_layer_idx=True,
                                       reorder_and_upcast_attn=True)),
    # partial rotary: only the first half of each head rotates
    "phi": ("PhiConfig", dict(num_attention_heads=4, num_key_value_heads=4, partial_rotary_factor=0.5, **LLAMA_LIKE)),
    # YaRN folds an attention factor != 1 into cos/sin: the inverse must divide it out
    "llama-yarn": ("LlamaConfig", dict(
        num_attention_heads=4, num_key_value_heads=2,
        rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                         "original_max_position_embeddings": 16},
        **LLAMA_LIKE)),
}
ARCHS = [*TINY, "stories260K"]


@pytest.fixture(scope="module")
def saved_models(tmp_path_factory):
    """name -> directory of the saved tiny model; built once per module with a fixed seed."""
    paths = {}
    for name, (config_cls, kwargs) in TINY.items():
        config = getattr(transformers, config_cls)(**kwargs)
        torch.manual_seed(SEED)
        model = AutoModelForCausalLM.from_config(config)
        path = tmp_path_factory.mktemp(name)
        model.save_pretrained(path)
        paths[name] = path
    return paths


@pytest.fixture(scope="module")
def load(saved_models):
    """``load(name, attn="sdpa")`` → eval-mode model, cached per module (tests must not mutate it)."""
    cache = {}

    def _load(name, attn="sdpa", path=None):
        key = (name, attn)
        if key not in cache:
            model = AutoModelForCausalLM.from_pretrained(path or saved_models[name], attn_implementation=attn)
            cache[key] = model.eval()
        return cache[key]

    return _load


@pytest.fixture
def model_for(load, assets):
    """``model_for(arch, attn)``: a tiny model, or the real stories260K through the assets fixture."""

    def _model(arch, attn="sdpa"):
        if arch == "stories260K":
            return load(arch, attn, path=assets("models/stories260K_hf_derived"))
        return load(arch, attn)

    return _model


def batch(model, lengths=(7, 4), seed=1):
    """Right-padded ``input_ids, attention_mask`` ``[B, T]`` with T = max(lengths); pads are token 0."""
    gen = torch.Generator().manual_seed(seed)
    vocab = model.config.vocab_size
    steps = max(lengths)
    ids = torch.randint(3, vocab, (len(lengths), steps), generator=gen)
    mask = (torch.arange(steps)[None, :] < torch.tensor(lengths)[:, None]).long()
    return ids * mask, mask


def modeling_module(model):
    return sys.modules[type(model).__module__]


def cos_sin(model, steps):
    """cos/sin ``[1, T, R]`` from the model's own rotary module at positions 0..T-1."""
    x = torch.zeros(1, dtype=model.dtype)  # the rotary module casts cos/sin to this tensor's dtype
    return model.base_model.rotary_emb(x, torch.arange(steps)[None, :])


def rerotate_like_model(model, pre, cos, sin):
    """Rotate pre-RoPE ``[B, H, T, D]`` with the modeling file's own apply_rotary_pos_emb (first R channels)."""
    rotary_dim = cos.shape[-1]
    rot, rest = pre[..., :rotary_dim], pre[..., rotary_dim:]
    _, rotated = modeling_module(model).apply_rotary_pos_emb(rot, rot, cos, sin)
    return torch.cat((rotated, rest), dim=-1)


@pytest.mark.parametrize("arch", ARCHS)
def test_attention_probabilities_match_eager_oracle(arch, model_for):
    model, eager = model_for(arch), model_for(arch, "eager")
    ids, mask = batch(model)
    cap = capture_qkv(model, ids, mask, with_q=True, k_rope="post")
    with torch.no_grad():
        oracle = eager(ids, attention_mask=mask, output_attentions=True).attentions  # per layer [B, H, T, T]

    steps = ids.shape[1]
    i = torch.arange(steps)[:, None]
    j = torch.arange(steps)[None, :]
    allowed = (j <= i)[None] & mask.bool()[:, None, :]  # [B, T, T]: causal and key not padding
    window = getattr(model.config, "sliding_window", None)
    if window is not None:
        allowed &= (j > i - window)[None]
    for layer, k in cap.keys.items():
        q = cap.queries[layer]  # [B, H, T, D]
        k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)  # GQA: kv head h serves query heads h*g..h*g+g-1
        scores = (q @ k.transpose(-1, -2)) * cap.scaling[layer]
        probs = scores.masked_fill(~allowed[:, None], float("-inf")).softmax(dim=-1)
        for b, n in enumerate(cap.lengths.tolist()):  # only valid rows and columns
            torch.testing.assert_close(probs[b, :, :n, :n], oracle[layer][b, :, :n, :n], atol=1e-4, rtol=0)


@pytest.mark.parametrize("arch", ARCHS)
def test_pre_rope_keys_rerotate_to_cache_keys(arch, model_for):
    model = model_for(arch)
    ids, mask = batch(model)
    pre = capture_qkv(model, ids, mask)
    post = capture_qkv(model, ids, mask, k_rope="post")
    with torch.no_grad():
        cache = model(ids, attention_mask=mask, use_cache=True).cache
    assert pre.k_rope == "pre" and post.k_rope == "post"
    assert sorted(pre.keys) == list(range(attention_geometry(model.config)[0]))
    has_rope = pre.rope is not None
    if has_rope:
        cos, sin = cos_sin(model, ids.shape[1])
    for layer in pre.keys:
        cached_k, cached_v = cache.layers[layer].keys, cache.layers[layer].values
        # A sliding-window cache (Mistral here) keeps only its last window - 1 positions; capture keeps all T.
        kept = cached_k.shape[2]
        assert kept == ids.shape[1] or kept == model.config.sliding_window - 1
        torch.testing.assert_close(post.keys[layer][:, :, -kept:], cached_k, atol=1e-5, rtol=0)
        torch.testing.assert_close(pre.values[layer][:, :, -kept:], cached_v, atol=0, rtol=0)
        if has_rope:
            rerotated = rerotate_like_model(model, pre.keys[layer], cos, sin)
            torch.testing.assert_close(rerotated[:, :, -kept:], cached_k, atol=1e-5, rtol=0)
            torch.testing.assert_close(rerotated, post.keys[layer], atol=1e-5, rtol=0)
            assert not torch.allclose(pre.keys[layer], post.keys[layer], atol=1e-3)  # the rotation was undone
        else:
            torch.testing.assert_close(pre.keys[layer], post.keys[layer], atol=0, rtol=0)  # GPT-2: pre is post


@pytest.mark.parametrize("arch", ["llama", "qwen3", "stories260K"])
def test_layer0_pre_rope_keys_are_the_projection(arch, model_for):
    """Independent of any rotation code: layer 0's pre-RoPE K is k_norm(k_proj(input_layernorm(embeddings)))."""
    model = model_for(arch)
    ids, mask = batch(model)
    cap = capture_qkv(model, ids, mask, layers=[0], with_q=True)
    attn = model.model.layers[0].self_attn
    with torch.no_grad():
        h = model.model.layers[0].input_layernorm(model.model.embed_tokens(ids))
        k = attn.k_proj(h).view(*ids.shape, -1, attn.head_dim).transpose(1, 2)
        q = attn.q_proj(h).view(*ids.shape, -1, attn.head_dim).transpose(1, 2)
        if hasattr(attn, "k_norm"):  # Qwen3: the norm sits before RoPE, so pre-RoPE K includes it
            k, q = attn.k_norm(k), attn.q_norm(q)
    torch.testing.assert_close(cap.keys[0], k, atol=1e-5, rtol=0)
    torch.testing.assert_close(cap.queries[0], q, atol=1e-5, rtol=0)


ROPE_ARCHS = [a for a in ARCHS if a not in ("gpt2", "gpt2-upcast")]


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3", "stories260K"])
def test_exposed_rotation_turns_projected_keys_into_the_models_own(arch, model_for):
    """The rotation a capture exposes (what the student's trainer reads to undo RoPE) is the model's: applied to
    layer 0's pre-RoPE K/Q, computed here from the projections without any capture or rotation code, it gives the
    keys of the model's own KV cache and the queries it attended with."""
    model = model_for(arch)
    ids, mask = batch(model)
    cap = capture_qkv(model, ids, mask, layers=[0], with_q=True, k_rope="post", with_rotation=True)
    rotation = cap.rotation
    assert rotation is not None and cap.k_rope == "post"
    assert rotation.rotate is modeling_module(model).rotate_half
    cos, sin = cos_sin(model, ids.shape[1])  # the rotary module called directly, at positions 0..T-1
    torch.testing.assert_close(rotation.cos, cos, atol=0, rtol=0)
    torch.testing.assert_close(rotation.sin, sin, atol=0, rtol=0)
    attn = model.model.layers[0].self_attn
    with torch.no_grad():
        h = model.model.layers[0].input_layernorm(model.model.embed_tokens(ids))
        k = attn.k_proj(h).view(*ids.shape, -1, attn.head_dim).transpose(1, 2)
        q = attn.q_proj(h).view(*ids.shape, -1, attn.head_dim).transpose(1, 2)
        if hasattr(attn, "k_norm"):  # Qwen3: the norm sits before RoPE
            k, q = attn.k_norm(k), attn.q_norm(q)
        cached = model(ids, attention_mask=mask, use_cache=True).cache.layers[0].keys
    torch.testing.assert_close(rotation.apply(k), cached, atol=1e-5, rtol=0)
    torch.testing.assert_close(rotation.apply(k), cap.keys[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(rotation.apply(q), cap.queries[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(rotation.invert(cap.keys[0]), k, atol=1e-5, rtol=0)
    assert not torch.allclose(k, cached, atol=1e-3)  # there was a rotation to reproduce


@pytest.mark.parametrize("arch", ROPE_ARCHS)
def test_exposed_rotation_maps_pre_rope_captures_to_post_rope_ones(arch, model_for):
    """Every layer, partial rotary (Phi) and YaRN's attention factor included: the post-RoPE capture's rotation
    takes the pre-RoPE capture to the post-RoPE one; a post-RoPE capture without with_rotation records none."""
    model = model_for(arch)
    ids, mask = batch(model)
    pre = capture_qkv(model, ids, mask, with_q=True)
    post = capture_qkv(model, ids, mask, with_q=True, k_rope="post", with_rotation=True)
    assert capture_qkv(model, ids, mask, k_rope="post").rotation is None
    assert pre.rotation is not None and post.rotation is not None
    assert model.base_model.rotary_emb._forward_hooks == {}  # the capture's hook is gone again
    for layer in pre.keys:
        torch.testing.assert_close(post.rotation.apply(pre.keys[layer]), post.keys[layer], atol=1e-5, rtol=0)
        torch.testing.assert_close(post.rotation.apply(pre.queries[layer]), post.queries[layer], atol=1e-5, rtol=0)


def test_no_rotation_without_rope(model_for):
    model = model_for("gpt2")
    assert capture_qkv(model, *batch(model), k_rope="post", with_rotation=True).rotation is None


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("arch", ARCHS)
def test_padded_batch_matches_each_sample_alone(arch, attn, model_for):
    model = model_for(arch, attn)
    lengths = (7, 4, 5)
    ids, mask = batch(model, lengths)
    together = capture_qkv(model, ids, mask, with_q=True)
    assert together.lengths.tolist() == list(lengths)
    for b, n in enumerate(lengths):
        alone = capture_qkv(model, ids[b : b + 1, :n], with_q=True)
        for layer in together.keys:
            for name in ("keys", "values", "queries"):
                got = getattr(together, name)[layer][b : b + 1, :, :n]
                # rtol too: the trained stories260K has |k| up to ~40, where fp32 spacing is ~4e-6 and a batched
                # GEMM rounds differently from a single-row one.
                torch.testing.assert_close(got, getattr(alone, name)[layer], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("arch", ["qwen2", "gpt2"])
def test_layer_subset_and_q_selection(arch, model_for):
    model = model_for(arch)
    _, heads, kv_heads, head_dim = attention_geometry(model.config)
    ids, mask = batch(model)
    b, t = ids.shape

    cap = capture_qkv(model, ids, mask, layers=[1])
    assert isinstance(cap, QKVCapture)
    assert list(cap.keys) == list(cap.values) == list(cap.scaling) == [1]
    assert cap.queries == {}
    assert cap.keys[1].shape == cap.values[1].shape == (b, kv_heads, t, head_dim)

    cap = capture_qkv(model, ids, mask, layers=[1, 0], with_q=[1])
    assert list(cap.keys) == [0, 1]
    assert list(cap.queries) == [1]
    assert cap.queries[1].shape == (b, heads, t, head_dim)

    full = capture_qkv(model, ids, mask, with_q=True)
    torch.testing.assert_close(cap.keys[1], full.keys[1], atol=0, rtol=0)


@pytest.mark.parametrize("arch", ["mistral", "gpt2"])
def test_context_manager_leaves_the_forward_unchanged(arch, model_for):
    model = model_for(arch)
    ids, mask = batch(model)
    with torch.no_grad():
        expected = model(ids, attention_mask=mask).logits
        with attention_capture(model, layers=[0]) as recorder:
            got = model(ids, attention_mask=mask, use_cache=False).logits
    assert list(recorder.keys) == [0]
    valid = mask.bool()
    torch.testing.assert_close(got[valid], expected[valid], atol=1e-5, rtol=0)


def test_attention_implementation_restored_even_when_forward_raises(model_for):
    model = model_for("llama")
    before = model.config._attn_implementation
    with pytest.raises(RuntimeError, match="boom"):
        with attention_capture(model):
            assert model.config._attn_implementation != before
            raise RuntimeError("boom")
    assert model.config._attn_implementation == before

    bad_ids = torch.full((1, 3), VOCAB + 5)  # out of the vocabulary: the embedding raises inside the forward
    with pytest.raises(IndexError):
        capture_qkv(model, bad_ids)
    assert model.config._attn_implementation == before
    assert model.base_model.rotary_emb._forward_hooks == {}  # the rotary hook was removed too
    assert sorted(capture_qkv(model, *batch(model)).keys) == [0, 1]  # and a new capture starts clean


def test_rejects_bad_arguments(model_for):
    model = model_for("llama")
    ids, mask = batch(model)
    with pytest.raises(ConfigError, match=r"layers indices in \[0, 2\).*Got \[2\]"):
        capture_qkv(model, ids, mask, layers=[0, 2])
    with pytest.raises(ConfigError, match="layers indices"):
        capture_qkv(model, ids, mask, layers=[-1])
    with pytest.raises(ConfigError, match="distinct"):
        capture_qkv(model, ids, mask, layers=[1, 1])
    with pytest.raises(ConfigError, match="subset of the captured layers"):
        capture_qkv(model, ids, mask, layers=[0], with_q=[1])
    with pytest.raises(ConfigError, match="k_rope to be 'pre' or 'post'"):
        capture_qkv(model, ids, mask, k_rope="before")
    with pytest.raises(ShapeError, match="right-padded"):
        capture_qkv(model, ids, mask.flip(1))
    with pytest.raises(ShapeError, match="same shape as input_ids"):
        capture_qkv(model, ids, mask[:, :3])
    with pytest.raises(ShapeError, match=r"shape \[B, T\]"):
        capture_qkv(model, ids[0], mask[0])
    with pytest.raises(ShapeError, match="at least one token"):
        capture_qkv(model, ids, mask * torch.tensor([[1], [0]]))
    assert model.config._attn_implementation == "sdpa"


def test_rejects_models_it_cannot_capture(model_for, monkeypatch):
    model = model_for("llama")
    ids, mask = batch(model)
    model.train()
    try:
        with pytest.raises(ConfigError, match="eval mode"):
            capture_qkv(model, ids, mask)
    finally:
        model.eval()

    with monkeypatch.context() as m:
        m.setattr(model.config, "_attn_implementation_internal", "flash_attention_2")
        with pytest.raises(ConfigError, match="'sdpa' or 'eager'.*attn_implementation='sdpa'"):
            capture_qkv(model, ids, mask)

    with monkeypatch.context() as m:
        m.setattr(type(model), "_can_set_attn_implementation", classmethod(lambda cls: False))
        with pytest.raises(ConfigError, match="AttentionInterface"):
            capture_qkv(model, ids, mask)

    with attention_capture(model), pytest.raises(KavaError, match="do not nest"):
        with attention_capture(model):
            pass
    assert model.config._attn_implementation == "sdpa"


def test_attention_geometry():
    assert attention_geometry(transformers.GPT2Config(n_layer=3, n_head=4, n_embd=32)) == (3, 4, 4, 8)
    assert attention_geometry(transformers.Qwen3Config(**TINY["qwen3"][1])) == (2, 4, 2, 16)
    assert attention_geometry(transformers.MistralConfig(**TINY["mistral"][1])) == (2, 4, 1, 8)
    with pytest.raises(ConfigError, match="multiple of num_key_value_heads"):
        attention_geometry(transformers.LlamaConfig(num_attention_heads=4, num_key_value_heads=3, **LLAMA_LIKE))


def test_rope_params():
    assert rope_params(transformers.GPT2Config(n_layer=2, n_head=4, n_embd=32)) is None

    llama3 = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
              "high_freq_factor": 4.0, "original_max_position_embeddings": 16}
    params = rope_params(transformers.LlamaConfig(rope_parameters=llama3, **{**LLAMA_LIKE, "num_attention_heads": 4}))
    assert params == {
        "type": "llama3", "theta": 500000.0,
        "scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                    "original_max_position_embeddings": 16},
        "head_dim": 8, "rotary_dim": 8, "partial_rotary_factor": 1.0, "max_position_embeddings": 64,
    }
    assert json.loads(json.dumps(params)) == params  # goes into the store's JSON metadata as is

    phi = rope_params(transformers.PhiConfig(**TINY["phi"][1]))
    assert (phi["type"], phi["head_dim"], phi["rotary_dim"]) == ("default", 8, 4)


def test_invert_rope_is_exact_for_scaled_partial_rotation():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 5, 8, generator=gen)
    angle = torch.rand(1, 5, 2, generator=gen) * 6
    scale = 1.3  # a YaRN-like attention factor folded into cos and sin
    cos = torch.cat((angle.cos(), angle.cos()), -1) * scale  # [1, T, R=4] over head_dim 8
    sin = torch.cat((angle.sin(), angle.sin()), -1) * scale
    y = apply_rope(x, cos, sin)
    torch.testing.assert_close(y[..., 4:], x[..., 4:], atol=0, rtol=0)
    torch.testing.assert_close(invert_rope(y, cos, sin), x, atol=1e-6, rtol=0)
    with pytest.raises(ShapeError, match="floating-point cos/sin"):
        invert_rope(y, cos.long(), sin.long())


def test_modeling_modules_expose_what_capture_relies_on():
    """Capture looks up each modeling file's eager_attention_forward and rotate_half by module; pin that."""
    for arch in ("llama", "qwen2", "qwen3", "mistral", "phi", "gpt2"):
        module = importlib.import_module(f"transformers.models.{arch}.modeling_{arch}")
        assert callable(module.eager_attention_forward)
        if arch != "gpt2":
            assert callable(module.rotate_half)
