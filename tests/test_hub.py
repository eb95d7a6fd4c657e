"""Sharing on the Hub: `kava store push|pull`, `kava push|pull`, against a local directory standing in for the Hub.

``--hub-dir`` runs every part of a push and a pull but the HfApi calls: which files go, the cards, the checks before
a push (the store verifies whole) and after a pull (verify again; a student's sha256 per file). The store and the
student are real: the stories260K teacher extracted over 8 synthetic problems, and a tiny Llama distilled from it for
2 steps, loaded back with ``from_pretrained`` from the pulled copy.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from helpers import ENV, KAVA, asset_path
from huggingface_hub import DatasetCard, ModelCard
from transformers import AutoModelForCausalLM

from kava.analysis.paired import compare_paired
from kava.core.errors import ChecksumError, ConfigError, NotAStoreError, StoreError
from kava.distill.config import DistillConfig
from kava.distill.evaluate import EvalConfig, run_eval
from kava.distill.latent.checkpoint import load_latent
from kava.distill.latent.config import LatentConfig
from kava.distill.latent.train import train_latent
from kava.distill.trainer import run_distill
from kava.extract.config import ExtractConfig
from kava.extract.recipe import run_extract
from kava.kvstore import KVStore, verify_store
from kava.pipelines.hub import LocalHub, pull_store, pull_student, push_store, push_student
from kava.pipelines.hub_cards import store_digest

ONE_TORCH_THREAD = True  # see conftest.one_torch_thread
TEACHER = "stories260K_hf_derived"


def tree(root: Path) -> dict[str, bytes]:
    """Every file under ``root`` (relative POSIX path → bytes)."""
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def digest_from_files(store: Path) -> str:
    """The store digest from the store's own zarr.json files, read here without KaVa's reader."""
    manifest = json.loads((store / "zarr.json").read_text())["attributes"]["kava"]
    teachers = {p.parent.name: json.loads(p.read_text())["attributes"]["kava_teacher"]
                for p in (store / "teachers").glob("*/zarr.json")}
    return store_digest(manifest, teachers)


def flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("hub-store") / "kv.zarr"
    run_extract(ExtractConfig.from_dict(dict(
        teacher=str(asset_path(f"models/{TEACHER}")), store=str(path), limit=8, shard_tokens=1024, batch_size=8,
        progress=False, calibration_samples=0)), log=lambda _: None)
    return path


@pytest.fixture(scope="module")
def student(tmp_path_factory, store) -> Path:
    """A tiny Llama distilled for 2 steps, at the path `kava run` gives its variant `kv`, seed 0."""
    out = tmp_path_factory.mktemp("hub-run") / "students" / "kv" / "seed-0"
    run_distill(DistillConfig.from_dict(dict(out=str(out), store=str(store), student="tiny-llama", steps=2,
                                             batch_size=4, progress=False, checkpoint_every=1)), log=lambda _: None)
    return out


def test_a_store_pulled_back_is_the_pushed_one_bit_for_bit_and_verifies(tmp_path, store):
    hub = LocalHub(tmp_path / "hub")
    pushed = push_store(store, "lab/kv-stories", hub=hub)
    pulled = pull_store("lab/kv-stories", tmp_path / "copy", hub=hub)
    assert tree(tmp_path / "copy") == tree(store)  # no card, no download records, no marker left in DEST
    assert verify_store(tmp_path / "copy").ok and not pulled.resumed
    assert (pushed.files, pushed.bytes) == (pulled.files, pulled.bytes) == (len(tree(store)),
                                                                           sum(map(len, tree(store).values())))
    repo = tmp_path / "hub" / "datasets" / "lab" / "kv-stories" / "main"
    assert set(tree(repo)) == set(tree(store)) | {"README.md"}
    card = DatasetCard.load(repo / "README.md")
    assert set(card.data.tags) == {"kava", "kv-cache", "distillation"}
    digest = digest_from_files(store)
    assert pushed.digest == digest == card.data.kava["digest"]
    manifest = KVStore.open(store).manifest
    for fact in (TEACHER, f"models/{TEACHER}", "float16", "5 of 5", manifest.dataset.sample_ids_hash, digest,
                 manifest.grid_fingerprint, "| samples | 8 (", "| format version | 5 |"):
        assert fact in card.text, fact


def test_a_flipped_byte_on_the_hub_is_caught_at_pull_and_leaves_no_store(tmp_path, store):
    hub = LocalHub(tmp_path / "hub")
    push_store(store, "lab/kv", hub=hub)
    chunks = tmp_path / "hub" / "datasets" / "lab" / "kv" / "main" / "teachers" / TEACHER / "shards" / "000000" / "k"
    flip_byte(max((p for p in chunks.rglob("*") if p.is_file() and p.name != "zarr.json"),
                  key=lambda p: p.stat().st_size))
    with pytest.raises(StoreError, match=r"copy: the store pulled from dataset repo lab/kv fails verification.*"
                                         r"crc32c.*Delete .* and pull again") as e:
        pull_store("lab/kv", tmp_path / "copy", hub=hub)
    assert "\n" not in str(e.value)
    with pytest.raises(NotAStoreError):
        KVStore.open(tmp_path / "copy")


def test_a_store_that_does_not_verify_or_lives_at_a_url_is_not_pushed(tmp_path, store):
    broken = tmp_path / "kv.zarr"
    shutil.copytree(store, broken)
    shard = broken / "teachers" / TEACHER / "shards" / "000001" / "v"
    next(p for p in sorted(shard.rglob("*")) if p.is_file() and p.name != "zarr.json").unlink()
    hub = LocalHub(tmp_path / "hub")
    with pytest.raises(StoreError, match=r"kv.zarr: does not verify, so it is not pushed: teachers/.*000001/v.*"
                                         r"`kava store verify .*kv.zarr` lists them"):
        push_store(broken, "lab/kv", hub=hub)
    assert not (tmp_path / "hub").exists()
    with pytest.raises(ConfigError, match=r"STORE s3://bucket/kv.zarr: .*`kava store cp s3://bucket/kv.zarr "
                                          r"runs/kv.zarr`\), then push"):
        push_store("s3://bucket/kv.zarr", "lab/kv", hub=hub)
    with pytest.raises(ConfigError, match=r"REPO_ID: expected owner/name.*Got 'kv' instead"):
        push_store(store, "kv", hub=hub)


def test_an_interrupted_pull_resumes_and_a_foreign_dest_is_refused(tmp_path, store):
    hub = LocalHub(tmp_path / "hub")
    push_store(store, "lab/kv", hub=hub)

    first = sorted(name for name in tree(store) if name != "zarr.json")[:5]

    class Dropped(LocalHub):
        """Drops the connection after the first 5 files of the pull's first download."""

        def download(self, repo, dest, **_):
            super().download(repo, dest, allow=first)
            raise ConnectionResetError("connection dropped")

    with pytest.raises(ConnectionResetError):
        pull_store("lab/kv", tmp_path / "copy", hub=Dropped(tmp_path / "hub"))
    with pytest.raises(NotAStoreError):  # the manifest comes last: an interrupted pull is never a store
        KVStore.open(tmp_path / "copy")
    again = pull_store("lab/kv", tmp_path / "copy", hub=hub)
    assert again.resumed and tree(tmp_path / "copy") == tree(store)

    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match=r"DEST .*other: not empty, and neither an interrupted pull of dataset "
                                          r"repo lab/kv nor a copy of it"):
        pull_store("lab/kv", tmp_path / "other", hub=hub)
    assert tree(tmp_path / "other") == {"notes.txt": b"mine"}


