"""The shipped `chat-template` experiment's config: how it names assets and a teacher's chat template. (The run itself
takes a 151,646-token output layer through training, extraction and eval: about 40 s even shrunk, so it is run by
hand, docs/experiments.md; tests/test_chat_templates.py extracts under a chat template in process.)"""

from __future__ import annotations

import pytest
import yaml

from kava.core.errors import ConfigError
from kava.pipelines.config import configs_dir, load_config, parse_config

SYSTEM = "Solve the problem step by step. End with '#### <answer>'."


def test_the_config_names_assets_through_kava_assets_and_checks_the_teachers_template(monkeypatch):
    monkeypatch.setenv("KAVA_ASSETS", "/somewhere/assets")
    cfg = load_config(configs_dir() / "chat-template.yaml")
    assert cfg.data.data_files == "/somewhere/assets/gsm8k/train.jsonl"
    assert cfg.data.eval_files == "/somewhere/assets/gsm8k/test.jsonl"
    train = cfg.teacher("chat").train
    assert train is not None and train.tokenizer == "/somewhere/assets/tokenizers/qwen2"
    assert (train.template, train.system_prompt) == ("chat:tokenizer", SYSTEM)
    assert cfg.teacher("chat").extract["prompt_template"] == "chat:tokenizer"

    data = yaml.safe_load((configs_dir() / "chat-template.yaml").read_text())
    data["teachers"][0]["train"].update(tokenizer=None, template="chat:tokenizer")
    data["teachers"][0]["extract"].update(system_prompt="Be brief.", prompt_template="plain")
    data["teachers"].append({"name": "other", "train": {"template": "fancy", "system_prompt": "Hi"}})
    with pytest.raises(ConfigError, match=r"(?s)teachers\[chat\]\.train\.template: chat:tokenizer needs "
                                          r"teachers\[chat\]\.train\.tokenizer, one with a chat template.*"
                                          r"teachers\[chat\]\.extract: --system-prompt is for the chat:tokenizer "
                                          r"templates.*Expected teachers\[other\]\.train\.template to be one of "
                                          r"\['chat', 'cot', 'plain'\], chat:tokenizer or a template file.*"
                                          r"teachers\[other\]\.train\.system_prompt is for template chat:tokenizer"):
        parse_config(data)
