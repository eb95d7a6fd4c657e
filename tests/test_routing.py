"""Per-sample routing: the REINFORCE gradient by hand, the rl policy finding the rewarded teacher of each family,
the oracle routing exactly by family, task families in configs and splits, and per-family accuracy in the report."""

from __future__ import annotations

import json
import math
import random
import re

import pytest
import torch

from kava.core.errors import ConfigError
from kava.core.synthetic import family_rows
from kava.distill.routing import (
    OracleRouter,
    PolicyRouter,
    SampleFamilies,
    family_routes,
    load_sample_families,
    reinforce_loss,
    write_sample_families,
)
from kava.pipelines import splits
from kava.pipelines.config import DataSpec, parse_config
from kava.pipelines.contrasts import family_contrasts
from kava.pipelines.families import family_accuracy

FAMILIES = {"add": "steps=1-2,ops=+,start=2-9,operand=1-9", "sub": "steps=1-2,ops=-,start=10-19,operand=1-9",
            "muldiv": "steps=1-2,ops=*/,start=2-9,operand=2-3"}


# ---------------------------------------------------------------------------------------------------------------------
# The policy


def test_policy_gradient_matches_hand_computed_reinforce() -> None:
    torch.manual_seed(0)
    router = PolicyRouter(3, 4)
    with torch.no_grad():
        router.head.weight.copy_(torch.randn(3, 4))
        router.head.bias.copy_(torch.randn(3))
    pooled = torch.randn(5, 4)
    allowed = torch.ones(5, 3, dtype=torch.bool)
    allowed[1, 2] = False  # teacher 2 has no target in sample 1
    allowed[4] = False  # sample 4 has no teacher at all
    actions = torch.tensor([0, 1, 2, 0, -1])
    adv = torch.tensor([1.5, -0.5, 0.25, -2.0, 9.0])
    beta = 0.3
    loss, entropy = reinforce_loss(router.logits(pooled), allowed, actions, adv, beta)
    loss.backward()

    # By hand: for each sample that chose, d(-A log pi_a - beta H)/dz_k = -A (1[k=a] - p_k) + beta p_k (log p_k + H),
    # over its allowed teachers, averaged over the 4 samples that chose; dW = sum_i g_i x_i^T of the normalised x.
    w, b = router.head.weight.detach().tolist(), router.head.bias.detach().tolist()
    grad_w = [[0.0] * 4 for _ in range(3)]
    grad_b = [0.0] * 3
    entropies = []
    chose = [i for i in range(5) if actions[i] >= 0]
    for i in chose:
        x = pooled[i].tolist()
        mean = sum(x) / 4
        var = sum((v - mean) ** 2 for v in x) / 4
        xn = [(v - mean) / math.sqrt(var + 1e-5) / 2 for v in x]  # unit length: / sqrt(4)
        ks = [k for k in range(3) if allowed[i, k]]
        z = {k: sum(w[k][j] * xn[j] for j in range(4)) + b[k] for k in ks}
        total = sum(math.exp(z[k]) for k in ks)
        p = {k: math.exp(z[k]) / total for k in ks}
        h = -sum(p[k] * math.log(p[k]) for k in ks)
        entropies.append(h)
        for k in ks:
            g = -float(adv[i]) * ((k == int(actions[i])) - p[k]) + beta * p[k] * (math.log(p[k]) + h)
            grad_b[k] += g / len(chose)
            for j in range(4):
                grad_w[k][j] += g * xn[j] / len(chose)
    torch.testing.assert_close(router.head.weight.grad, torch.tensor(grad_w), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(router.head.bias.grad, torch.tensor(grad_b), atol=1e-5, rtol=1e-4)
    assert float(entropy) == pytest.approx(sum(entropies) / len(entropies), abs=1e-5)


@pytest.mark.parametrize("tag", [False, True], ids=["features", "family-tag"])
def test_rl_router_converges_to_the_rewarded_teacher_of_each_family(tag: bool) -> None:
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    families, teachers, dim = 3, 3, 8
    favoured = torch.tensor([2, 0, 1])  # family k is rewarded for teacher favoured[k]
    centres = torch.randn(families, dim, generator=g) * 2
    router = PolicyRouter(teachers, dim, num_families=families if tag else 0, baseline_decay=0.9)
    optimizer = torch.optim.SGD(router.parameters(), lr=0.5)
    available = torch.ones(32, 5, teachers, dtype=torch.bool)
    for _ in range(200):
        family = torch.randint(0, families, (32,), generator=g)
        pooled = centres[family] + torch.randn(32, dim, generator=g)
        weights, actions, allowed = router(available, pooled, family if tag else None, generator=g)
        assert torch.equal(weights.argmax(-1)[:, 0], actions) and torch.equal(weights.sum(-1), torch.ones(32, 5))
        reward = (actions == favoured[family]).float()
        adv = router.advantages(reward)
        loss, _ = reinforce_loss(router.logits(pooled, family if tag else None), allowed, actions, adv, 0.01)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    family = torch.arange(families).repeat_interleave(50)
    probs = torch.softmax(router.logits(centres[family] + torch.randn(150, dim, generator=g),
                                        family if tag else None), -1)
    chosen = probs.argmax(-1)
    assert (chosen == favoured[family]).float().mean() > 0.95
    assert probs.gather(1, favoured[family].unsqueeze(1)).mean() > 0.8
    assert 0.5 < float(router.baseline) <= 1.0  # the reward's moving average followed it up


def test_advantages_center_on_the_moving_baseline() -> None:
    router = PolicyRouter(2, 3, baseline_decay=0.5)
    first = router.advantages(torch.tensor([1.0, 3.0]))  # starts at the batch's own mean 2 and spread 1
    torch.testing.assert_close(first, torch.tensor([-1.0, 1.0]))
    assert float(router.baseline) == pytest.approx(2.0)
    second = router.advantages(torch.tensor([4.0, 4.0]))  # against b = 2, sigma = 1
    torch.testing.assert_close(second, torch.tensor([2.0, 2.0]))
    assert float(router.baseline) == pytest.approx(3.0) and float(router.spread) == pytest.approx(2.5)


def test_policy_starts_uniform_and_never_picks_an_unavailable_teacher() -> None:
    router = PolicyRouter(3, 4)
    available = torch.zeros(200, 6, 3, dtype=torch.bool)
    available[:, :, 1:] = True  # teacher 0 has no target anywhere
    available[0] = False  # sample 0 has no teacher
    weights, actions, allowed = router(available, torch.randn(200, 4), generator=torch.Generator().manual_seed(0))
    assert actions[0] == -1 and (weights[0] == 0).all()
    assert set(actions[1:].tolist()) == {1, 2}
    assert 0.35 < (actions[1:] == 1).float().mean() < 0.65  # zero-initialised: uniform over the available two


# ---------------------------------------------------------------------------------------------------------------------
# The oracle and the families file


def test_oracle_routes_exactly_by_family() -> None:
    available = torch.ones(4, 3, 3, dtype=torch.bool)
    available[1, 0, 2] = False  # the chosen teacher has no target at one token
    target = torch.tensor([0, 2, 1, -1])
    w = OracleRouter()(available, target)
    for b in range(4):
        for t in range(3):
            if target[b] < 0:  # unknown family: the available teachers equally
                expected = [1 / 3] * 3
            else:
                expected = [float(n == target[b] and bool(available[b, t, n])) for n in range(3)]
            torch.testing.assert_close(w[b, t], torch.tensor(expected))


def test_family_targets_default_to_the_teacher_named_as_the_family() -> None:
    f = SampleFamilies(("add", "sub"), torch.tensor([0, 1, -1]))
    assert f.teacher_targets(["sub", "add"], {}, flag="--family-teachers").tolist() == [1, 0]
    assert f.teacher_targets(["a", "s"], {"add": "a", "sub": "s"}, flag="--family-teachers").tolist() == [0, 1]
    with pytest.raises(ConfigError, match=r"family 'sub' has no teacher .* Give --family-teachers sub=TEACHER"):
        f.teacher_targets(["add", "x"], {}, flag="--family-teachers")
    with pytest.raises(ConfigError, match=r"--family-teachers: 'mul' is not a family of the samples"):
        f.teacher_targets(["add", "sub"], {"mul": "add"}, flag="--family-teachers")


def test_family_routes_count_each_familys_samples_per_teacher() -> None:
    weights = torch.tensor([[[1.0, 0.0], [0.5, 0.5]], [[0.0, 1.0], [0.0, 1.0]], [[0.2, 0.8], [0.2, 0.8]]])
    mask = torch.tensor([[True, True], [True, False], [True, True]])
    routes = family_routes(weights, mask, torch.tensor([1, 1, -1]), 2)
    torch.testing.assert_close(routes, torch.tensor([[0.0, 0.0], [0.75, 1.25]]))  # the unknown sample is not counted


def test_sample_families_file_round_trips_and_refuses_another_split(tmp_path) -> None:
    path = tmp_path / "families.json"
    write_sample_families(path, ["sub", "add"], {"s/train/000000": "add", "s/train/000002": "sub"})
    f = load_sample_families(path, ["s/train/000000", "s/train/000001", "s/train/000002"])
    assert f.names == ("sub", "add") and f.of_sample.tolist() == [1, -1, 0]
    with pytest.raises(ConfigError, match=r"names none of the store's 2 samples \(e.g. 'x/train/000000'\)"):
        load_sample_families(path, ["x/train/000000", "x/train/000001"])
    with pytest.raises(ConfigError, match=r"--sample-families .*missing.json: no such file"):
        load_sample_families(tmp_path / "missing.json", ["s/train/000000"])


# ---------------------------------------------------------------------------------------------------------------------
# Families in the data and the config


def test_family_rows_take_turns_and_stay_in_their_operations() -> None:
    rows, tags = family_rows(10, seed=0, split="train", families=FAMILIES)
    assert tags == ["add", "sub", "muldiv"] * 3 + ["add"]
    for row, tag in zip(rows, tags):
        ops = {op for note in re.findall(r"<<([^=]+)=", row.reasoning) for op in "+-*/" if op in note}
        assert ops and ops <= {"add": {"+"}, "sub": {"-"}, "muldiv": {"*", "/"}}[tag], row.reasoning


def test_splits_tag_every_row_and_write_each_familys_teacher_rows(tmp_path) -> None:
    spec = DataSpec(families=FAMILIES, pool_size=90, eval_size=30, teacher_fraction=0.5)
    record = splits.make_splits(spec, tmp_path)
    assert record["families"] == FAMILIES
    assert record["splits"]["eval"]["families"] == {"add": 10, "sub": 10, "muldiv": 10}
    teacher = splits.families_of(tmp_path, "teacher-train")
    for name in FAMILIES:
        role = splits.family_role("teacher-train", name)
        rows = splits.check_split(tmp_path, role, stage="test")
        assert len(rows) == record["splits"]["teacher-train"]["families"][name] > 0
        assert set(splits.families_of(tmp_path, role).values()) == {name}
        assert sum(f == name for f in teacher.values()) == len(rows)
    evals = splits.families_of(tmp_path, "eval")
    assert list(evals) == splits.load_split(tmp_path, "eval").sample_ids


def run_config(**changes):
    data = {"name": "fam", "data": {"families": FAMILIES, "pool_size": 60, "eval_size": 30},
            "teachers": [{"name": n, "train": {"steps": 5, "family": n}} for n in FAMILIES],
            "variants": [{"name": "ce"},
                         {"name": "oracle", "teachers": list(FAMILIES), "distill": {"fusion": "oracle"}},
                         {"name": "rl", "teachers": list(FAMILIES), "distill": {"fusion": "rl", "rl_family": True}}]}
    for key, value in changes.items():
        section, _, field = key.partition(".")
        if field:
            data[section] = {**data[section], field: value}
        else:
            data[section] = value
    return data


def test_config_with_families_round_trips_and_fills_the_routes(tmp_path) -> None:
    from kava.pipelines.config import stage_distill_config  # noqa: PLC0415

    cfg = parse_config(run_config())
    assert parse_config(cfg.to_dict()).to_dict() == cfg.to_dict()
    assert cfg.teacher("sub").train.family == "sub"
    oracle = stage_distill_config(cfg, cfg.variant("oracle"), seed=0, store="s", out="o")
    assert oracle.teacher_fusion.family_teacher_map == {"add": "add", "sub": "sub", "muldiv": "muldiv"}
    assert oracle.teacher_fusion.sample_families.endswith("fam/data/families.json")
    ce = stage_distill_config(cfg, cfg.variant("ce"), seed=0, store="s", out="o")
    assert ce.teacher_fusion.sample_families is None


@pytest.mark.parametrize("changes,match", [
    ({"teachers": [{"name": "t", "train": {"family": "mul"}}]},
     r"teachers\[t\].train.family: 'mul' is not a family of data.families. Families: add, sub, muldiv."),
    ({"data.families": {"add": "ops=+", "bad name": "ops=-"}}, r"expected family names of letters, digits"),
    ({"data.families": {"add": "ops=+", "plus": "ops=+"}}, r"families 'add' and 'plus' have the same difficulty"),
    ({"data.families": {"add": "ops=x"}}, r"data.families.add: Expected difficulty ops as distinct symbols"),
    ({"data.difficulty": "easy"}, r"Can't set both data.families and data.difficulty"),
    ({"variants": [{"name": "ce"}, {"name": "o", "teachers": ["add"], "distill": {"fusion": "oracle",
                                                                                  "family_teachers": "add"}}]},
     r"--family-teachers: expected family=teacher pairs"),
])
def test_config_errors_name_bad_families(changes, match) -> None:
    with pytest.raises(ConfigError, match=match):
        parse_config(run_config(**changes))


def test_oracle_without_families_is_refused() -> None:
    data = run_config()
    data["data"] = {"difficulty": "easy"}
    data["teachers"] = [{"name": "a", "train": {"steps": 5}}, {"name": "b", "train": {"steps": 5}}]
    data["variants"] = [{"name": "ce"}, {"name": "o", "teachers": ["a", "b"], "distill": {"fusion": "oracle"}}]
    with pytest.raises(ConfigError, match=r"variants\[o\]: --fusion oracle routes by each sample's family: give "
                                          r"--sample-families"):
        parse_config(data)


# ---------------------------------------------------------------------------------------------------------------------
# The report


def test_family_accuracy_matches_a_naive_count() -> None:
    rng = random.Random(0)
    names = ["add", "sub", "muldiv", "none"]
    families = {f"e/test/{i:06d}": rng.choice(names[:3]) for i in range(200)}
    items = {sid: {"correct": rng.random() < 0.4} for sid in list(families)[:180]}  # a model scored on 180
    got = family_accuracy(items, families, names)
    for name in names[:3]:
        mine = [items[s]["correct"] for s, f in families.items() if f == name and s in items]
        assert got[name] == pytest.approx(sum(mine) / len(mine))
    assert math.isnan(got["none"])


def test_family_contrasts_are_holm_adjusted_across_contrasts_and_families() -> None:
    acc = {f: {"a": {s: 0.5 + 0.01 * s + (0.2 if f == "add" else 0) for s in range(5)},
               "b": {s: 0.5 + 0.012 * s * (s % 2) for s in range(5)},
               "c": {s: 0.4 + 0.01 * ((s * 7) % 5) for s in range(5)}} for f in ("add", "sub")}
    lines, rows = family_contrasts(["a vs b", "a vs c"], acc, alpha=0.05)
    assert len(rows) == 4 and lines[0] == "### Contrasts per family"
    raw = sorted(r["accuracy"]["p"] for r in rows)
    assert min(r["accuracy"]["p_holm"] for r in rows) == pytest.approx(min(1.0, 4 * raw[0]))
    add = next(r for r in rows if r["contrast"] == "a vs b" and r["family"] == "add")
    assert add["accuracy"]["diff"] == pytest.approx(0.2 + sum(0.01 * s - 0.012 * s * (s % 2) for s in range(5)) / 5)
    assert json.dumps(rows)  # the report's JSON


# ---------------------------------------------------------------------------------------------------------------------
# Through `kava distill`: a real two-teacher store, a real student, the trainer's policy update


@pytest.fixture(scope="module")
def two_teacher_store(tmp_path_factory, stories, tiny_llama):
    from test_distill import extract  # noqa: PLC0415

    path = tmp_path_factory.mktemp("routing") / "kv.zarr"
    extract(stories, path, limit=8, name="big")
    extract(tiny_llama, path, limit=8, name="tiny", student_layers=5)
    families = path.parent / "families.json"  # even samples are family "p", odd ones "q"
    write_sample_families(families, ["p", "q"], {f"synthetic/train/{i:06d}": "pq"[i % 2] for i in range(8)})
    return path, families


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory, stories):
    from test_distill import tiny_llama as make  # noqa: PLC0415

    return make.__wrapped__(tmp_path_factory, stories)