def test_a_student_pulled_back_loads_with_from_pretrained_and_its_card_names_teacher_and_store(
        tmp_path, store, student):
    evaluated = run_eval(EvalConfig.from_dict(dict(model=str(student), dataset="synthetic", split="test", limit=4,
                                                   max_new_tokens=4, progress=False, out=str(tmp_path / "e.jsonl"))))
    hub = LocalHub(tmp_path / "hub")
    pushed = push_student(student, "lab/tiny-kv", hub=hub, results=tmp_path / "e.jsonl", store_repo="lab/kv")
    pulled = pull_student("lab/tiny-kv", tmp_path / "copy", hub=hub)
    assert pulled.checked == "7 files' sha256" and pushed.digest == digest_from_files(store)
    assert set(tree(tmp_path / "copy")) == {"README.md", "config.json", "config.yaml", "generation_config.json",
                                            "kava.json", "model.safetensors", "tokenizer.json",
                                            "tokenizer_config.json"}  # no checkpoints, metrics or projectors

    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "copy")
    original = AutoModelForCausalLM.from_pretrained(student)
    for (name, a), (_, b) in zip(loaded.state_dict().items(), original.state_dict().items()):
        assert torch.equal(a, b), name

    card = ModelCard.load(tmp_path / "copy" / "README.md")
    assert card.data.library_name == "transformers" and set(card.data.tags) >= {"kava", "distillation", "kv-cache"}
    assert card.data.datasets == ["lab/kv"]
    final = json.loads((student / "kava.json").read_text())["final"]
    grid = KVStore.open(store).manifest.grid_fingerprint
    for fact in (f"| {TEACHER} | {asset_path('models/' + TEACHER)} |",
                 f"`{digest_from_files(store)}` (grid fingerprint `{grid}`)",
                 "loss mercator", "| steps | 2 (", f"| loss/ce | {final['loss/ce']:.4f} |",
                 f"Accuracy **{evaluated.accuracy:.4f}** ({evaluated.correct}/4 items"):
        assert fact in card.text, fact


