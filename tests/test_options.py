"""Stage options: groups rendered as flat flags, old spellings, list options parsed once, config.yaml read back.

Each command line goes through the real `kava` click command and ``build_configs``, as `kava` itself builds its
configs; nothing runs a stage.
"""

from __future__ import annotations

import click
import pytest
import yaml

from kava.core.config import config_fields
from kava.core.data import DataSource, load_rows
from kava.core.errors import ConfigError
from kava.distill.config import DistillConfig
from kava.distill.evaluate import EvalConfig
from kava.extract.config import ExtractConfig
from kava.pipelines.cluster_config import ClusterConfig
from kava.pipelines.options import build_configs

CLASSES = {"extract": (ExtractConfig, ClusterConfig), "distill": (DistillConfig,), "eval": (EvalConfig,)}
REQUIRED = {"extract": ["--teacher", "t", "--store", "s"], "distill": ["--student", "tiny-llama", "--out", "o"],
            "eval": ["--model", "m"]}


def parse(command: str, *args: str, config_file: str | None = None) -> tuple:
    """``args`` through the real `kava <command>` click command, into its config classes."""
    from kava.pipelines.cli import main

    ctx = click.Context(main)
    cmd = main.get_command(ctx, command)
    with cmd.make_context(command, [*REQUIRED[command], *args], parent=ctx) as sub:
        values = {k: v for k, v in sub.params.items() if k not in ("list_teachers", "as_json", "config_file",
                                                                     "nproc")}
    return build_configs(CLASSES[command], values, config_file)


def test_every_command_reads_its_rows_through_one_data_source_group():
    for command, (cls, *_) in CLASSES.items():
        group = [c.name for c in config_fields(cls) if c.group == "data"]
        assert group == [f.name for f in DataSource.__dataclass_fields__.values()], command
    cfg = parse("distill", "--dataset", "gsm8k", "--split", "test", "--limit", "5", "--strip-calculator")[0]
    assert cfg.data == DataSource(dataset="gsm8k", split="test", limit=5, strip_calculator=True)
    assert EvalConfig(model="m").data == DataSource(dataset="gsm8k", split="test")  # eval's own defaults
    # load() is load_rows with the group's fields: the same rows, the same fingerprint.
    source = DataSource(dataset="synthetic", split="test", limit=7, data_seed=3)
    assert source.load().fingerprint == load_rows("synthetic", split="test", limit=7, seed=3).fingerprint


def test_group_options_show_in_help_and_say_when_they_apply():
    from click.testing import CliRunner

    from kava.pipelines.cli import main

    text = " ".join(CliRunner().invoke(main, ["distill", "--help"], catch_exceptions=False).output.split())
    assert "--dataset TEXT Without --store: synthetic (generated, seeded), gsm8k" in text
    assert "--student-template, --template TEXT" in text
    text = " ".join(CliRunner().invoke(main, ["extract", "--help"], catch_exceptions=False).output.split())
    assert "--data-seed, --seed INTEGER Seed of the synthetic dataset." in text
    assert "--cluster TEXT" in text and "--slurm-jobs INTEGER" in text


@pytest.mark.parametrize("command, old, new, field", [
    ("extract", "--seed", "--data-seed", lambda c: c.data.data_seed),
    ("eval", "--seed", "--data-seed", lambda c: c.data.data_seed),
    ("distill", "--template", "--student-template", lambda c: c.student_template),
])
def test_old_spellings_of_unified_options_still_work(tmp_path, command, old, new, field):
    value = "cot" if "template" in new else "3"
    assert field(parse(command, old, value)[0]) == field(parse(command, new, value)[0]) == \
        (value if "template" in new else 3)
    key = old.lstrip("-").replace("-", "_")
    (tmp_path / "c.yaml").write_text(yaml.safe_dump({key: 3 if value == "3" else value}))
    assert field(parse(command, config_file=str(tmp_path / "c.yaml"))[0]) == field(parse(command, new, value)[0])
    other = "chat" if "template" in new else "4"  # a flag overrides YAML under either name
    assert field(parse(command, new, other, config_file=str(tmp_path / "c.yaml"))[0]) == \
        field(parse(command, new, other)[0])
    (tmp_path / "both.yaml").write_text(yaml.safe_dump({key: value, new.lstrip("-").replace("-", "_"): value}))
    with pytest.raises(ConfigError, match=f"Can't set both {old} and {new}.*Keep {new}"):
        parse(command, config_file=str(tmp_path / "both.yaml"))


def test_distill_seed_stays_the_training_seed():
    cfg = parse("distill", "--seed", "5", "--data-seed", "7")[0]
    assert (cfg.seed, cfg.data.data_seed) == (5, 7)


