"""Encoder and encoder-decoder teachers: capture of each attention part (kava.extract.parts) against what the models
compute themselves, the store's attention kinds and positions, and ``kava extract`` end to end on a tiny BERT and T5.

Tiny seeded models built from configs, saved and loaded back through ``from_pretrained``. Oracles for the capture:
K/V recomputed from each attention module's own projections of its own inputs (forward pre-hooks), and the module's
own output recomputed from the captured Q/K/V (plus T5's relative bias and the decoder's causal mask).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers
from click.testing import CliRunner

from kava.core.errors import ConfigError, ShapeError
from kava.extract.parts import capture_parts, teacher_family, teacher_parts
from kava.kvstore import SchemaError, TeacherSpec
from kava.kvstore.manifest import proportional_layer_map
from kava.pipelines.cli import main

ONE_TORCH_THREAD = True
SEED = 0
VOCAB = 100
TOL = 1e-5

# name -> (config class, model class saved, kwargs). Each exercises one positional scheme or attention layout.
TINY = {
    # absolute learned positions
    "bert": ("BertConfig", "BertForMaskedLM", dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2,
                                                   num_attention_heads=4, intermediate_size=64,
                                                   max_position_embeddings=64)),
    # absolute positions offset by the padding index
    "roberta": ("RobertaConfig", "RobertaForMaskedLM", dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2,
                                                            num_attention_heads=4, intermediate_size=64,
                                                            max_position_embeddings=70, pad_token_id=1)),
    # rotary per layer type (global and local attention), fused Wqkv
    "modernbert": ("ModernBertConfig", "ModernBertForMaskedLM", dict(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=64,
        max_position_embeddings=64, global_attn_every_n_layers=2, local_attention=64, pad_token_id=0,
        bos_token_id=1, eos_token_id=2, cls_token_id=1, sep_token_id=2)),
    # relative position bias, head_dim (d_kv 8) set apart from d_model / heads, more decoder than encoder layers
    "t5": ("T5Config", "T5ForConditionalGeneration", dict(vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=64, num_layers=2,
                                                          num_decoder_layers=3, num_heads=4,
                                                          decoder_start_token_id=0, pad_token_id=0)),
    # absolute positions on both sides, a scaled query
    "bart": ("BartConfig", "BartForConditionalGeneration", dict(
        vocab_size=VOCAB, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
        decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=64)),
}
POSITIONS = {"bert": "absolute", "roberta": "absolute", "modernbert": "rope", "t5": "relative-bias",
             "bart": "absolute"}


def build(name: str, directory: Path, **overrides) -> Path:
    config_cls, model_cls, kwargs = TINY[name]
    torch.manual_seed(SEED)
    config = getattr(transformers, config_cls)(**{**kwargs, **overrides})
    getattr(transformers, model_cls)(config).save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """name -> the base model (``AutoModel``) loaded back from its saved directory, in eval mode on sdpa."""
    root = tmp_path_factory.mktemp("cross_arch")
    return {name: transformers.AutoModel.from_pretrained(build(name, root / name), attn_implementation="sdpa").eval()
            for name in TINY}


# ---------------------------------------------------------------------------------------------------------------------
# The naive reference: each attention module's own projections of its own inputs, and its own output.


def _projections(module, x, src, kwargs):
    """(K, V) ``[B, H, T, D]`` from the module's weights, as its forward computes them (before attending)."""
    b, t = src.shape[:2]
    if hasattr(module, "Wqkv"):  # ModernBERT: fused, then rotated with the cos/sin the layer was handed
        qkv = module.Wqkv(x).view(b, t, 3, -1, module.head_dim)
        q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))
        cos, sin = kwargs["position_embeddings"]
        rotate = sys.modules[type(module).__module__].apply_rotary_pos_emb
        _, k = rotate(q, k, cos, sin, unsqueeze_dim=1)
        return k, v
    k_proj, v_proj = next((getattr(module, k), getattr(module, v)) for k, v in
                          (("key", "value"), ("k", "v"), ("k_proj", "v_proj")) if hasattr(module, k))
    return (p(src).view(b, t, -1, k_proj.out_features // module_heads(module)).transpose(1, 2)
            for p in (k_proj, v_proj))


def module_heads(module) -> int:
    for name in ("num_attention_heads", "n_heads", "num_heads"):
        if hasattr(module, name):
            return int(getattr(module, name))
    return int(module.config.num_attention_heads)


def _out_proj(module):
    for name in ("o", "out_proj", "Wo"):
        if hasattr(module, name):
            return getattr(module, name)
    return lambda x: x  # BERT's self-attention returns the context; its output dense sits in the next module


class Reference:
    """Forward hooks recording, per attention module, its inputs and outputs in one forward."""

    def __init__(self, model):
        self.seen: dict[str, dict] = {}
        self.handles = []
        for name, module in model.named_modules():
            if isinstance(getattr(module, "layer_idx", None), int) and not hasattr(module, "attn"):  # not a block
                self.handles.append(module.register_forward_pre_hook(self._pre(name), with_kwargs=True))
                self.handles.append(module.register_forward_hook(self._post(name)))

    def _pre(self, name):
        def hook(module, args, kwargs):
            x = args[0] if args else kwargs["hidden_states"]
            src = kwargs.get("key_value_states")
            k, v = _projections(module, x, x if src is None else src, kwargs)
            self.seen[name] = {"module": module, "k": k.detach(), "v": v.detach()}
        return hook

    def _post(self, name):
        def hook(module, args, output):
            self.seen[name]["out"] = output[0].detach()
        return hook

    def close(self):
        for h in self.handles:
            h.remove()


def _part_of(name: str, family: str) -> tuple[str, int]:
    path = name.split(".")
    layer = next(int(p) for p in path if p.isdigit())
    if family == "encoder" or "decoder" not in path:
        return "enc", layer
    return ("cross" if {"EncDecAttention", "encoder_attn"} & set(path) else "dec"), layer


def _attend(q, k, v, scaling, *, causal: bool, bias=None):
    """Eager attention ``[B, H, Tq, D]`` → ``[B, Tq, H·D]``, with GQA heads repeated."""
    k = k.repeat_interleave(q.shape[1] // k.shape[1], 1)
    v = v.repeat_interleave(q.shape[1] // v.shape[1], 1)
    scores = q @ k.transpose(-1, -2) * scaling
    if bias is not None:
        scores = scores + bias
    if causal:
        scores = scores.masked_fill(torch.ones_like(scores, dtype=torch.bool).triu(1), float("-inf"))
    out = scores.softmax(-1) @ v
    return out.transpose(1, 2).reshape(q.shape[0], q.shape[2], -1)


def _t5_bias(model, part: str, tq: int, tk: int):
    stack = model.encoder if part == "enc" else model.decoder
    return stack.block[0].layer[0].SelfAttention.compute_bias(tq, tk)


ERRORS: dict[str, float] = {}


@pytest.mark.parametrize("name", list(TINY))
def test_capture_matches_each_modules_own_computation(models, name):
    model = models[name]
    family = teacher_family(model.config)
    parts = {p.part: p for p in teacher_parts(model.config)}
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, VOCAB, (2, 9), generator=g)
    dec = torch.cat([torch.zeros(2, 1, dtype=torch.long), torch.randint(3, VOCAB, (2, 6), generator=g)], 1)
    ref = Reference(model)
    try:
        with torch.no_grad():
            cap = capture_parts(model, ids, decoder_input_ids=dec if family == "encoder-decoder" else None,
                                with_q={p: range(parts[p].num_layers) for p in parts})
    finally:
        ref.close()
    assert set(cap) == set(parts) == ({"enc"} if family == "encoder" else {"enc", "dec", "cross"})
    covered = set()
    worst = 0.0
    for module_name, seen in ref.seen.items():
        part, layer = _part_of(module_name, family)
        c = cap[part]
        k, v, q = c.keys[layer], c.values[layer], c.queries[layer]
        steps = dec.shape[1] if part == "dec" else ids.shape[1]
        assert k.shape == (2, parts[part].kv_heads, steps, parts[part].head_dim)
        # 1. K/V are the module's own projections of its own inputs.
        worst = max(worst, (k - seen["k"]).abs().max().item(), (v - seen["v"]).abs().max().item())
        # 2. Attending with the captured Q/K/V (and scale) reproduces the module's output.
        bias = None
        if name == "t5" and part != "cross":
            bias = _t5_bias(model, part, q.shape[2], k.shape[2])
        out = _out_proj(seen["module"])(_attend(q, k, v, c.scaling[layer], causal=part == "dec", bias=bias))
        worst = max(worst, (out - seen["out"]).abs().max().item())
        covered.add((part, layer))
    assert covered == {(p, i) for p, part in parts.items() for i in range(part.num_layers)}
    ERRORS[name] = worst
    print(f"capture error vs reference, {name}: {worst:.2e}")
    assert worst < TOL


def test_parts_and_positions_per_architecture(models):
    for name, model in models.items():
        parts = teacher_parts(model.config)
        assert {p.part: p.attention for p in parts} == (
            {"enc": "bidirectional"} if name in ("bert", "roberta", "modernbert")
            else {"enc": "bidirectional", "dec": "causal", "cross": "cross"}), name
        assert [p.positions for p in parts if p.part != "cross"] == [POSITIONS[name]] * (len(parts) - (len(parts) > 1))
    t5 = {p.part: p for p in teacher_parts(models["t5"].config)}
    assert (t5["enc"].num_layers, t5["dec"].num_layers, t5["cross"].num_layers, t5["dec"].head_dim) == (2, 3, 3, 8)
    assert t5["cross"].positions == "none" and t5["cross"].reads == "prompt" and t5["dec"].reads == "continuation"
    assert teacher_family(transformers.GPT2Config()) == "decoder"
    with pytest.raises(ConfigError, match="Got GPT2Config, a decoder"):
        teacher_parts(transformers.GPT2Config())


def test_padding_leaves_each_rows_tokens_as_alone(models):
    """Right padding on both sides of T5: each row's valid K/V equal that row run alone."""
    model = models["t5"]
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(3, VOCAB, (2, 7), generator=g)
    dec = torch.cat([torch.zeros(2, 1, dtype=torch.long), torch.randint(3, VOCAB, (2, 5), generator=g)], 1)
    mask = torch.tensor([[1] * 7, [1] * 4 + [0] * 3])
    dmask = torch.tensor([[1] * 6, [1] * 3 + [0] * 3])
    both = capture_parts(model, ids, mask, decoder_input_ids=dec, decoder_attention_mask=dmask)
    alone = capture_parts(model, ids[1:, :4], decoder_input_ids=dec[1:, :3])
    assert both["enc"].lengths.tolist() == [7, 4] and both["dec"].lengths.tolist() == [6, 3]
    for part, n in (("enc", 4), ("dec", 3), ("cross", 4)):
        for layer, k in alone[part].keys.items():
            torch.testing.assert_close(both[part].keys[layer][1:, :, :n], k, atol=TOL, rtol=0)
            torch.testing.assert_close(both[part].values[layer][1:, :, :n], alone[part].values[layer], atol=TOL,
                                       rtol=0)


def test_capture_refuses_bad_input(models):
    ids = torch.randint(3, VOCAB, (1, 5))
    with pytest.raises(ShapeError, match="Expected decoder_input_ids for an encoder-decoder"):
        capture_parts(models["t5"], ids)
    with pytest.raises(ShapeError, match="Expected no decoder_input_ids for the encoder BertModel"):
        capture_parts(models["bert"], ids, decoder_input_ids=ids)
    with pytest.raises(ConfigError, match=r"Expected parts among \['cross', 'dec', 'enc'\]. Got \['decoder'\]"):
        capture_parts(models["t5"], ids, decoder_input_ids=ids, layers={"decoder": [0]})
    with pytest.raises(ConfigError, match=r"dec layers indices in \[0, 3\)"):
        capture_parts(models["t5"], ids, decoder_input_ids=ids, layers={"dec": [3]})
    # The model is left on its own attention afterwards, also after an error.
    assert models["t5"].config._attn_implementation == "sdpa"


# ---------------------------------------------------------------------------------------------------------------------
# The store: attention kind, positions and parts in the teacher spec


def spec(**fields) -> TeacherSpec:
    base = dict(name="t", model={}, num_layers=2, layers=(0, 1), num_heads=4, kv_heads=4, head_dim=8,
                layer_map=proportional_layer_map(2, 2))
    return TeacherSpec(**{**base, **fields})


def test_spec_without_the_fields_reads_as_a_decoder_and_writes_them_only_when_they_differ():
    rope = {"type": "default", "theta": 10000.0}
    for old, positions in ((spec(), "absolute"), (spec(rope=rope), "rope")):
        doc = old.to_dict()
        assert not {"attention", "positions", "part_of"} & set(doc)  # a decoder's spec is what it always was
        back = TeacherSpec.from_dict(doc)
        assert (back.attention, back.positions, back.part_of) == ("causal", positions, None)
        assert back == old
    cross = spec(name="t5.cross", attention="cross", positions="none", part_of="t5")
    doc = cross.to_dict()
    assert (doc["attention"], doc["positions"], doc["part_of"]) == ("cross", "none", "t5")
    assert TeacherSpec.from_dict(doc) == cross
    assert "positions" not in spec(attention="bidirectional").to_dict()  # absolute: the default without rope


def test_spec_refuses_unknown_or_inconsistent_kinds():
    with pytest.raises(SchemaError, match="attention: expected one of causal, bidirectional, cross. Got 'encoder'"):
        spec(attention="encoder")
    with pytest.raises(SchemaError, match="positions: expected one of rope, absolute, relative-bias, none"):
        spec(positions="alibi")
    with pytest.raises(SchemaError, match="positions: expected 'rope' exactly when the spec has rope parameters"):
        spec(positions="rope")
    with pytest.raises(SchemaError, match="part_of: expected the encoder-decoder a cross-attention teacher"):
        spec(attention="cross", positions="none")
    doc = {**spec().to_dict(), "attention": "sideways"}
    with pytest.raises(SchemaError, match="attention"):
        TeacherSpec.from_dict(doc)


# ---------------------------------------------------------------------------------------------------------------------
# Extraction: a tiny BERT and a tiny T5 on a Llama-2 student's grid (GPT-2 tokenizer: the cross-tokenizer alignment)

LIMIT = 6


@pytest.fixture(scope="module")
def teachers(tmp_path_factory):
    """name -> directory of a tiny BERT / T5 saved with the GPT-2 tokenizer."""
    from helpers import asset_path

    tok = transformers.AutoTokenizer.from_pretrained(asset_path("tokenizers/gpt2"))
    root = tmp_path_factory.mktemp("teachers")
    out = {}
    for name, overrides in (("bert", dict(vocab_size=len(tok), max_position_embeddings=512)),
                            ("t5", dict(vocab_size=len(tok)))):
        out[name] = build(name, root / name, **overrides)
        tok.save_pretrained(out[name])
    return out


def _extract(teacher: Path, store: Path):
    from helpers import asset_path

    from kava.extract.config import ExtractConfig
    from kava.extract.recipe import run_extract

    cfg = ExtractConfig.from_dict(dict(teacher=str(teacher), store=str(store), limit=LIMIT, progress=False,
                                       student_tokenizer=str(asset_path("tokenizers/llama2")), student_layers=2,
                                       shard_tokens=512, batch_size=4))
    return run_extract(cfg, log=lambda _: None)


@pytest.fixture(scope="module")
def bert_store(teachers, tmp_path_factory):
    path = tmp_path_factory.mktemp("stores") / "kv.zarr"
    _extract(teachers["bert"], path)
    return path


def _grid():
    from helpers import asset_path

    from kava.extract.config import ExtractConfig
    from kava.extract.grid import build_grid
    from kava.extract.templates import load_template

    tok = transformers.AutoTokenizer.from_pretrained(asset_path("tokenizers/llama2"))
    rows = ExtractConfig.from_dict(dict(teacher="x", store="y", limit=LIMIT)).data.load()
    return build_grid(rows, tok, load_template("plain"), max_length=1024, on_too_long="truncate")


def _expected(model, tok, sample, text: str, offset: int, part: str, layers, *, decoder_text: str | None = None):
    """A part's K/V rows on the student's tokens, from a capture of this sample alone."""
    from kava.extract.align import align_tokens, apply, token_spans

    ids, spans = token_spans(tok, text)
    dec = None
    if decoder_text is not None:
        d_ids, d_spans = token_spans(tok, decoder_text, add_special_tokens=False)
        dec = torch.as_tensor(np.concatenate([[0], d_ids]))[None]
    cap = capture_parts(model, torch.as_tensor(ids)[None], decoder_input_ids=dec)[part]
    if part == "dec":
        spans = np.concatenate([np.zeros((1, 2), np.int64), d_spans]) + offset
    k = torch.stack([cap.keys[i][0] for i in layers], 0).permute(2, 0, 1, 3)  # [T_t, L, H, D]
    al = align_tokens(sample.spans, spans)
    return apply(al, k).numpy(), al.coverage


def test_encoder_rows_are_its_capture_aligned_onto_the_students_tokens(bert_store, teachers):
    from kava.kvstore import KVStore

    store = KVStore.open(bert_store)
    spec_ = store.teachers["bert"]
    assert (spec_.attention, spec_.positions, spec_.part_of, spec_.alignment["reads"]) == (
        "bidirectional", "absolute", None, "all")
    model = transformers.AutoModel.from_pretrained(teachers["bert"]).eval()
    tok = transformers.AutoTokenizer.from_pretrained(teachers["bert"])
    sample = _grid()[LIMIT - 1]
    got = store.read_sample(LIMIT - 1).teachers["bert"]
    k, coverage = _expected(model, tok, sample, sample.text, 0, "enc", spec_.layers)
    np.testing.assert_allclose(got.k, k, rtol=2 ** -10, atol=1e-4)  # float16 storage
    np.testing.assert_allclose(got.align_weight, coverage, atol=1e-6)
    assert (got.align_weight[:-1] > 0).all() and got.align_weight[-1] == 0  # every token read but the grid's EOS


def test_unsupported_options_are_refused_before_anything_is_written(teachers, tmp_path):
    from kava.extract.config import ExtractConfig
    from kava.extract.recipe import run_extract

    cfg = ExtractConfig.from_dict(dict(teacher=str(teachers["t5"]), store=str(tmp_path / "kv.zarr"), limit=2,
                                       teacher_generates=True, logit_top_k=4, progress=False))
    with pytest.raises(ConfigError, match=r"(?s)--teacher-generates: not supported for an encoder-decoder teacher"
                                          r".*--logit-top-k: not supported"):
        run_extract(cfg, log=lambda _: None)
    assert not (tmp_path / "kv.zarr").exists()


@pytest.mark.integration
def test_kava_extract_an_encoder_decoder_end_to_end(bert_store, teachers, tmp_path):
    """`kava extract` adds a T5's three parts beside the BERT; `kava store verify` accepts the store and
    `kava store info` lists every part."""
    import shutil

    from helpers import ENV, KAVA, asset_path

    from kava.kvstore import KVStore

    path = tmp_path / "kv.zarr"
    shutil.copytree(bert_store, path)

    def kava(*args):
        out = subprocess.run([*KAVA, *args], capture_output=True, text=True, env=ENV, timeout=240)
        assert out.returncode == 0, out.stderr
        return out

    out = kava("extract", "--teacher", str(teachers["t5"]), "--store", str(path), "--limit", str(LIMIT),
               "--student-tokenizer", str(asset_path("tokenizers/llama2")), "--student-layers", "2",
               "--shard-tokens", "512", "--batch-size", "4", "--no-progress", "--threads", "1")
    assert "t5.enc (bidirectional, relative-bias" in out.stderr and "t5.cross (cross, none" in out.stderr
    assert "wrote 2 shard(s), 6 samples" in out.stderr
    # The store commands in this process (their own subprocess tests live in test_cli.py).
    verified = CliRunner().invoke(main, ["store", "verify", str(path)], catch_exceptions=False)
    assert verified.exit_code == 0, verified.output
    info = json.loads(CliRunner().invoke(main, ["store", "info", str(path), "--json"], catch_exceptions=False).stdout)
    assert set(info["teachers"]) == {"bert", "t5.enc", "t5.dec", "t5.cross"}
    assert all(t["shards_complete"] == 2 for t in info["teachers"].values())
    assert (info["teachers"]["t5.cross"]["attention"], info["teachers"]["t5.cross"]["part_of"]) == ("cross", "t5")
    shown = CliRunner().invoke(main, ["store", "info", str(path)], catch_exceptions=False).stdout
    assert "  attention bidirectional, positions relative-bias, part of t5" in shown
    assert "  attention bidirectional, positions absolute\n" in shown  # bert

    store = KVStore.open(path)
    kinds = {n: (s.attention, s.positions, s.part_of, s.num_layers, s.alignment["reads"])
             for n, s in store.teachers.items()}
    assert kinds == {"bert": ("bidirectional", "absolute", None, 2, "all"),
                     "t5.enc": ("bidirectional", "relative-bias", "t5", 2, "prompt"),
                     "t5.dec": ("causal", "relative-bias", "t5", 3, "continuation"),
                     "t5.cross": ("cross", "none", "t5", 3, "prompt")}
    # The encoder's and the cross-attention's rows cover the text before the reasoning, the decoder's the rest.
    model = transformers.AutoModel.from_pretrained(teachers["t5"]).eval()
    tok = transformers.AutoTokenizer.from_pretrained(teachers["t5"])
    sample = _grid()[2]
    rows = store.read_sample(2).teachers
    cut = sample.seg_spans["reasoning"][0]
    # A student token may straddle the cut (a word and its leading space): both parts then cover some of it.
    start, end = sample.spans[:, 0], sample.spans[:, 1]
    enc, dec = rows["t5.enc"].align_weight, rows["t5.dec"].align_weight
    np.testing.assert_array_equal(rows["t5.cross"].align_weight, enc)
    assert (enc[(end <= cut) & (end > start)] > 0).all() and not enc[start >= cut].any()
    assert (dec[(start >= cut) & (end > start)] > 0).all() and not dec[end <= cut].any()
    assert dec[-1] == 0  # the grid's EOS
    # Layer x layer CKA across architectures on the tokens both read (the store's CKA, unchanged): BERT x T5 encoder.
    from kava.analysis.cka import store_cka

    cka = store_cka(store, "bert", vs="t5.enc").matrix
    assert cka.shape == (2, 2) and np.isfinite(cka).all() and (cka > 0).all()
    for part, text, offset in (("enc", sample.text[:cut], 0), ("dec", sample.text[:cut], cut),
                               ("cross", sample.text[:cut], 0)):
        k, coverage = _expected(model, tok, sample, text, offset, part, store.teachers[f"t5.{part}"].layers,
                                decoder_text=sample.text[cut:])
        np.testing.assert_allclose(rows[f"t5.{part}"].k, k, rtol=2 ** -10, atol=1e-4, err_msg=part)
        np.testing.assert_allclose(rows[f"t5.{part}"].align_weight, coverage, atol=1e-6, err_msg=part)


# ---------------------------------------------------------------------------------------------------------------------
# Z-space projectors


def _zspace_inputs(seed: int = 0):
    """A student (4 layers, 2 heads x 8) and three teachers of other layouts on the same 12 tokens, 2 groups."""
    from kava.distill.zspace import ZSpace, group_features, group_widths, layer_groups

    g = torch.Generator().manual_seed(seed)
    layouts = {"student": (4, 2, 8), "gpt": (6, 4, 4), "bert": (2, 4, 8), "t5.enc": (3, 2, 16)}
    torch.manual_seed(seed)
    space = ZSpace({n: group_widths(*lay, groups=2) for n, lay in layouts.items()}, 16)
    features = {n: {side: group_features(torch.randn(12, lay[0], lay[1], lay[2], generator=g),
                                         layer_groups(lay[0], 2)) for side in ("k", "v")}
                for n, lay in layouts.items()}
    weights = {"gpt": torch.ones(12), "bert": torch.ones(12),
               "t5.enc": torch.cat([torch.ones(5), torch.zeros(7)])}  # an encoder part: the prompt's tokens only
    return space, features, weights


def test_zspace_shapes_groups_and_gradients_to_both_sides():
    from kava.distill.zspace import group_widths, layer_groups, zspace_losses

    assert layer_groups(5, 2) == [(0, 1, 2), (3, 4)] and layer_groups(3, 3) == [(0,), (1,), (2,)]
    assert group_widths(6, 4, 4, 2) == (48, 48)
    with pytest.raises(ConfigError, match=r"Z-space group count in \[1, 2\]"):
        layer_groups(2, 3)
    space, features, weights = _zspace_inputs()
    student_k = features["student"]["k"][0].requires_grad_(True)
    assert space.project("t5.enc", "k", 1, features["t5.enc"]["k"][1]).shape == (12, 16)
    with pytest.raises(ShapeError, match=r"Expected bert group 0 features \[N, 32\]"):
        space.project("bert", "k", 0, features["gpt"]["k"][0])
    out = zspace_losses(space, "student", features, weights)
    assert out.kv.ndim == 0 and set(out.per_teacher) == {"gpt", "bert", "t5.enc"}
    assert 0 < out.kv.item() < 2 and 0 < out.agreement.item() <= 1
    (out.kv + out.agreement).backward()
    assert student_k.grad is not None and student_k.grad.abs().sum() > 0  # into the student's K
    for name in ("student", "gpt", "bert", "t5.enc"):  # and into every model's projectors
        for side in ("k", "v"):
            for linear in space.maps[space._key(name)][side]:
                assert linear.weight.grad is not None and linear.weight.grad.abs().sum() > 0, (name, side)


def test_zspace_agreement_is_zero_for_identical_projections_and_positive_otherwise():
    from kava.distill.zspace import ZSpace, linear_cka, zspace_losses

    x = torch.randn(20, 8)
    assert abs(linear_cka(x, x).item() - 1) < 1e-6
    assert abs(linear_cka(x, 3 * x @ torch.linalg.qr(torch.randn(8, 8))[0]).item() - 1) < 1e-5  # rotation, scale
    assert linear_cka(x, torch.ones(20, 8)).item() == 0  # a collapsed projection agrees with nothing
    space = ZSpace({"s": (8,), "a": (8,), "b": (8,)}, 4)
    with torch.no_grad():
        for side in ("k", "v"):
            space.maps["b"][side][0].weight.copy_(space.maps["a"][side][0].weight)
    same = {n: {side: [x if n != "s" else torch.randn(20, 8)] for side in ("k", "v")} for n in "sab"}
    w = {"a": torch.ones(20), "b": torch.ones(20)}
    assert zspace_losses(space, "s", same, w).agreement.abs().item() < 1e-6
    other = {**same, "b": {side: [torch.randn(20, 8)] for side in ("k", "v")}}
    assert zspace_losses(space, "s", other, w).agreement.item() > 0.05
    # The K/V term is zero where the student's projection is the teacher's, and ignores tokens of weight 0.
    student = {"s": {side: [x] for side in ("k", "v")}}
    with torch.no_grad():
        for side in ("k", "v"):
            space.maps["s"][side][0].weight.copy_(space.maps["a"][side][0].weight)
    off = {"a": {side: [torch.cat([x[:10, :8], torch.randn(10, 8)])] for side in ("k", "v")}}
    losses = zspace_losses(space, "s", {**student, **off}, {"a": torch.cat([torch.ones(10), torch.zeros(10)])})
    assert losses.kv.abs().item() < 1e-6 and losses.agreement.item() == 0  # one teacher: nothing to agree with
    with pytest.raises(ConfigError, match=r"Expected an align_weight for every teacher. Got none for \['a'\]"):
        zspace_losses(space, "s", {**student, **off}, {})