def test_results_from_a_run_report_mark_this_students_variant(tmp_path, student):
    paired = compare_paired({"ce": {0: 0.40, 1: 0.42, 2: 0.38}, "kv": {0: 0.55, 1: 0.60, 2: 0.51}}, "ce")
    report = tmp_path / "report.json"
    report.write_text(json.dumps({"accuracy": [c.to_dict() for c in paired], "seeds": [0, 1, 2], "baseline": "ce",
                                  "teachers": {TEACHER: {"accuracy": 0.8}}}))
    push_student(student, "lab/tiny-kv", hub=LocalHub(tmp_path / "hub"), results=report)
    card = ModelCard.load(tmp_path / "hub" / "models" / "lab" / "tiny-kv" / "main" / "README.md")
    kv = next(c for c in paired if c.variant == "kv")
    assert f"| **kv** (this student) | {kv.mean:.4f} | {kv.diff:+.4f} [{kv.diff_ci[0]:+.4f}, " in card.text
    assert f"| teacher {TEACHER} | 0.8000 |" in card.text
    (tmp_path / "bad.json").write_text('{"loss": 1}')
    with pytest.raises(ConfigError, match=r"--results .*bad.json: expected a `kava eval --out` JSONL"):
        push_student(student, "lab/tiny-kv", hub=LocalHub(tmp_path / "hub"), results=tmp_path / "bad.json")


def test_a_student_whose_store_moved_reads_the_digest_from_the_store_repo(tmp_path, store, student):
    moved = tmp_path / "student"
    shutil.copytree(student, moved, ignore=shutil.ignore_patterns("checkpoints"))
    record = json.loads((moved / "kava.json").read_text())
    (moved / "kava.json").write_text(json.dumps({**record, "store": str(tmp_path / "gone.zarr")}))
    hub = LocalHub(tmp_path / "hub")
    push_store(store, "lab/kv", hub=hub)
    card_at = tmp_path / "hub" / "models" / "lab" / "s" / "main" / "README.md"

    push_student(moved, "lab/s", hub=hub)  # kava.json records the digest: the card says it, and where it came from
    assert f"| store digest | `{digest_from_files(store)}` (recorded in kava.json; the store at " \
        f"{tmp_path / 'gone.zarr'} is not on this machine) |" in ModelCard.load(card_at).text
    del record["store_digest"]  # a student distilled before kava.json recorded it
    (moved / "kava.json").write_text(json.dumps({**record, "store": str(tmp_path / "gone.zarr")}))
    push_student(moved, "lab/s", hub=hub)
    assert f"| store digest | unknown: the store at {tmp_path / 'gone.zarr'} is not on this machine |" \
        in ModelCard.load(card_at).text
    push_student(moved, "lab/s", hub=hub, store_repo="lab/kv")
    card = ModelCard.load(card_at)
    assert card.data.kava["store_digest"] == digest_from_files(store)
    assert f"| {TEACHER} | {asset_path('models/' + TEACHER)} |" in card.text


def test_a_flipped_byte_in_a_pushed_student_is_caught_and_a_rerun_repairs_it(tmp_path, student):
    hub = LocalHub(tmp_path / "hub")
    push_student(student, "lab/tiny-kv", hub=hub)
    weights = tmp_path / "hub" / "models" / "lab" / "tiny-kv" / "main" / "model.safetensors"
    good = weights.read_bytes()
    flip_byte(weights)
    with pytest.raises(ChecksumError, match=r"1 file\(s\) pulled from model repo lab/tiny-kv are missing or differ "
                                            r"from the sha256 its card records \(first: model.safetensors\)"):
        pull_student("lab/tiny-kv", tmp_path / "copy", hub=hub)
    weights.write_bytes(good)
    assert pull_student("lab/tiny-kv", tmp_path / "copy", hub=hub).resumed
    assert (tmp_path / "copy" / "model.safetensors").read_bytes() == good