def test_list_options_are_parsed_once_from_a_flag_or_yaml(tmp_path):
    flags = parse("distill", "--store", "kv", "--teachers", "a, b", "--kv-layers", "0,2,3", "--attn-layers", "2",
                  "--loss", "structural", "--fusion-weights", "0.7,0.3", "--segment-weights", "prompt=0.5,answer=2")[0]
    assert (flags.teachers, flags.kv_layers, flags.attn_layers, flags.fusion_weights, flags.segment_weights) == \
        (["a", "b"], [0, 2, 3], [2], [0.7, 0.3], {"prompt": 0.5, "answer": 2.0})
    flags.validate()
    (tmp_path / "d.yaml").write_text(yaml.safe_dump({
        "store": "kv", "teachers": ["a", "b"], "kv_layers": [0, 2, 3], "attn_layers": 2, "loss": "structural",
        "fusion_weights": [0.7, 0.3], "segment_weights": {"prompt": 0.5, "answer": 2}}))
    assert parse("distill", config_file=str(tmp_path / "d.yaml"))[0] == flags
    q = parse("extract", "--with-q", "--q-layers", "0,5,9")[0]
    assert q.q_layers == [0, 5, 9]


@pytest.mark.parametrize("args, message", [
    (["--kv-layers", "0,x"], r"--kv-layers: expected integers like '0,2,3'. Got '0,x' instead."),
    (["--fusion-weights", "a"], r"--fusion-weights: expected numbers like '0.7,0.3'. Got 'a' instead."),
    (["--segment-weights", "body=2"], r"--segment-weights: expected name=weight with names in prompt"),
    (["--segment-weights", "answer=-1"], r"--segment-weights: expected weights >= 0. Got 'answer=-1'"),
])
def test_a_bad_list_is_reported_with_the_flag_by_validate(args, message):
    cfg = parse("distill", *args)[0]  # building never raises: validate() reports every problem at once
    with pytest.raises(ConfigError, match=message):
        cfg.validate()
    with pytest.raises(ConfigError, match=r"--q-layers: expected comma-separated layer numbers. Got '1,a'"):
        parse("extract", "--with-q", "--q-layers", "1,a")[0].validate()


def test_cluster_options_go_to_the_cluster_config_only(tmp_path):
    cfg, cluster = parse("extract", "--cluster", "local:2", "--slurm-cores", "8", "--limit", "5")
    assert cluster == ClusterConfig(cluster="local:2", slurm_cores=8) and cfg.data.limit == 5
    assert "cluster" not in cfg.to_dict()
    (tmp_path / "e.yaml").write_text(yaml.safe_dump({"scheduler": "tcp://h:8786", "limit": 4, "typo": 1}))
    with pytest.raises(ConfigError, match=r"Unknown option 'typo' in --config"):
        parse("extract", config_file=str(tmp_path / "e.yaml"))


def test_a_saved_config_yaml_reads_back_and_older_spellings_resume(tmp_path):
    cfg = DistillConfig(student="tiny-llama", out="o", store="kv", teachers="a", kv_layers="1,3",
                        segment_weights="answer=2", data=DataSource(limit=9))
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    back = parse("distill", config_file=str(tmp_path / "config.yaml"))[0]
    assert back == cfg and back.to_dict() == cfg.to_dict()
    assert cfg.resume_differences(cfg.to_dict()) == []
    # A config.yaml written when these options were strings and the template had its old key.
    old = {**cfg.to_dict(), "teachers": "a", "kv_layers": "1,3", "segment_weights": "answer=2",
           "template": "plain"}
    del old["student_template"]
    assert cfg.resume_differences(old) == []
    assert cfg.resume_differences({**cfg.to_dict(), "kv_layers": [1, 2], "progress": False}) == \
        ["--kv-layers: [1, 2] in the checkpoint, [1, 3] now"]


def test_every_off_switch_says_it_turns_its_option_off():
    """A bool that defaults to on is the flag --no-X; its help must not read as if the flag turned X on."""
    from kava.pipelines.cli import main

    def commands(group, ctx, prefix):
        for name in group.list_commands(ctx):
            command = group.get_command(ctx, name)
            if isinstance(command, click.Group):
                yield from commands(command, click.Context(command, parent=ctx), f"{prefix}{name} ")
            else:
                yield f"{prefix}{name}", command

    switches = {f"{name} {opt}": param.help or "" for name, command in commands(main, click.Context(main), "")
                for param in command.get_params(click.Context(command)) for opt in getattr(param, "opts", [])
                if opt.startswith("--no-")}
    assert {"extract --no-compress", "extract --no-progress", "distill --no-progress"} <= set(switches)
    wrong = {k: v for k, v in switches.items() if not v.startswith("Turn off")}
    assert not wrong, wrong


def test_group_options_read_write_and_build_flat_and_replace_copies_groups():
    """A grouped config is built, read and changed by the flat names its flags use; the groups stay its own."""
    import dataclasses

    cfg = DistillConfig(student="s", out="o", store="kv", lr=1e-3, logit_weight=0.5, fusion_weights="0.7,0.3")
    assert (cfg.trainer.lr, cfg.objective.logits.logit_weight, cfg.teacher_fusion.fusion_weights) == \
        (cfg.lr, cfg.logit_weight, cfg.fusion_weights) == (1e-3, 0.5, [0.7, 0.3])
    assert cfg == DistillConfig.from_dict(cfg.to_dict())
    other = dataclasses.replace(cfg, steps=4)
    other.kv_weight = 0.0  # written into other's objective group, not into cfg's
    assert (other.trainer.steps, other.objective.kv_weight, cfg.trainer.steps, cfg.objective.kv_weight) == \
        (4, 0.0, None, 1.0)
    with pytest.raises(TypeError, match="typo"):
        DistillConfig(student="s", out="o", typo=1)
