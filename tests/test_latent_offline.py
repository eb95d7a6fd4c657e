"""The offline teacher of `kava latent --teacher store` and `kava run` with ``kind: latent``.

A CoT teacher (a real tiny Llama saved and loaded through from_pretrained) is extracted by the real `kava extract`
recipe with R-KV at budget M over the rows `--export-rows` writes; the reader's targets are checked against a
naive loop over the store's own dense rows; a run config trains, evaluates and reports students end to end.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from kava.core.errors import BusyError, ConfigError
from kava.core.locks import LOCK_NAME, writer_lock
from kava.core.models import load_fast_tokenizer
from kava.distill.latent.config import LatentConfig
from kava.distill.latent.data import chain_rows, gsm8k_rows
from kava.distill.latent.offline import export_rows, load_store_targets
from kava.distill.latent.train import train_latent
from kava.distill.student import load_student
from kava.extract.config import ExtractConfig
from kava.extract.recipe import run_extract
from kava.extract.templates import SEGMENT_REASONING
from kava.kvstore import KVStore
from kava.pipelines.latent_run import LatentRunner, parse_latent_config

ONE_TORCH_THREAD = True
ROWS, M = 24, 6


@pytest.fixture(scope="module")
def offline(stories, tmp_path_factory):
    """A random tiny Llama on the stories260K tokenizer as the CoT teacher, its rows exported and extracted."""
    root = tmp_path_factory.mktemp("offline")
    student = load_student("tiny-llama", tokenizer=load_fast_tokenizer(str(stories)), seed=0)
    student.inner.save_pretrained(root / "teacher")
    student.tokenizer.save_pretrained(root / "teacher")
    rows = chain_rows(ROWS, steps=3, seed=0, split="train")
    data, template = export_rows(rows, root / "rows")
    run_extract(ExtractConfig.from_dict(dict(
        teacher=str(root / "teacher"), dataset=str(data), store=str(root / "kv.zarr"), student_template=str(template),
        evict="r-kv", kv_budget=str(M), calibration_samples=0, progress=False, threads=1,
    )), log=lambda line: None)
    return root, rows, student


def test_exported_rows_read_back_as_the_same_rows(offline):
    root, rows, _ = offline
    back = gsm8k_rows(root / "rows" / "train.jsonl")
    assert [(r.question, r.cot, r.answer) for r in back] == [(r.question, r.cot, r.answer) for r in rows]


def test_targets_are_the_stores_kept_cot_rows_in_token_order(offline):
    root, rows, student = offline
    targets = load_store_targets(str(root / "kv.zarr"), rows, model_config=student.inner.config,
                                 tokenizer=student.tokenizer, budget=M, kv_rope="pre")
    store = KVStore.open(root / "kv.zarr")
    for sid in store.sample_ids[:5]:
        sample = store.read_sample(sid, dtype=np.float32)
        k, v, mask = sample.teachers["teacher"].dense(sample.offsets)  # [T, L, H, D], [T, L, H]
        i = int(sid.rsplit("/", 1)[-1])
        cot = sample.segment_ids == SEGMENT_REASONING
        n_cot = int(cot.sum())
        for layer in range(k.shape[1]):  # the naive reference: each (layer, head)'s kept CoT tokens, in order
            for head in range(k.shape[2]):
                tokens = np.flatnonzero(cot & mask[:, layer, head])
                assert len(tokens) == min(M, n_cot)
                got_k = targets.keys[i, layer, head, : len(tokens)].numpy()
                np.testing.assert_array_equal(got_k, k[tokens, layer, head])
                np.testing.assert_array_equal(targets.values[i, layer, head, : len(tokens)].numpy(),
                                              v[tokens, layer, head])
        assert targets.valid[i].tolist() == [j < min(M, n_cot) for j in range(M)]
    keys, values, valid = targets.batch([3, 0])
    assert keys.shape == (4, 2, 4, M, 32) and valid.shape == (2, M)
    assert torch.equal(keys[:, 1], targets.keys[0])


def test_a_store_of_other_rows_or_budget_is_refused(offline):
    root, rows, student = offline
    common = dict(model_config=student.inner.config, tokenizer=student.tokenizer, kv_rope="pre")
    with pytest.raises(ConfigError, match=r"--kv-budget 4"):
        load_store_targets(str(root / "kv.zarr"), rows, budget=4, **common)
    with pytest.raises(ConfigError, match=r"--k-rope post"):
        load_store_targets(str(root / "kv.zarr"), rows, budget=M, **{**common, "kv_rope": "post"})
    other = chain_rows(ROWS, steps=3, seed=1, split="train")
    with pytest.raises(ConfigError, match=r"made from other rows"):
        load_store_targets(str(root / "kv.zarr"), other, budget=M, **common)


def test_store_options_are_checked_with_the_others():
    with pytest.raises(ConfigError, match=r"--teacher store: expected --store") as e:
        LatentConfig(out="x", teacher="store", mode="cot").validate()
    assert "only --mode latent" in str(e.value)
    with pytest.raises(ConfigError, match=r"--store and --store-teacher are for --teacher store"):
        LatentConfig(out="x", store="kv.zarr").validate()


def test_a_student_trains_from_the_store(offline, stories, tmp_path):
    root, _, _ = offline
    cfg = LatentConfig(out=str(tmp_path / "s"), student="tiny-llama", tokenizer=str(stories), chain_steps=3,
                       train_size=ROWS, eval_size=4, latent=M, steps=2, batch_size=4, log_every=1,
                       teacher="store", store=str(root / "kv.zarr"), progress=False, threads=1)
    result = train_latent(cfg)
    lines = [json.loads(x) for x in (tmp_path / "s" / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == [0, 1]
    assert all(np.isfinite(x["loss/kv"]) and x["loss/kv"] > 0 for x in lines)
    assert result.eval is not None and result.eval["n"] == 4


def _run_config(tmp_path: Path, stories: str) -> dict:
    return {
        "name": "tiny-latent", "kind": "latent", "out": str(tmp_path), "seeds": [0, 1], "baseline": "direct",
        "contrasts": ["store vs direct"],
        "latent": {"student": "tiny-llama", "tokenizer": str(stories), "chain_steps": 2, "train_size": 16,
                   "eval_size": 6, "latent": 4, "jacobi": 1, "steps": 2, "batch_size": 4, "threads": 1},
        "teacher": {"steps": 2},
        "variants": [{"name": "direct", "mode": "direct"}, {"name": "store", "teacher": "store"}],
    }


def test_a_latent_run_config_is_checked_whole(stories, tmp_path):
    data = _run_config(tmp_path, stories)
    data["variants"] += [{"name": "long", "steps": 9}, {"name": "bad", "jacobi": 0, "out": "elsewhere"}]
    data["contrasts"] = ["store vs nowhere"]
    with pytest.raises(ConfigError) as e:
        parse_latent_config(data, source="c.yaml")
    text = str(e.value)
    assert "variant 'long' sets steps" in text and "sets out, which the run sets itself" in text
    data["variants"] = data["variants"][:2] + [{"name": "bad", "jacobi": 0}]
    with pytest.raises(ConfigError, match=r"(?s)'nowhere'.*variant 'bad': --jacobi"):
        parse_latent_config(data, source="c.yaml")


def test_a_latent_run_trains_evaluates_and_reports(stories, tmp_path):
    cfg = parse_latent_config(_run_config(tmp_path, stories), source="c.yaml")
    lines: list[str] = []
    result = LatentRunner(cfg, log=lines.append).run()
    report = json.loads((tmp_path / "tiny-latent" / "report.json").read_text())
    assert [v["variant"] for v in report["variants"]] == ["direct", "store"]
    evals = {s: json.loads((tmp_path / "tiny-latent" / "students" / "store" / f"seed-{s}" / "eval.json").read_text())
             for s in (0, 1)}
    store_row = report["variants"][1]
    assert store_row["accuracy"]["mean"] == pytest.approx(np.mean([e["accuracy"] for e in evals.values()]))
    assert report["contrasts"][0]["contrast"] == "store vs direct"
    assert (tmp_path / "tiny-latent" / "figures" / "accuracy.png").stat().st_size > 0
    assert "| `store` |" in result.report.read_text()
    lines.clear()  # a rerun finds every unit done
    LatentRunner(cfg, log=lines.append).run()
    assert lines and all("done already" in line for line in lines)


def test_one_run_at_a_time_per_out(tmp_path):
    out = tmp_path / "s"
    out.mkdir()
    with writer_lock(out / LOCK_NAME, output=out, fix="x"):
        with pytest.raises(BusyError, match=r"being written by .*choose another --out"):
            train_latent(LatentConfig(out=str(out), student="tiny-llama", train_size=4, eval_size=0, steps=1))
