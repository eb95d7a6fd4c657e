"""What docs/reliability.md promises, counted: killed runs that resume, corrupted bytes that are
caught, bad inputs that get one clear line. Prints one JSON object.

- **extract kills**: ``kava extract`` SIGKILLed at a random moment (uniform over an uninterrupted run's duration), then
  ``--resume``d; the resumed store's K and V must equal an uninterrupted store's, array for array, bit for bit.
- **distill kills**: ``kava distill`` SIGKILLed at a random moment (before or after checkpoints), then rerun with
  ``--resume``; its loss sequence must equal the uninterrupted run's.
- **flipped bytes**: one random byte of one random K/V chunk file flipped in a copy of the store; ``kava store
  verify`` must fail naming a crc32c mismatch, and reading that shard must raise ``ChecksumError``.
- **bad inputs**: each command below must exit with status 1 and print exactly one ``error:`` line (or, for a
  malformed command line, click's usage error: status 2 and one ``Error:`` line), and no traceback.
- **store rules**: a store edited with every checksum and digest left valid (an array's ``zarr.json`` changed, a
  manifest or spec re-sealed, chunks rewritten through zarr): ``kava store verify`` must fail naming the array (or
  document), and ``kava distill`` must stop with one ``error:`` line before its first step, writing no metrics.
- **concurrent outputs**: two processes started at once on one output (two distills on one ``--out``, two extracts
  into one new store, shard jobs of two splits): one runs, the other gets one line naming the holder (or they run
  one after the other), and the output stays sound.

The teacher is the real stories260K from ``$KAVA_ASSETS`` over seeded synthetic problems. Usage::

    KAVA_ASSETS=... python tests/benchmarks/robustness.py [--kills 6] [--flips 12] \
        [--parts bad,extract,distill,flip,rules,concurrent]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

KAVA = [sys.executable, "-m", "kava.pipelines.cli"]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1",
       "TOKENIZERS_PARALLELISM": "false"}


def kava(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([*KAVA, *args], capture_output=True, text=True, env=ENV, timeout=timeout)


def killed(args: list[str], after: float) -> None:
    """Start ``kava args`` and SIGKILL it ``after`` seconds later (if it is still running)."""
    proc = subprocess.Popen([*KAVA, *args], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=ENV)
    try:
        proc.wait(timeout=after)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGKILL)
        proc.wait()


def one_line_error(proc: subprocess.CompletedProcess) -> bool:
    """Exit 1 with one ``error:`` line, or click's usage error (exit 2, one ``Error:`` line); no traceback."""
    prefix = {1: "error:", 2: "Error:"}.get(proc.returncode)
    errors = [line for line in proc.stderr.splitlines() if prefix and line.startswith(prefix)]
    return len(errors) == 1 and "Traceback" not in proc.stderr


def store_arrays(path: Path) -> dict[str, Any]:
    from kava.kvstore import KVStore

    store = KVStore.open(path)
    out = {}
    for shard in store.iter_shards():
        for name, rows in shard.teachers.items():
            out[f"{name}/{shard.shard}/k"], out[f"{name}/{shard.shard}/v"] = rows.k, rows.v
    return out


def same_store(a: Path, b: Path) -> bool:
    import numpy as np

    x, y = store_arrays(a), store_arrays(b)
    return x.keys() == y.keys() and all(np.array_equal(x[k], y[k]) for k in x)


def extract_args(teacher: Path, store: Path) -> list[str]:
    return ["extract", "--teacher", str(teacher), "--dataset", "synthetic", "--limit", "48", "--store", str(store),
            "--shard-tokens", "1024", "--batch-size", "4", "--with-q", "--no-progress", "--threads", "1"]


def distill_args(store: Path, out: Path, *, steps: int = 10, checkpoint_every: int = 3) -> list[str]:
    return ["distill", "--store", str(store), "--student", "tiny-llama", "--out", str(out), "--steps", str(steps),
            "--batch-size", "4", "--loss", "structural", "--checkpoint-every", str(checkpoint_every),
            "--no-progress", "--threads", "1"]


def losses(out: Path) -> list[float]:
    return [json.loads(line)["loss/total"] for line in (out / "metrics.jsonl").read_text().splitlines()]


