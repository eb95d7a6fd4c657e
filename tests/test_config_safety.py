"""A hostile or unlucky `kava run` config: YAML aliases, huge files and names that are paths are refused before
anything runs, with short messages."""

from __future__ import annotations

import subprocess

import pytest
import yaml
from helpers import ENV, KAVA

from kava.core.errors import ConfigError
from kava.pipelines.config import MAX_CONFIG_BYTES, configs_dir, load_config, parse_config

BOMB = "\n".join(["a: &a [x, x, x, x, x, x, x, x, x]"]
                 + [f"{chr(98 + i)}: &{chr(98 + i)} [{', '.join(['*' + chr(97 + i)] * 9)}]" for i in range(6)]
                 + ["name: *g", "seeds: *g"])


def test_a_yaml_alias_bomb_is_refused_at_once_with_a_short_message(tmp_path):
    path = tmp_path / "bomb.yaml"
    path.write_text(BOMB)
    with pytest.raises(ConfigError, match=r"not valid YAML at line 2, column \d+: found the alias \*a; configs may not "
                                          r"use YAML aliases: write the value out\.$") as info:
        load_config(path)
    assert len(str(info.value)) < 400


def test_a_file_too_large_to_be_a_config_is_refused(tmp_path):
    path = tmp_path / "huge.yaml"
    path.write_text("# " + "x" * MAX_CONFIG_BYTES)
    with pytest.raises(ConfigError, match=r"huge\.yaml: 1,048,578 bytes; a config is at most 1,048,576"):
        load_config(path)


@pytest.mark.parametrize("field, value", [("name", ".."), ("name", "/tmp/x"), ("variant", "/tmp/evil"),
                                          ("variant", "../../outside"), ("teacher", "a/b"), ("variant", "x" * 5000)])
def test_names_that_would_point_outside_the_run_folder_are_refused(field, value):
    cfg = yaml.safe_load((configs_dir() / "default.yaml").read_text())
    if field == "name":
        cfg["name"] = value
    elif field == "variant":
        cfg["variants"][1]["name"] = value
        cfg["baseline"] = "ce"
    else:
        cfg["teachers"][0]["name"] = value
        cfg["variants"][1]["teachers"] = [value]
    plural = {"name": "name", "variant": "variants", "teacher": "teachers"}[field]
    with pytest.raises(ConfigError, match=rf"{plural}: expected a name of letters, digits and '\._\+-'") as info:
        parse_config(cfg)
    assert len(str(info.value)) < 2000  # a 5,000-character name is cut in the message


@pytest.mark.integration
def test_check_refuses_a_variant_named_with_an_absolute_path_and_writes_nothing(tmp_path):
    cfg = yaml.safe_load((configs_dir() / "default.yaml").read_text())
    cfg["out"] = str(tmp_path / "runs")
    cfg["variants"][1]["name"] = str(tmp_path / "victim")
    (tmp_path / "victim" / "seed-42").mkdir(parents=True)
    (tmp_path / "victim" / "seed-42" / "keep.txt").write_text("mine")
    path = tmp_path / "evil.yaml"
    path.write_text(yaml.safe_dump(cfg))
    for args in (["--check"], []):
        proc = subprocess.run([*KAVA, "run", str(path), *args], capture_output=True, text=True, env=ENV, timeout=120)
        assert proc.returncode != 0 and "variants: expected a name of letters" in proc.stderr
        assert "Traceback" not in proc.stderr
    assert (tmp_path / "victim" / "seed-42" / "keep.txt").read_text() == "mine"
    assert not (tmp_path / "runs").exists()


def test_numbers_in_yaml_for_text_options_are_taken_as_their_text():
    """`kv_budget: 0.25` (YAML reads a float) means the flag's '0.25', not a type error; a bool stays an error."""
    cfg = yaml.safe_load((configs_dir() / "compression.yaml").read_text())
    cfg["teachers"][1]["extract"]["kv_budget"] = 0.25
    cfg["teachers"][2]["extract"]["kv_budget"] = 64
    run = parse_config(cfg)
    assert [run.teacher(cfg["teachers"][i]["name"]).extract["kv_budget"] for i in (1, 2)] == ["0.25", "64"]
    cfg["teachers"][2]["extract"]["kv_budget"] = True
    with pytest.raises(ConfigError, match=r"kv_budget: expected str. Got True instead"):
        parse_config(cfg)
