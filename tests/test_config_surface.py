"""The option surface users and files depend on, pinned: every flag of every `kava` command (name, spellings,
type, default, help, order), every option a config accepts, and what a config writes (a run's ``config.yaml``,
the flags a rendered job passes, the stage configs `kava run` builds, the problems ``validate()`` reports).

How the config classes are built inside may change; this may not, unless on purpose. After an intended change to
the surface, regenerate the snapshot and review its diff:

    python tests/test_config_surface.py --update
"""

from __future__ import annotations

import dataclasses
import json
import sys
import typing
from pathlib import Path
from typing import Any

import click
import pytest
import yaml

SNAPSHOT = Path(__file__).parent / "data" / "config_surface.json"

RICH_DISTILL = [
    "--student", "tiny-llama", "--out", "runs/x", "--store", "kv.zarr", "--teachers", "a,b", "--kv-layers", "0,2",
    "--attn-layers", "2", "--allow-incomplete", "--dataset", "gsm8k", "--split", "test", "--limit", "7",
    "--data-files", "g.jsonl", "--data-seed", "3", "--strip-calculator", "--template", "cot", "--max-length", "256",
    "--lora-r", "4", "--lora-alpha", "8", "--lora-targets", "q_proj,v_proj", "--projector", "flat",
    "--no-init-uniform", "--share-dim-proj", "--project", "teacher", "--loss", "structural", "--alpha-k", "0.5",
    "--alpha-v", "0.25", "--alpha-attn", "2", "--kv-weight", "0.7", "--ce-weight", "0.9", "--logit-weight", "0.3",
    "--ce-on", "all", "--segment-weights", "prompt=0.5,answer=2", "--fusion", "fixed", "--fusion-weights", "0.7,0.3",
    "--fusion-temperature", "0.2", "--router-hidden", "32", "--steps", "12", "--batch-size", "3", "--max-tokens",
    "900", "--grad-accum", "2", "--lr", "1e-3", "--weight-decay", "0.05", "--warmup-steps", "2", "--min-lr-ratio",
    "0.2", "--max-grad-norm", "0.5", "--seed", "9", "--workers", "1", "--buffer-shards", "2", "--device", "cpu",
    "--precision", "fp32", "--checkpoint-every", "5", "--keep-checkpoints", "3", "--resume", "--log-every", "2",
    "--tensorboard", "--no-progress", "--threads", "2", "--trust-remote-code",
]
RICH_EXTRACT = [
    "--teacher", "qwen-7b-4bit", "--store", "kv.zarr", "--name", "q7", "--dataset", "gsm8k", "--split", "test",
    "--limit", "9", "--data-files", "g.jsonl", "--seed", "4", "--student-template", "cot", "--prompt-template", "chat",
    "--student-tokenizer", "tok", "--student", "s", "--load-in-4bit", "--dtype", "bfloat16",
    "--device", "cuda", "--revision", "main", "--trust-remote-code", "--with-q", "--q-layers", "1,3",
    "--logit-top-k", "8", "--k-rope", "post", "--layer-map", "cka", "--cka-top-k", "3", "--calibration-samples",
    "16", "--alignment", "hard", "--kv-dtype", "int8", "--no-compress", "--max-length", "300", "--on-too-long",
    "skip", "--on-nonfinite", "error", "--batch-size", "4", "--shard-tokens", "4096", "--resume", "--shard", "1/4",
    "--teacher-generates", "--max-new-tokens", "64", "--no-progress", "--threads", "3",
]
RICH_EVAL = ["--model", "m", "--dataset", "synthetic", "--split", "test", "--limit", "5", "--difficulty", "easy",
             "--batch-size", "3", "--max-new-tokens", "20", "--device", "cpu", "--no-progress"]
