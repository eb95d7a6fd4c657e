"""Gradient shares of loss terms against one backward pass per term, the balancing scales, and both in a real
run: measuring leaves training unchanged; --balance gradnorm starts each term at CE's gradient norm."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from torch import nn

from kava.distill.balance import balance_scales, grad_shares, term_grad_norms
from kava.distill.config import DistillConfig
from kava.distill.trainer import run_distill
from kava.extract.config import ExtractConfig
from kava.extract.recipe import run_extract


def test_term_norms_equal_a_separate_backward_per_term():
    torch.manual_seed(0)
    shared, head = nn.Linear(6, 6), nn.Linear(6, 3)  # ``head`` stands for a projector only one term reaches
    x = torch.randn(4, 6)
    h = shared(x)
    terms = {"ce": h.pow(2).mean(), "kv": 5 * head(h).abs().mean()}
    params = list(shared.parameters())
    norms = term_grad_norms(terms, params)
    for name, term in terms.items():
        shared.zero_grad()
        term.backward(retain_graph=True)
        want = torch.sqrt(sum(p.grad.pow(2).sum() for p in params))
        assert norms[name] == pytest.approx(float(want), rel=1e-6)
    # the graph is intact for the step's own backward, and the measurement left no gradient behind
    shared.zero_grad(set_to_none=True)
    term_grad_norms(terms, params)
    assert all(p.grad is None for p in params)
    sum(terms.values()).backward()
    assert all(p.grad is not None for p in params)


def test_shares_and_scales():
    assert grad_shares({"ce": 1.0, "kv": 3.0}) == {"ce": 0.25, "kv": 0.75}
    assert grad_shares({"ce": 0.0}) == {"ce": 0.0}
    assert balance_scales({"ce": 2.0, "kv": 8.0, "logit": 0.5}) == {"ce": 1.0, "kv": 0.25, "logit": 4.0}
    assert balance_scales({"kv": 1.0, "logit": 3.0}) == {"kv": 2.0, "logit": 2 / 3}  # no CE: their mean
    assert balance_scales({"ce": 1.0, "kv": 0.0}) == {"ce": 1.0, "kv": 1.0}
    assert term_grad_norms({"c": torch.tensor(1.0)}, [nn.Parameter(torch.ones(1))]) == {"c": 0.0}


# --- in a real run: a stories260K store with queries and top-4 logits, a tiny-llama student -------------------------

ONE_TORCH_THREAD = True  # see conftest.one_torch_thread
RUN = {"student": "tiny-llama", "batch_size": 4, "progress": False, "checkpoint_every": 0, "steps": 3,
       "loss": "structural", "logit_weight": 0.5}


@pytest.fixture(scope="module")
def store(tmp_path_factory, stories) -> Path:
    path = tmp_path_factory.mktemp("balance") / "kv.zarr"
    run_extract(ExtractConfig.from_dict(dict(teacher=str(stories), store=str(path), limit=24, shard_tokens=1024,
                                             batch_size=8, progress=False, calibration_samples=0, with_q=True,
                                             logit_top_k=4)), log=lambda _: None)
    return path


def _run(out: Path, store: Path, **options) -> list[dict[str, float]]:
    run_distill(DistillConfig.from_dict(dict(out=str(out), store=str(store), **{**RUN, **options})),
                log=lambda _: None)
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_measuring_grad_shares_leaves_training_unchanged(tmp_path, store):
    plain = _run(tmp_path / "plain", store)
    measured = _run(tmp_path / "measured", store, grad_shares_every=2)
    keys = ("loss/ce", "loss/kv", "loss/logit", "loss/total", "grad_norm")
    assert [[m[k] for k in keys] for m in plain] == [[m[k] for k in keys] for m in measured]
    assert not any(k.startswith("grad_share") for k in plain[1])
    step2 = measured[1]
    shares = [step2[f"grad_share/{t}"] for t in ("ce", "kv", "logit")]
    assert sum(shares) == pytest.approx(1.0) and all(0 < s < 1 for s in shares)
    assert all(step2[f"grad_norm/{t}"] > 0 for t in ("ce", "kv", "logit"))
    assert "grad_share/ce" not in measured[0] and "grad_share/ce" not in measured[2]


def test_balance_gradnorm_scales_each_term_to_ces_gradient_norm(tmp_path, store):
    rows = _run(tmp_path / "balanced", store, balance="gradnorm", grad_shares_every=1, checkpoint_every=3)
    first = rows[0]
    assert first["balance/ce"] == 1.0 and "balance/kv" not in rows[1]
    s_kv, s_logit = first["balance/kv"], first["balance/logit"]
    want = first["loss/ce"] + 1.0 * s_kv * first["loss/kv"] + 0.5 * s_logit * first["loss/logit"]
    assert first["loss/total"] == pytest.approx(want, rel=1e-5)
    # weights 1 and 0.5 on equal starting norms: the measured norms on step 1 follow the weights
    assert first["grad_norm/kv"] == pytest.approx(first["grad_norm/ce"], rel=1e-4)
    assert first["grad_norm/logit"] == pytest.approx(0.5 * first["grad_norm/ce"], rel=1e-4)
    checkpoint = next((tmp_path / "balanced" / "checkpoints").glob("step-*"))
    with safe_open(str(checkpoint / "weights.safetensors"), "pt") as f:
        assert "term_scales" in f.keys()
        assert f.get_tensor("term_scales").tolist() == pytest.approx([1.0, s_kv, s_logit], rel=1e-6)
