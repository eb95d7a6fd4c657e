"""``chat:tokenizer``: a tokenizer's own chat template as a prompt template, with exact segments.

The real Qwen2 tokenizer from the assets has a chat template (ChatML with a default system prompt); GPT-2's has
none. Rows are the assets' real GSM8K. A tiny seeded Llama saved with the Qwen2 tokenizer is the teacher of one
extraction, to check what the store records.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import asset_path

from kava.core.data import file_rows
from kava.core.errors import ConfigError
from kava.extract.config import ExtractConfig
from kava.extract.grid import build_grid
from kava.extract.recipe import run_extract
from kava.extract.templates import (
    SEGMENT_ANSWER,
    SEGMENT_PROMPT,
    SEGMENT_REASONING,
    SEGMENT_SPECIAL,
    TOKENIZER_CHAT,
    format_row,
    load_template,
    template_from_record,
    template_record,
)
from kava.kvstore import KVStore

ONE_TORCH_THREAD = True  # see conftest.one_torch_thread
SYSTEM = "You solve grade-school math problems. End with '#### <number>'."


@pytest.fixture(scope="module")
def qwen2():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(asset_path("tokenizers/qwen2"), local_files_only=True)


@pytest.fixture(scope="module")
def gpt2():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(asset_path("tokenizers/gpt2"), local_files_only=True)


@pytest.fixture(scope="module")
def gsm8k_rows():
    return file_rows(asset_path("gsm8k/test.jsonl"), split="test", limit=40)


def conversation(question: str, content: str | None, system: str | None = None) -> list[dict[str, str]]:
    turns = ([{"role": "system", "content": system}] if system is not None else []) + [
        {"role": "user", "content": question}]
    return turns + ([{"role": "assistant", "content": content}] if content is not None else [])


@pytest.mark.parametrize("system", [None, SYSTEM])
def test_the_qwen2_chat_template_formats_real_gsm8k_rows_exactly_as_the_tokenizer_renders_them(
        qwen2, gsm8k_rows, system):
    template = load_template(TOKENIZER_CHAT, tokenizer=qwen2, system_prompt=system)
    assert template.name == TOKENIZER_CHAT
    assert template.sha256 == hashlib.sha256(template.format.encode()).hexdigest()
    assert template.terminator == "<|im_end|>\n"
    for row in gsm8k_rows:
        formatted = format_row(row, template)
        content = f"{row.reasoning}\n#### {row.answer}"
        assert formatted.text == qwen2.apply_chat_template(conversation(row.question, content, system),
                                                           tokenize=False)
        # The generation prompt (where the assistant's answer starts) is everything before the reasoning.
        prompt = qwen2.apply_chat_template(conversation(row.question, None, system), tokenize=False,
                                           add_generation_prompt=True)
        assert prompt.endswith("<|im_start|>assistant\n")
        assert formatted.text[: formatted.spans["reasoning"][0]] == prompt
        assert formatted.spans["prompt"][0] < formatted.spans["reasoning"][0] < formatted.spans["answer"][0]
        assert (formatted.piece("prompt"), formatted.piece("reasoning"), formatted.piece("answer")) == (
            row.question, row.reasoning, row.answer)
        # The system prompt is the given one, or the template's default.
        head = formatted.text[: formatted.spans["prompt"][0]]
        assert (SYSTEM in head) if system else ("You are a helpful assistant" in head)


def test_every_token_of_the_qwen2_chat_grid_takes_the_segment_of_its_characters(qwen2, gsm8k_rows):
    """On the student grid, checked against a per-token reference: template glue belongs to the piece it precedes
    (the end of turn to the answer), so the text is cut into regions that end where pieces end, and a token takes
    the region holding most of its characters (a tie: the earlier); chat markers and EOS are special. The question
    and the answer are whole tokens of their own segment, and the tokens before the reasoning are the generation
    prompt."""
    template = load_template(TOKENIZER_CHAT, tokenizer=qwen2, system_prompt=SYSTEM)
    grid = build_grid(gsm8k_rows, qwen2, template, max_length=4096, on_too_long="skip")
    assert [s.status for s in grid] == ["ok"] * len(gsm8k_rows)
    markers = {qwen2.convert_tokens_to_ids(t) for t in ("<|im_start|>", "<|im_end|>", "<|endoftext|>")}
    codes = (SEGMENT_PROMPT, SEGMENT_REASONING, SEGMENT_ANSWER)
    for sample in grid:
        spans, seg, ids = sample.spans, sample.segment_ids, sample.input_ids
        ends = [sample.seg_spans[k][1] for k in ("prompt", "reasoning")]
        regions = [(0, ends[0]), (ends[0], ends[1]), (ends[1], len(sample.text))]
        want = []
        for token, (start, end) in zip(ids, spans):
            if token in markers or end <= start:
                want.append(SEGMENT_SPECIAL)
                continue
            overlap = [min(end, hi) - max(start, lo) for lo, hi in regions]
            want.append(codes[overlap.index(max(overlap))])  # index(): the first of equal overlaps
        np.testing.assert_array_equal(seg, np.array(want, np.uint8))
        assert np.isin(ids[seg == SEGMENT_SPECIAL], list(markers)).all()
        assert (ids[:-1] != qwen2.eos_token_id).all() and ids[-1] == qwen2.eos_token_id
        for key, code in (("prompt", SEGMENT_PROMPT), ("answer", SEGMENT_ANSWER)):
            a, b = sample.seg_spans[key]
            inside = (spans[:, 0] < b) & (spans[:, 1] > a)
            assert (seg[inside] == code).all()
            assert "".join(sample.text[s:e] for s, e in spans[inside]) == sample.text[a:b]
        a, b = sample.seg_spans["reasoning"]
        assert (seg[(spans[:, 0] >= a) & (spans[:, 1] <= b) & (spans[:, 1] > spans[:, 0])] == SEGMENT_REASONING).all()
        # The tokens before the reasoning are the generation prompt's, exactly (what `kava eval` prompts with); by
        # the segment rule the glue after the question (end of turn, "assistant" and its newline) is reasoning's,
        # as the plain template's "\nAnswer: " is.
        before = int((spans[:, 1] <= a).sum())
        prompt = qwen2.apply_chat_template(conversation(sample.row.question, None, SYSTEM), tokenize=False,
                                           add_generation_prompt=True)
        assert qwen2.decode(ids[:before]) == prompt and prompt.endswith("<|im_start|>assistant\n")
        glue = ids[int((spans[:, 1] <= sample.seg_spans["prompt"][1]).sum()):before]
        assert [int(x) for x in seg[: before][-len(glue):]] == [
            SEGMENT_SPECIAL if t in markers else SEGMENT_REASONING for t in glue]
        assert SYSTEM in qwen2.decode(ids[seg == SEGMENT_PROMPT])


def test_a_tokenizer_without_a_chat_template_is_refused_naming_the_flag_and_the_fix(gpt2):
    with pytest.raises(ConfigError, match=r"--prompt-template chat:tokenizer: expected the teacher's tokenizer to "
                                          r"have a chat template .*Got none\. Use plain, cot, chat or a template "
                                          r"file instead, or a tokenizer that ships a chat template\."):
        load_template(TOKENIZER_CHAT, tokenizer=gpt2, flag="--prompt-template", who="the teacher's tokenizer")
    with pytest.raises(ConfigError, match=r"--template chat:tokenizer needs the tokenizer"):
        load_template(TOKENIZER_CHAT)
    with pytest.raises(ConfigError, match=r"--system-prompt is for --template chat:tokenizer"):
        load_template("plain", system_prompt=SYSTEM)


def test_templates_that_change_or_drop_contents_are_refused_and_trimming_is_harmless(gpt2):
    tok = gpt2.__class__.from_pretrained(asset_path("tokenizers/gpt2"), local_files_only=True)
    turn = "{% for m in messages %}<|{{ m['role'] }}|>{{ CONTENT }}\n{% endfor %}"
    gen = "{% if add_generation_prompt %}<|assistant|>{% endif %}"
    tok.chat_template = turn.replace("CONTENT", "m['content'] | trim") + gen
    trimmed = load_template(TOKENIZER_CHAT, tokenizer=tok)  # rows never start or end with whitespace
    assert trimmed.format == "<|user|>{question}\n<|assistant|>{reasoning}\n#### {answer}\n"
    tok.chat_template = turn.replace("CONTENT", "m['content'] | replace('&', '&amp;')") + gen
    with pytest.raises(ConfigError, match=r"expected the tokenizer's chat template to keep message text as it is"):
        load_template(TOKENIZER_CHAT, tokenizer=tok)
    tok.chat_template = "{% for m in messages if m['role'] != 'system' %}{{ m['content'] }}\n{% endfor %}"
    with pytest.raises(ConfigError, match=r"expected the tokenizer's chat template to write each message once. Got "
                                          r"counts \{'question': 1, 'assistant answer': 1, 'system prompt': 0\}"):
        load_template(TOKENIZER_CHAT, tokenizer=tok, system_prompt=SYSTEM)
    tok.chat_template = turn.replace("CONTENT", "m['content']") + "{% if add_generation_prompt %}<|bot|>{% endif %}"
    with pytest.raises(ConfigError, match=r"expected the generation prompt '.*<\|bot\|>' to start the assistant's"):
        load_template(TOKENIZER_CHAT, tokenizer=tok)
    tok.chat_template = "{{ raise_exception('System role not supported') }}"
    with pytest.raises(ConfigError, match=r"chat template failed to render .*System role not supported"):
        load_template(TOKENIZER_CHAT, tokenizer=tok)


def test_a_rendered_template_is_recorded_with_its_text_and_read_back(qwen2):
    template = load_template(TOKENIZER_CHAT, tokenizer=qwen2, system_prompt=SYSTEM)
    assert template_record(template) == {"name": TOKENIZER_CHAT, "format": template.format}
    assert template_from_record(template_record(template)) == template
    assert template_record(load_template("plain")) == "plain"


def _tiny_teacher(path: Path, tokenizer) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=1024)
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def test_extract_with_a_chat_template_records_its_name_hash_and_text(
        tmp_path, qwen2, gsm8k_rows):
    teacher = _tiny_teacher(tmp_path / "chat-llama", qwen2)
    data = str(asset_path("gsm8k/test.jsonl"))
    common = dict(teacher=str(teacher), dataset=data, split="test", limit=3, calibration_samples=0, progress=False,
                  batch_size=1, system_prompt=SYSTEM)
    store = tmp_path / "kv.zarr"
    run_extract(ExtractConfig.from_dict(dict(common, store=str(store), student_template=TOKENIZER_CHAT)))
    kv = KVStore.open(store)
    details = kv.manifest.dataset.details
    want = load_template(TOKENIZER_CHAT, tokenizer=qwen2, system_prompt=SYSTEM)
    assert (details["student_template"], details["template_sha256"]) == (TOKENIZER_CHAT, want.sha256)
    assert details["student_template_format"] == want.format
    spec = kv.teachers["chat-llama"]
    assert (spec.details["prompt_template"], spec.details["template_sha256"]) == (TOKENIZER_CHAT, want.sha256)
    grid = build_grid(gsm8k_rows, qwen2, want, max_length=1024, on_too_long="truncate")[:3]
    for i, sample in enumerate(grid):
        rows = kv.read_sample(i, with_kv=False)
        np.testing.assert_array_equal(rows.input_ids, sample.input_ids)
        np.testing.assert_array_equal(rows.segment_ids, sample.segment_ids)


def test_extract_resolves_each_side_from_its_own_tokenizer(qwen2, gpt2):
    """--student-template from the student's tokenizer, --prompt-template from the teacher's (extraction resolves
    them right after loading the tokenizers, before the store is written); GPT-2 has no chat template."""
    cfg = ExtractConfig.from_dict(dict(teacher="chat-llama", store="kv.zarr", student_template="plain",
                                       prompt_template=TOKENIZER_CHAT, system_prompt=SYSTEM,
                                       student_tokenizer="gpt2-dir"))
    cfg.validate()
    student, teacher = cfg.resolve_templates(gpt2, qwen2)
    assert student == load_template("plain")
    assert teacher == load_template(TOKENIZER_CHAT, tokenizer=qwen2, system_prompt=SYSTEM)
    cfg = ExtractConfig.from_dict(dict(teacher="chat-llama", store="kv.zarr", student_template=TOKENIZER_CHAT,
                                       student_tokenizer="gpt2-dir"))
    with pytest.raises(ConfigError, match=r"--student-template chat:tokenizer: expected the student tokenizer "
                                          r"\(gpt2-dir\) to have a chat template"):
        cfg.resolve_templates(gpt2, qwen2)
    with pytest.raises(ConfigError, match=r"--system-prompt is for the chat:tokenizer templates"):
        ExtractConfig.from_dict(dict(teacher="t", store="s", system_prompt=SYSTEM)).validate()