def extract_kills(work: Path, teacher: Path, n: int, rng: random.Random) -> dict[str, Any]:
    whole = work / "whole.zarr"
    started = time.perf_counter()
    assert kava(*extract_args(teacher, whole)).returncode == 0
    duration = time.perf_counter() - started
    ok = 0
    for i in range(n):
        path = work / f"killed-{i}.zarr"
        killed(extract_args(teacher, path), rng.uniform(0.2, 1.0) * duration)
        proc = kava(*extract_args(teacher, path), "--resume")
        ok += proc.returncode == 0 and same_store(path, whole)
        shutil.rmtree(path, ignore_errors=True)
    return {"runs": n, "resumed_identical": ok, "uninterrupted_s": round(duration, 1)}


def distill_kills(work: Path, store: Path, n: int, rng: random.Random) -> dict[str, Any]:
    whole = work / "distill-whole"
    started = time.perf_counter()
    assert kava(*distill_args(store, whole)).returncode == 0
    duration = time.perf_counter() - started
    ok, failures = 0, []
    for i in range(n):
        out = work / f"distill-killed-{i}"
        after = rng.uniform(0.3, 1.0) * duration
        killed(distill_args(store, out), after)
        left = sorted(p.name for p in (out / "checkpoints").iterdir()) if (out / "checkpoints").is_dir() else []
        proc = kava(*distill_args(store, out), "--resume")
        same = proc.returncode == 0 and losses(out) == losses(whole)
        ok += same
        if not same:
            failures.append({"killed_after_s": round(after, 2), "checkpoints_left": left,
                             "finished": (out / "kava.json").exists(), "stderr": proc.stderr[-400:],
                             "losses": losses(out) if (out / "metrics.jsonl").exists() else None})
        shutil.rmtree(out, ignore_errors=True)
    return {"runs": n, "resumed_identical": ok, "uninterrupted_s": round(duration, 1), "failures": failures,
            "uninterrupted_losses": losses(whole) if failures else None}


def flipped_bytes(work: Path, store: Path, n: int, rng: random.Random) -> dict[str, Any]:
    from kava.core.errors import ChecksumError
    from kava.kvstore import KVStore

    verify_caught = read_caught = 0
    for i in range(n):
        copy = work / f"flipped-{i}.zarr"
        shutil.copytree(store, copy)
        chunks = sorted(p for p in copy.glob("teachers/*/shards/*/[kv]/c/**/*") if p.is_file())
        chunk = rng.choice(chunks)
        data = bytearray(chunk.read_bytes())
        data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
        chunk.write_bytes(bytes(data))
        proc = kava("store", "verify", str(copy))
        verify_caught += proc.returncode != 0 and "crc32c" in proc.stdout + proc.stderr
        shard = int(chunk.relative_to(copy).parts[3])
        try:
            KVStore.open(copy).read_shard(shard)
        except ChecksumError:
            read_caught += 1
        shutil.rmtree(copy)
    return {"flips": n, "caught_by_verify": verify_caught, "caught_by_read": read_caught}