def test_a_latent_student_is_pushed_with_its_latent_weights_and_says_it_needs_kava(tmp_path, stories):
    out = tmp_path / "latent"
    train_latent(LatentConfig(out=str(out), student="tiny-llama", tokenizer=str(stories), train_size=8, eval_size=4,
                              chain_steps=2, latent=3, jacobi=2, steps=2, batch_size=4, max_new_tokens=4,
                              progress=False))
    hub = LocalHub(tmp_path / "hub")
    push_student(out, "lab/latent", hub=hub)
    pull_student("lab/latent", tmp_path / "copy", hub=hub)
    assert {"latent.json", "latent.safetensors", "eval.json"} <= set(tree(tmp_path / "copy"))
    reasoner, _, mode = load_latent(tmp_path / "copy")
    assert mode == "latent" and (reasoner.latents, reasoner.iterations) == (3, 2)
    card = ModelCard.load(tmp_path / "copy" / "README.md")
    assert "latent-reasoning" in card.data.tags and card.data.kava["kind"] == "latent-student"
    assert "**Running it needs kava**" in card.text and "| accuracy |" in card.text


# ---------------------------------------------------------------------------------------------------------------------
# The commands


def kava(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """`kava ARGS` in a subprocess; without ``env``, in the tests' environment less any KAVA_HUB_DIR."""
    return subprocess.run([*KAVA, *args], capture_output=True, text=True, timeout=120,
                          env=env or {k: v for k, v in ENV.items() if k != "KAVA_HUB_DIR"})


@pytest.mark.integration
def test_the_commands_push_and_pull_through_a_hub_dir(tmp_path, store, student):
    hub = str(tmp_path / "hub")
    done = kava("store", "push", str(store), "lab/kv", "--hub-dir", hub, "--json")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["digest"] == digest_from_files(store)
    done = kava("store", "pull", "lab/kv", str(tmp_path / "kv.zarr"), env={**ENV, "KAVA_HUB_DIR": hub})
    assert done.returncode == 0, done.stderr
    assert "chunks' crc32c" in done.stdout
    assert tree(tmp_path / "kv.zarr") == tree(store)
    done = kava("push", str(student), "lab/tiny-kv", "--hub-dir", hub, "--revision", "v1")
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "hub" / "models" / "lab" / "tiny-kv" / "v1" / "README.md").is_file()
    done = kava("pull", "lab/tiny-kv", str(tmp_path / "student"), "--hub-dir", hub, "--revision", "v1")
    assert done.returncode == 0, done.stderr
    assert "checked 7 files' sha256" in done.stdout


@pytest.mark.integration
def test_the_commands_refuse_with_one_line(tmp_path, store):
    broken = tmp_path / "kv.zarr"
    shutil.copytree(store, broken)
    os.remove(broken / "index.parquet")
    hub = str(tmp_path / "hub")
    done = kava("store", "push", str(broken), "lab/kv", "--hub-dir", hub)
    assert done.returncode == 1 and done.stderr.count("\n") == 2  # the progress line, then the error
    assert "does not verify, so it is not pushed: index.parquet" in done.stderr

    push_store(store, "lab/kv", hub=LocalHub(tmp_path / "hub"))
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    done = kava("store", "pull", "lab/kv", str(tmp_path / "full"), "--hub-dir", hub)
    assert done.returncode == 1 and done.stderr.startswith("error: DEST ") and done.stderr.count("\n") == 1
    assert "not empty" in done.stderr

    # No --hub-dir while the hub is offline: one line naming --hub-dir and going online, before anything is read.
    done = kava("store", "push", str(store), "lab/kv")
    assert done.returncode == 1 and done.stderr.count("\n") == 1, done.stderr
    assert "HF_HUB_OFFLINE=1" in done.stderr and "--hub-dir DIR" in done.stderr and "unset HF_HUB_OFFLINE" \
        in done.stderr
    # Online but without a token: a push is refused before it reaches the network (the token is huggingface_hub's
    # to find: HF_TOKEN, else the login file under HF_HOME).
    online = {**{k: v for k, v in ENV.items() if k not in ("HF_TOKEN", "TRANSFORMERS_OFFLINE", "KAVA_HUB_DIR")},
              "HF_HUB_OFFLINE": "0", "HF_HOME": str(tmp_path / "hf-home"), "HF_ENDPOINT": "http://127.0.0.1:9"}
    done = kava("store", "push", str(store), "lab/kv", env=online)
    assert done.returncode == 1 and "needs a token with write access: set HF_TOKEN or run `hf auth login`" \
        in done.stderr