def routed(tmp_path, store, families, **options):
    from kava.distill.config import DistillConfig  # noqa: PLC0415
    from kava.distill.trainer import run_distill  # noqa: PLC0415

    out = tmp_path / options["fusion"]
    run_distill(DistillConfig.from_dict(dict(
        out=str(out), store=str(store), student="tiny-qwen2", teachers="big,tiny", sample_families=str(families),
        loss="mse", steps=3, batch_size=4, progress=False, checkpoint_every=0, seed=0, **options)), log=lambda _: None)
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_oracle_and_rl_train_and_log_their_routes(tmp_path, two_teacher_store) -> None:
    store, families = two_teacher_store
    for m in routed(tmp_path, store, families, fusion="oracle", family_teachers="p=tiny,q=big"):
        assert m["route/p/big"] == 0 and m["route/q/tiny"] == 0  # every sample to its family's teacher
        assert m["route/p/tiny"] + m["route/q/big"] == pytest.approx(4)
    metrics = routed(tmp_path, store, families, fusion="rl", rl_family=True)
    assert metrics[0]["rl/entropy"] == pytest.approx(math.log(2), abs=1e-5)  # starts uniform
    for m in metrics:
        assert sum(m[f"route/{f}/{t}"] for f in "pq" for t in ("big", "tiny")) == pytest.approx(4)
        assert math.isfinite(m["rl/reward"]) and m["rl/seconds"] > 0
    from safetensors.torch import load_file  # noqa: PLC0415

    heads = load_file(tmp_path / "rl" / "projectors.safetensors")
    assert heads["fusion.family.weight"].abs().sum() > 0  # the policy moved off its uniform start