def bad_inputs(work: Path, teacher: Path, store: Path, student: Path) -> dict[str, Any]:
    """Every bad input a user met or could meet, by command; each must be one ``error:`` line."""
    import torch

    files = work / "inputs"
    files.mkdir()
    (files / "latin1.jsonl").write_bytes(b'{"question": "caf\xe9?", "answer": "#### 1"}\n')
    (files / "empty.jsonl").write_text("")
    (files / "fields.jsonl").write_text('{"q": "a?", "a": "#### 1"}\n')
    (files / "broken.jsonl").write_text('{"question": "a?", "answer": "#### 1"\n')
    (files / "notes.txt").write_text("not a dataset")
    broken_config = files / "broken-config"
    shutil.copytree(teacher, broken_config)
    (broken_config / "config.json").write_text('{"model_type": "llama",')
    no_config = files / "no-config"
    no_config.mkdir()
    custom = files / "custom"
    shutil.copytree(teacher, custom)
    config = json.loads((custom / "config.json").read_text())
    config.update(model_type="custom_llama", auto_map={"AutoConfig": "configuration_custom.CustomConfig",
                                                        "AutoModelForCausalLM": "modeling_custom.CustomForCausalLM"})
    (custom / "config.json").write_text(json.dumps(config))
    (files / "alias.yaml").write_text("a: &x [1, 2]\nseeds: *x\n")
    (files / "escape.yaml").write_text("variants:\n  /tmp/elsewhere: {kv: true}\n")
    tampered = files / "tampered.zarr"
    shutil.copytree(store, tampered)
    meta = next(tampered.glob("teachers/*/zarr.json"))
    assert '"theta": 10000.0' in meta.read_text()
    meta.write_text(meta.read_text().replace('"theta": 10000.0', '"theta": 20000.0', 1))
    no_grid = files / "no-grid.zarr"
    shutil.copytree(store, no_grid)
    (no_grid / "grid" / "offsets" / "c" / "0").unlink()
    evil = files / "evil-run"
    assert kava(*distill_args(store, evil, steps=2, checkpoint_every=2)).returncode == 0
    (evil / "kava.json").unlink()
    state = next(evil.glob("checkpoints/step-*/state.pt"))
    torch.save({"optimizer": _RunsCode(files / "ran"), "schedule": {}, "rng": {}}, state)

    t, s = str(teacher), str(store)
    cases = {
        "extract: no --teacher": ["extract", "--store", str(work / "x.zarr")],
        "extract: teacher path missing": ["extract", "--teacher", str(files / "nope"), "--store", str(work / "x.zarr")],
        "extract: teacher without config.json": ["extract", "--teacher", str(no_config), "--store", str(work / "x")],
        "extract: corrupt config.json": ["extract", "--teacher", str(broken_config), "--store", str(work / "x")],
        "extract: unknown preset": ["extract", "--teacher", "qwen-7b-4bti", "--store", str(work / "x")],
        "extract: dataset file missing": ["extract", "--teacher", t, "--dataset", str(files / "no.jsonl"), "--store",
                                          str(work / "x")],
        "extract: non-UTF-8 JSONL": ["extract", "--teacher", t, "--dataset", str(files / "latin1.jsonl"), "--store",
                                     str(work / "x")],
        "extract: empty JSONL": ["extract", "--teacher", t, "--dataset", str(files / "empty.jsonl"), "--store",
                                 str(work / "x")],
        "extract: wrong field names": ["extract", "--teacher", t, "--dataset", str(files / "fields.jsonl"), "--store",
                                       str(work / "x")],
        "extract: invalid JSON line": ["extract", "--teacher", t, "--dataset", str(files / "broken.jsonl"), "--store",
                                       str(work / "x")],
        "extract: not a dataset file": ["extract", "--teacher", t, "--dataset", str(files / "notes.txt"), "--store",
                                        str(work / "x")],
        "extract: bad --kv-dtype": ["extract", "--teacher", t, "--kv-dtype", "float8", "--store", str(work / "x")],
        "extract: bad --shard": ["extract", "--teacher", t, "--shard", "3/2", "--store", str(work / "x")],
        "extract: bad --layer-map": ["extract", "--teacher", t, "--layer-map", "0,9,x", "--store", str(work / "x")],
        "extract: --name escaping the store": ["extract", "--teacher", t, "--name", "../up", "--store", s],
        "extract: --store is a file": ["extract", "--teacher", t, "--store", str(files / "notes.txt")],
        "distill: store missing": ["distill", "--store", str(work / "none.zarr"), "--out", str(work / "o")],
        "distill: unknown student": ["distill", "--store", s, "--student", "tiny-lama", "--out", str(work / "o")],
        "distill: unknown teacher": ["distill", "--store", s, "--teachers", "gpt9", "--out", str(work / "o")],
        "distill: --attn-layers out of range": ["distill", "--store", s, "--student", "tiny-llama", "--loss",
                                                "structural", "--attn-layers", "99", "--out", str(work / "o")],
        "distill: --steps 0 and --lr -1": ["distill", "--store", s, "--steps", "0", "--lr", "-1", "--out",
                                           str(work / "o")],
        "distill: state.pt that runs code": [*distill_args(store, evil, steps=2, checkpoint_every=2), "--resume"],
        "distill: tampered teacher metadata": ["distill", "--store", str(tampered), "--student", "tiny-llama",
                                               "--out", str(work / "o")],
        "distill: grid chunk deleted": ["distill", "--store", str(no_grid), "--student", "tiny-llama", "--out",
                                        str(work / "o")],
        "eval: model missing": ["eval", "--model", str(files / "nope"), "--dataset", "synthetic"],
        "eval: shipped code without --trust-remote-code": ["eval", "--model", str(custom), "--dataset", "synthetic",
                                                           "--limit", "1"],
        "eval: dataset missing": ["eval", "--model", str(student), "--dataset", str(files / "no.jsonl")],
        "eval: --batch-size 0": ["eval", "--model", str(student), "--dataset", "synthetic", "--batch-size", "0"],
        "run: YAML alias": ["run", str(files / "alias.yaml"), "--check"],
        "run: variant name escaping the run": ["run", str(files / "escape.yaml"), "--check"],
        "run: config missing": ["run", str(files / "none.yaml"), "--check"],
        "run: --force of an unknown stage": ["run", "--force", "distil", "--check"],
        "store info: not a store": ["store", "info", str(files)],
        "store verify: not a store": ["store", "verify", str(files / "notes.txt")],
        "cka: unknown teacher": ["cka", "--store", s, "--teacher", "gpt9", "--out", str(work / "cka")],
    }
    results = {name: one_line_error(kava(*args)) for name, args in cases.items()}
    return {"tried": len(results), "one_line": sum(results.values()),
            "not_one_line": [name for name, ok in results.items() if not ok],
            "code_ran": (files / "ran").exists()}