BAD_DISTILL = {
    "student": "tiny-llama", "out": "", "loss": "cosine", "fusion": "vote", "projector": "deep", "project": "both",
    "ce_on": "none", "precision": "fp8", "batch_size": 0, "grad_accum": 0, "buffer_shards": 0, "workers": -1,
    "checkpoint_every": -1, "log_every": 0, "keep_checkpoints": 0, "max_length": 1, "router_hidden": 0, "steps": 3,
    "epochs": 2, "max_tokens": 0, "threads": 0, "layers": 0, "lora_r": -1, "warmup_steps": -1, "alpha_k": -1,
    "alpha_v": -1, "alpha_attn": -1, "kv_weight": -1, "ce_weight": 0, "logit_weight": 1.0, "weight_decay": -1,
    "max_grad_norm": -1, "lr": 0, "min_lr_ratio": 2, "fusion_temperature": 0, "fusion_weights": "0.5,x",
    "teachers": "a", "kv_layers": "1,1", "attn_layers": "4", "tokenizer": "t", "device": "tpu", "limit": 0,
    "difficulty": "steps=9", "segment_weights": "body=2",
}
BAD_EXTRACT = {
    "teacher": "t", "store": "", "name": "../x", "load_in_4bit": True, "load_in_8bit": True, "kv_dtype": "int3",
    "k_rope": "mid", "alignment": "fuzzy", "on_too_long": "wrap", "on_nonfinite": "ignore", "batch_size": 0,
    "max_length": 1, "shard_tokens": 0, "cka_top_k": 0, "calibration_samples": 2, "max_new_tokens": 0,
    "logit_top_k": -1, "threads": 0, "limit": 0, "student_layers": 0, "student": "s", "layer_map": "cka",
    "q_layers": "1,a", "shard": "4/4", "dataset": "gsm8k", "difficulty": "easy",
}


def _plain(value: Any) -> Any:
    """``value`` as JSON holds it: containers element-wise, anything else that JSON lacks by its repr."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return repr(value)


def _commands() -> dict[str, tuple[click.Command, click.Context]]:
    from kava.pipelines.cli import main

    def walk(group: click.Group, ctx: click.Context, prefix: str):
        for name in group.list_commands(ctx):
            command = group.get_command(ctx, name)
            sub = click.Context(command, parent=ctx, **command.context_settings)  # as `kava` makes it: -h too
            yield f"{prefix}{name}", (command, sub)
            if isinstance(command, click.Group):
                yield from walk(command, sub, f"{prefix}{name} ")

    root = click.Context(main, **main.context_settings)
    return {"": (main, root), **dict(walk(main, root, ""))}


def _parse(command: str, args: list[str]) -> tuple:
    """``args`` through the real `kava <command>` click command into its config classes, as `kava` builds them."""
    from kava.distill.config import DistillConfig
    from kava.distill.evaluate import EvalConfig
    from kava.extract.config import ExtractConfig
    from kava.pipelines.cli import main
    from kava.pipelines.cluster_config import ClusterConfig
    from kava.pipelines.options import build_configs

    classes = {"extract": (ExtractConfig, ClusterConfig), "distill": (DistillConfig,), "eval": (EvalConfig,)}
    ctx = click.Context(main)
    cmd = main.get_command(ctx, command)
    with cmd.make_context(command, list(args), parent=ctx) as sub:
        values = {k: v for k, v in sub.params.items() if k not in ("list_teachers", "as_json", "config_file",
                                                                     "nproc")}
    return build_configs(classes[command], values, None)


def _problems(cls: type, options: dict[str, Any]) -> str:
    from kava.core.errors import ConfigError

    try:
        cls.from_dict(options).validate()
    except ConfigError as e:
        return str(e)
    return ""


def surface(tmp: Path) -> dict[str, Any]:
    """Everything the snapshot pins (``tmp``: a scratch directory for the written config.yaml)."""
    from kava.core.config import config_fields, option_names
    from kava.core.safe_yaml import load_yaml
    from kava.distill.config import DistillConfig
    from kava.distill.evaluate import EvalConfig
    from kava.distill.outputs import write_config
    from kava.extract.config import ExtractConfig
    from kava.pipelines.cluster_config import ClusterConfig
    from kava.pipelines.config import (
        RunConfig,
        configs_dir,
        distill_configs,
        load_config,
        shipped_configs,
        stage_distill_config,
        stage_extract_config,
    )
    from kava.pipelines.latent_run import parse_latent_config
    from kava.pipelines.slurm import config_flags

    out: dict[str, Any] = {"commands": {}, "configs": {}, "written": {}, "run": {}}
    for name, (command, ctx) in _commands().items():
        # click's own --help option is left out: click caches it per command from whichever context asked first.
        params = [_plain(p.to_info_dict()) for p in command.params]
        out["commands"][name] = {"help": command.help, "help_options": ctx.help_option_names, "params": params}

    for cls in (ExtractConfig, ClusterConfig, DistillConfig, EvalConfig):
        fields = [[c.name, str(c.hint), None if c.required else _plain(c.default), c.required]
                  for c in config_fields(cls)]
        out["configs"][cls.__name__] = {"options": fields, "aliases": _plain(getattr(cls, "ALIASES", {})),
                                        "accepted": sorted(option_names(cls))}

    def yaml_of(cfg: Any) -> str:
        return yaml.safe_dump(cfg.to_dict(), sort_keys=False)

    for label, args in (("distill-minimal", ["--student", "tiny-llama", "--out", "o"]), ("distill-rich", RICH_DISTILL)):
        cfg = _parse("distill", args)[0]
        where = tmp / label
        where.mkdir()
        write_config(cfg, where)
        out["written"][f"{label}/config.yaml"] = (where / "config.yaml").read_text()
        out["written"][f"{label}/flags"] = config_flags(cfg)
        back = DistillConfig.from_dict(yaml.safe_load((where / "config.yaml").read_text()))
        assert back == cfg and back.resume_differences(cfg.to_dict()) == []
    for label, args in (("extract-minimal", ["--teacher", "t", "--store", "s"]), ("extract-rich", RICH_EXTRACT)):
        cfg = _parse("extract", args)[0]
        out["written"][f"{label}/to_dict"] = yaml_of(cfg)
        out["written"][f"{label}/flags"] = config_flags(cfg)
    for label, args in (("eval-minimal", ["--model", "m"]), ("eval-rich", RICH_EVAL)):
        out["written"][f"{label}/to_dict"] = yaml_of(_parse("eval", args)[0])
    out["written"]["distill-problems"] = _problems(DistillConfig, BAD_DISTILL)
    out["written"]["extract-problems"] = _problems(ExtractConfig, BAD_EXTRACT)

    # `kava run`: its sections, and the stage configs each shipped config's extract:/distill: sections build.
    def sections(cls: type) -> dict[str, Any]:
        hints = typing.get_type_hints(cls)
        return {f.name: sections(hints[f.name]) if dataclasses.is_dataclass(hints[f.name]) else str(hints[f.name])
                for f in dataclasses.fields(cls)}

    out["run"]["sections"] = sections(RunConfig)
    for name in distill_configs():
        run = load_config(configs_dir() / f"{name}.yaml")
        stages = {f"extract {t.name}": yaml_of(stage_extract_config(run, t, model=t.model or "trained"))
                  for t in run.teachers}
        stages.update({f"distill {v.name}": yaml_of(stage_distill_config(run, v, seed=run.seeds[0], store="kv.zarr",
                                                                         out="o")) for v in run.variants})
        out["run"][name] = stages
    for name in sorted(set(shipped_configs()) - set(distill_configs())):  # kind: latent
        data = load_yaml((configs_dir() / f"{name}.yaml").read_text(), name)
        with pytest.MonkeyPatch.context() as env:  # $KAVA_ASSETS stays as written: no machine's path in the snapshot
            env.delenv("KAVA_ASSETS", raising=False)
            latent = parse_latent_config(data, source=name)
        out["run"][name] = {f"latent {v.name}": yaml_of(latent.student_config(v, latent.seeds[0]))
                            for v in latent.variants}
    return json.loads(json.dumps(out))


def test_the_option_surface_matches_the_snapshot(tmp_path):
    expected = json.loads(SNAPSHOT.read_text())
    actual = surface(tmp_path)
    for section in ("commands", "configs", "written", "run"):
        for key in sorted(set(expected[section]) | set(actual[section])):
            assert actual[section].get(key) == expected[section].get(key), f"{section}: {key}"
    assert actual == expected


if __name__ == "__main__" and sys.argv[1:] == ["--update"]:
    import tempfile

    with tempfile.TemporaryDirectory() as scratch:
        SNAPSHOT.parent.mkdir(exist_ok=True)
        SNAPSHOT.write_text(json.dumps(surface(Path(scratch)), indent=1, ensure_ascii=False) + "\n")
    print(f"wrote {SNAPSHOT}")