def _json_edit(doc: Path, change: Any) -> None:
    meta = json.loads(doc.read_text())
    change(meta)
    doc.write_text(json.dumps(meta, indent=2))


def _resealed(doc: Path, attr: str, change: Any) -> None:
    """Edit ``attributes[attr]`` of a zarr.json and seal it again: its digest stays valid."""
    from kava.kvstore.manifest import seal

    def edit(meta: dict) -> None:
        change(meta["attributes"][attr])
        meta["attributes"][attr] = seal(meta["attributes"][attr])

    _json_edit(doc, edit)


def _rewritten(array: Path, index: Any, value: Any) -> None:
    """Set ``array[index] = value`` through zarr, which writes the chunk with a fresh, valid crc32c."""
    import zarr

    arr = zarr.open_array(array, mode="r+")
    data = arr[...]
    data[index] = value
    arr[...] = data


def _no_crc(array: Path) -> None:
    """Remove the crc32c codec from an array's zarr.json and flip a byte of its first chunk."""
    _json_edit(array / "zarr.json", lambda m: m.update(codecs=[c for c in m["codecs"] if c["name"] != "crc32c"]))
    chunk = next(p for p in sorted((array / "c").rglob("*")) if p.is_file())
    data = bytearray(chunk.read_bytes())
    data[len(data) // 2] ^= 0x10
    chunk.write_bytes(bytes(data))


def store_rules(work: Path, teacher: Path) -> dict[str, Any]:
    """Edits that keep every checksum and digest valid; each must be caught by `verify` and stop `distill` in one
    line before it trains. One store: 'f16' (float16, top-4 logits) and 'q4' (int4), stories260K."""
    base = work / "rules.zarr"
    for name, extra in (("f16", ["--logit-top-k", "4"]), ("q4", ["--kv-dtype", "int4"])):
        assert kava(*extract_args(teacher, base), "--name", name, *extra).returncode == 0
    f16, q4 = "teachers/f16/shards/000000", "teachers/q4/shards/000000"

    def drop_digests(root: Path) -> None:
        _json_edit(root / "zarr.json", lambda m: (m["attributes"]["kava"].pop("digest"),
                                                  m["attributes"]["kava"].update(format_version=1)))
        for spec in root.glob("teachers/*/zarr.json"):
            _json_edit(spec, lambda m: m["attributes"]["kava_teacher"].pop("digest"))

    def every(name: str, edit: Any) -> Any:
        """``edit`` applied to each of teacher ``name``'s shard folders: a short run reads only some shards."""
        return lambda root: [edit(d) for d in sorted((root / f"teachers/{name}/shards").iterdir()) if d.is_dir()]

    def set_in(name: str, array: str, index: Any, value: Any) -> Any:
        return every(name, lambda d: _rewritten(d / array, index, value))

    def meta_of(name: str, array: str, change: Any) -> Any:
        return every(name, lambda d: _json_edit(d / array / "zarr.json", change))

    def spec_of(name: str, change: Any) -> Any:
        return lambda r: _resealed(r / f"teachers/{name}/zarr.json", "kava_teacher", change)

    def halve_chunks(m: dict) -> None:
        m["chunk_grid"]["configuration"].update(chunk_shape=[max(1, m["shape"][0] // 2)])

    def to_int8(t: dict) -> None:
        t["storage"].update(dtype="int8")
        t["storage"].pop("group_tokens"), t["storage"].pop("group_channels")

    nan, inf = float("nan"), float("inf")
    # name → (teacher distill reads, the array or document verify must name, the edit)
    cases: dict[str, tuple[str, str, Any]] = {
        "metadata: crc32c removed from k, a byte flipped": (
            "f16", f"{f16}/k", every("f16", lambda d: _no_crc(d / "k"))),
        "metadata: crc32c removed from int4 v_scale, a byte flipped": (
            "q4", f"{q4}/v_scale", every("q4", lambda d: _no_crc(d / "v_scale"))),
        "metadata: crc32c removed from grid/input_ids": ("f16", "grid/input_ids",
                                                         lambda r: _no_crc(r / "grid/input_ids")),
        "metadata: k claims big-endian bytes": ("f16", f"{f16}/k", meta_of(
            "f16", "k", lambda m: m["codecs"][0].update(configuration={"endian": "big"}))),
        "metadata: align_weight chunk shape halved": ("f16", f"{f16}/align_weight",
                                                      meta_of("f16", "align_weight", halve_chunks)),
        "version: manifest re-sealed as version 2 over int4": ("q4", "teachers/q4", lambda r: _resealed(
            r / "zarr.json", "kava", lambda m: m.update(format_version=2))),
        "version: version 1, digests deleted, over int4": ("q4", "zarr.json", drop_digests),
        "version: version 1, digests deleted, float16 teacher": ("f16", "zarr.json", drop_digests),
        "value: logit id 1,000,000": ("f16", f"{f16}/logit_ids", set_in("f16", "logit_ids", (5, 0), 1_000_000)),
        "value: logit id -7": ("f16", f"{f16}/logit_ids", set_in("f16", "logit_ids", (5, 0), -7)),
        "value: logit logp +5": ("f16", f"{f16}/logit_logp", set_in("f16", "logit_logp", (5, 0), 5)),
        "value: align_weight NaN": ("f16", f"{f16}/align_weight", set_in("f16", "align_weight", 5, nan)),
        "value: align_weight -1e30": ("f16", f"{f16}/align_weight", set_in("f16", "align_weight", 5, -1e30)),
        "value: sample_status 7": ("f16", f"{f16}/sample_status", set_in("f16", "sample_status", 1, 7)),
        "value: marker token range past the grid": ("f16", f16, every("f16", lambda d: _json_edit(
            d / "zarr.json", lambda m: m["attributes"]["kava_shard"]["tokens"].__setitem__(1, 10**6)))),
        "value: int4 k_scale NaN": ("q4", f"{q4}/k_scale", set_in("q4", "k_scale", (0, 0, 0, 0), nan)),
        "value: int4 k_scale Inf": ("q4", f"{q4}/k_scale", set_in("q4", "k_scale", (0, 0, 0, 0), inf)),
        "value: int4 k_scale 60000": ("q4", f"{q4}/k_scale", set_in("q4", "k_scale", (0, 0, 0, 0), 60000)),
        "value: int4 v_zero NaN": ("q4", f"{q4}/v_zero", set_in("q4", "v_zero", (3, 0, 0, 0), nan)),
        "value: int4 v_zero Inf": ("q4", f"{q4}/v_zero", set_in("q4", "v_zero", (3, 0, 0, 0), inf)),
        "value: float16 k NaN": ("f16", f"{f16}/k", set_in("f16", "k", (7, 1, 0, 2), nan)),
        "value: float16 v -Inf": ("f16", f"{f16}/v", set_in("f16", "v", (7, 1, 0, 2), -inf)),
        "value: grid input id 1e6": ("f16", "grid/input_ids",
                                     lambda r: _rewritten(r / "grid/input_ids", slice(3, None, 97), 1_000_000)),
        "value: grid offset 1e6": ("f16", "grid/offsets", lambda r: _rewritten(r / "grid/offsets", 2, 1_000_000)),
        "geometry: int4 group_channels halved": ("q4", f"{q4}/v_scale", spec_of(
            "q4", lambda t: t["storage"].update(group_channels=t["storage"]["group_channels"] // 2))),
        "geometry: int4 spec says int2": ("q4", f"{q4}/k", spec_of("q4", lambda t: t["storage"].update(dtype="int2"))),
        "geometry: int4 spec says int8": ("q4", f"{q4}/k", spec_of("q4", to_int8)),
        "geometry: logits.top_k 4 -> 3": ("f16", f"{f16}/logit_ids",
                                          spec_of("f16", lambda t: t["logits"].update(top_k=3))),
    }

    # Edits to values a sound teacher could have written: no rule can tell them from data, so both must pass (a
    # zero of 60000 with its group's small scale decodes to finite float16 values near 60000).
    in_range: dict[str, tuple[str, str, Any]] = {
        "in range: int4 v_zero 60000": ("q4", f"{q4}/v_zero", set_in("q4", "v_zero", (3, 0, 0, 0), 60000)),
    }

    def distill(store: Path, out: Path, name: str) -> subprocess.CompletedProcess:
        return kava(*distill_args(store, out, steps=2, checkpoint_every=2), "--teachers", name,
                    *(["--logit-weight", "1"] if name == "f16" else []))

    # The control: both teachers of the unedited store verify and train, so a refusal below is the edit's.
    controls = [kava("store", "verify", str(base)).returncode == 0]
    controls += [distill(base, work / f"rules-control-{name}", name).returncode == 0 for name in ("f16", "q4")]
    outcomes = {}
    for i, (case, (name, where, edit)) in enumerate({**cases, **in_range}.items()):
        copy = work / f"rules-{i}.zarr"
        shutil.copytree(base, copy)
        edit(copy)
        check = kava("store", "verify", str(copy))
        problems = [line for line in check.stdout.splitlines() if line.startswith("PROBLEM ")]
        caught = check.returncode == 1 and any(line.startswith(f"PROBLEM {where}") for line in problems)
        out = work / f"rules-run-{i}"
        proc = distill(copy, out, name)
        trained = (out / "metrics.jsonl").exists() and bool((out / "metrics.jsonl").read_text().strip())
        error = next((line for line in proc.stderr.splitlines() if line.startswith("error:")), "")
        # The refusal must be the rule's: it names the array, document or marker the edit broke.
        names_it = where.rsplit("/", 1)[-1] in error
        outcomes[case] = {"verify": caught, "distill_one_line": one_line_error(proc) and names_it and not trained,
                          "trained": trained, "error": error[:300]}
        shutil.rmtree(copy, ignore_errors=True)
        shutil.rmtree(out, ignore_errors=True)
    attacks = {c: o for c, o in outcomes.items() if c in cases}
    return {"controls_sound_and_trained": all(controls), "tried": len(attacks),
            "caught_by_verify": sum(o["verify"] for o in attacks.values()),
            "refused_by_distill_in_one_line": sum(o["distill_one_line"] for o in attacks.values()),
            "trained_on": [c for c, o in attacks.items() if o["trained"]],
            "missed": [c for c, o in attacks.items() if not (o["verify"] and o["distill_one_line"])],
            "in_range_verified_and_trained": [c for c in in_range if not outcomes[c]["verify"]
                                              and outcomes[c]["trained"]],
            "cases": outcomes}


def concurrent_outputs(work: Path, teacher: Path, store: Path) -> dict[str, Any]:
    """Two processes started at once on one output: two `kava distill --out D`, two `kava extract` into one new
    store, and shard jobs of two splits (`--shard 0/2`, `--shard 0/3`) into one store. Each pair must end with
    one run done and the other refused in one line naming the holder (or both done, one after the other), the
    output sound: every step logged once, the store verified."""

    def pair(a: list[str], b: list[str]) -> list[subprocess.CompletedProcess]:
        procs = [subprocess.Popen([*KAVA, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                  env=ENV) for args in (a, b)]
        return [subprocess.CompletedProcess(p.args, p.wait(timeout=600), *p.communicate()) for p in procs]

    def judged(procs: list[subprocess.CompletedProcess], sound: bool) -> dict[str, Any]:
        codes = sorted(p.returncode for p in procs)
        refused = [p for p in procs if p.returncode != 0]
        clean = all(one_line_error(p) and "is being written by" in p.stderr for p in refused)
        return {"exit_codes": codes, "one_refused_in_one_line": codes == [0, 1] and clean,
                "both_done": codes == [0, 0], "sound": sound, "ok": sound and clean and codes[0] == 0,
                "errors": [next((ln for ln in p.stderr.splitlines() if ln.startswith("error:")), "")[:200]
                           for p in refused]}

    out = work / "two-distills"
    runs = pair(*[distill_args(store, out, steps=6, checkpoint_every=3)] * 2)
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    cases = {"distill: two runs, one --out": judged(runs, steps == list(range(1, 7)))}

    fresh = work / "two-extracts.zarr"
    runs = pair(extract_args(teacher, fresh) + ["--name", "a"], extract_args(teacher, fresh) + ["--name", "b"])
    cases["extract: two runs, one new store"] = judged(
        runs, kava("store", "verify", str(fresh)).returncode == 0)

    split = work / "two-splits.zarr"
    assert kava(*extract_args(teacher, split), "--shard", "1/2").returncode == 0  # the store, and slice 1 of 2
    runs = pair(extract_args(teacher, split) + ["--shard", "0/2"],
                extract_args(teacher, split) + ["--shard", "0/3", "--resume"])
    cases["extract: shard jobs of two splits"] = judged(runs, kava("store", "verify", str(split)).returncode == 0)
    return {"tried": len(cases), "ok": sum(c["ok"] for c in cases.values()), "cases": cases}


class _RunsCode:
    """Pickles to a call of ``Path.touch``: loading it with ``weights_only=False`` would create the file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kills", type=int, default=6, help="SIGKILLed runs of each stage")
    ap.add_argument("--flips", type=int, default=12, help="flipped bytes")
    ap.add_argument("--parts", default="bad,extract,distill,flip,rules,concurrent")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    if not os.environ.get("KAVA_ASSETS"):
        raise SystemExit("Set KAVA_ASSETS to the shared assets folder (the stories260K model).")
    teacher = Path(os.environ["KAVA_ASSETS"]) / "models" / "stories260K_hf_derived"
    parts = set(args.parts.split(","))
    rng = random.Random(args.seed)
    result: dict[str, Any] = {"date": dt.date.today().isoformat()}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        store = work / "kv.zarr"
        if parts & {"bad", "extract", "distill", "flip"}:
            assert kava(*extract_args(teacher, store)).returncode == 0
        if "bad" in parts:
            student = work / "student"
            assert kava(*distill_args(store, student, steps=1)).returncode == 0
            result["bad_inputs"] = bad_inputs(work, teacher, store, student)
        if "extract" in parts:
            result["extract_kills"] = extract_kills(work, teacher, args.kills, rng)
        if "distill" in parts:
            result["distill_kills"] = distill_kills(work, store, args.kills, rng)
        if "flip" in parts:
            result["flipped_bytes"] = flipped_bytes(work, store, args.flips, rng)
        if "rules" in parts:
            result["store_rules"] = store_rules(work, teacher)
        if "concurrent" in parts:
            if not store.exists():
                assert kava(*extract_args(teacher, store)).returncode == 0
            result["concurrent"] = concurrent_outputs(work, teacher, store)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
