"""`kava eval`: answer extraction, prompts, batched generation and stopping, the whole run on real models."""

from __future__ import annotations

import json

import pytest
import torch

from kava.core.data import load_rows
from kava.core.errors import ConfigError
from kava.core.rows import ReasoningRow, parse_gsm8k_answer
from kava.distill.evaluate import (
    EvalConfig,
    answers_match,
    cut_after_answer,
    evaluate,
    extract_answer,
    generate_batched,
    prompt_text,
    resolve_template,
    run_eval,
    truncation_note,
)
from kava.extract.templates import TEMPLATES, format_row

STORIES = "models/stories260K_hf_derived"
ONE_TORCH_THREAD = True  # see conftest.one_torch_thread; greedy decoding is hundreds of tiny forwards


def _load(path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)


# ---------------------------------------------------------------------------------------------------------------------
# Answers


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("She makes 9 * 2 = $<<9*2=18>>18 every day.\n#### 18", "18"),
        ("#### 1,080", "1080"),
        ("#### 109,200,000", "109200000"),
        ("#### -3", "-3"),
        ("The temperature drops to -10 degrees.", "-10"),
        ("#### $2.50", "2.5"),
        ("#### 3.0", "3"),
        ("#### 0.00", "0"),
        ("#### -0", "0"),
        ("So the answer is 5.", "5"),
        ("It costs $1,234.", "1234"),
        ("He pays -$3 in fees.", "-3"),
        ("5-3=2", "2"),  # a minus between operands is not a sign
        ("3,4,5", "5"),  # a list, not a thousands group
        ("1,2345", "2345"),
        ("#### 72\n#### 9", "72"),  # the first answer line wins
        ("first 4 then 12\n#### 30 marbles.", None),  # the number runs on into words: not a terminated answer
        ("#### none, but 7 apples", "7"),  # a mark without a number: the last number
        ("####42", "42"),
        ("no number here", None),
        ("", None),
        ("#### ", None),
    ],
)
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected


def test_extract_answer_reads_every_real_gsm8k_answer(assets):
    """Every `#### N` line of GSM8K's test split (commas and negatives included) parses to the row's answer."""
    lines = assets("gsm8k/test.jsonl").read_text(encoding="utf-8").splitlines()
    assert len(lines) == 1319
    for line in lines:
        answer_text = json.loads(line)["answer"]
        _, gold = parse_gsm8k_answer(answer_text)
        predicted = extract_answer(answer_text)
        assert predicted == gold.replace(",", "")
        assert answers_match(predicted, gold)
        assert not answers_match(str(int(predicted) + 1), gold)


@pytest.mark.parametrize(
    ("pred", "gold", "expected"),
    [
        ("1080", "1,080", True),
        ("2.5", "2.50", True),
        ("18", "18", True),
        ("-3", "-3", True),
        ("3", "-3", False),
        ("18.0", "18", True),
        ("17", "18", False),
        (None, "18", False),
        ("yes", "yes", True),  # a gold answer with no number compares as text
    ],
)
def test_answers_match(pred, gold, expected):
    assert answers_match(pred, gold) is expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (" yes\n#### 42\n#### 42\n", " yes\n#### 42\n"),  # cut after the terminator, which is kept
        ("a = 3\n#### 1,080 \nQuestion: next", "a = 3\n#### 1,080 \n"),
        ("a = 3\n#### 1,080 marbles\nQuestion: next", "a = 3\n#### 1,080 marbles\nQuestion: next"),  # runs on
        ("#### 5.\nmore", "#### 5.\nmore"),
        ("#### 42", "#### 42"),  # stopped right after the number (EOS or budget): nothing to cut
        ("still thinking\n3 + 4 = 7\n", "still thinking\n3 + 4 = 7\n"),
        ("#### soon\n#### 7\nafter", "#### soon\n#### 7\n"),  # a mark without a number does not end the answer
        ("#### 12-3\n#### 9\nafter", "#### 12-3\n#### 9\n"),  # the first terminated answer
    ],
)
def test_cut_after_answer(text, expected):
    assert cut_after_answer(text) == expected


# ---------------------------------------------------------------------------------------------------------------------
# Prompts


@pytest.mark.parametrize("tokenizer", ["tokenizers/gpt2", "tokenizers/qwen2", STORIES])
@pytest.mark.parametrize("template", sorted(TEMPLATES))
def test_prompt_is_the_start_of_the_training_text(assets, tokenizer, template):
    """The prompt's text and its tokens are where the training text and its tokens start, up to the reasoning."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(assets(tokenizer))
    for row in load_rows("gsm8k", split="test", data_files=assets("gsm8k/test.jsonl"), limit=5):
        formatted = format_row(row, TEMPLATES[template])
        prompt = prompt_text(row, TEMPLATES[template])
        assert formatted.text.startswith(prompt)
        assert formatted.text[len(prompt) : formatted.spans["reasoning"][0]].strip(" ") == ""
        assert formatted.piece("prompt") in prompt
        ids = tok(prompt)["input_ids"]
        assert tok(formatted.text)["input_ids"][: len(ids)] == ids


# ---------------------------------------------------------------------------------------------------------------------
# Generation on the real pretrained model


def test_batched_generation_equals_one_at_a_time(assets):
    model, tok = _load(assets(STORIES))
    rows = load_rows("gsm8k", split="test", data_files=assets("gsm8k/test.jsonl"), limit=8)
    # Eight lengths, from a few tokens to a whole question, so every batch has left padding.
    prompts = [prompt_text(row, TEMPLATES["plain"])[: 12 + 30 * i] for i, row in enumerate(rows)]
    side = tok.padding_side
    alone = [generate_batched(model, tok, [p], batch_size=1, max_new_tokens=20)[0] for p in prompts]
    for batch_size in (3, 8):
        assert generate_batched(model, tok, prompts, batch_size=batch_size, max_new_tokens=20) == alone
    assert tok.padding_side == side
    assert all(alone)


def test_run_eval_on_the_real_model(assets, tmp_path):
    out = tmp_path / "items.jsonl"
    config = EvalConfig.from_dict(dict(model=str(assets(STORIES)), dataset="gsm8k",
                                       data_files=str(assets("gsm8k/test.jsonl")), limit=6, max_new_tokens=24,
                                       batch_size=4, out=str(out), progress=False, threads=1))
    result = run_eval(config)
    items = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert len(items) == result.n == 6
    assert [i["sample_id"] for i in items] == [f"gsm8k/test/{k:06d}" for k in range(6)]
    for item in items:
        assert set(item) >= {"sample_id", "question", "prompt", "generated", "predicted", "gold", "correct"}
        assert item["prompt"].startswith("Question: " + item["question"])
        assert item["predicted"] == extract_answer(item["generated"], ended=item["stop"] == "eos")
        assert item["stop"] in ("answer", "eos", "budget")
        assert item["correct"] == answers_match(item["predicted"], item["gold"])
        assert 1 <= item["generated_tokens"] <= 24
    assert result.correct == sum(i["correct"] for i in items)
    assert result.accuracy == pytest.approx(sum(i["correct"] for i in items) / 6)
    summary = result.to_dict()
    assert json.loads(json.dumps(summary)) == summary and "items" not in summary
    assert (summary["dataset"], summary["split"], summary["template"], summary["out"]) == \
        ("gsm8k", "test", "plain", str(out))
    assert summary["generated_tokens"] == sum(i["generated_tokens"] for i in items)
    assert list(tmp_path.iterdir()) == [out]  # the temporary file was renamed, not left behind


# ---------------------------------------------------------------------------------------------------------------------
# Stopping, on a model whose output is known


def _forced_model(tokenizer, chain: dict[str, str | None]):
    """A tiny Llama whose next token depends only on the current one: ``chain[token] = next token`` (None: EOS).

    The layers add nothing (zero output projections), so the last hidden state is the token's embedding; the chain's
    tokens get orthonormal embeddings and the LM head maps each onto its successor.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=256,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         tie_word_embeddings=False)
    model = LlamaForCausalLM(config).eval()
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in chain}
    basis = torch.linalg.qr(torch.randn(32, len(chain)))[0].T  # (len(chain), 32), orthonormal rows
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        model.lm_head.weight.zero_()
        for k, (token, successor) in enumerate(chain.items()):
            model.model.embed_tokens.weight[ids[token]] = basis[k]
            target = tokenizer.eos_token_id if successor is None else tokenizer.convert_tokens_to_ids(successor)
            model.lm_head.weight[target] += 10 * basis[k]
    return model


# ':' answers and then repeats its answer line forever; '?' never answers; '!' says " done" and ends (EOS).
CHAIN = {":": "Ġyes", "Ġyes": "Ċ", "Ċ": "####", "####": "Ġ42", "Ġ42": "Ċ", "?": "Ġno", "Ġno": "Ġno", "!": "Ġdone",
         "Ġdone": None}


def test_each_row_stops_at_its_own_end(assets, tmp_path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(assets("tokenizers/gpt2"))
    model = _forced_model(tok, CHAIN)
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)  # loaded back through the same path users take
    (tmp_path / "bare.txt").write_text("Q: {question}{reasoning}\n#### {answer}\n", encoding="utf-8")
    (tmp_path / "kava.json").write_text(json.dumps({"template": str(tmp_path / "bare.txt")}), encoding="utf-8")
    data = tmp_path / "rows.jsonl"
    questions = {"Say it:": "42", "How many?": "42", "Stop!": "7", "Tell me:": "41"}
    data.write_text("".join(json.dumps({"question": q, "answer": f"It is so.\n#### {a}"}) + "\n"
                            for q, a in questions.items()), encoding="utf-8")

    prompts = [f"Q: {q}" for q in questions]
    alone = [generate_batched(*_load(tmp_path), [p], batch_size=1, max_new_tokens=30)[0] for p in prompts]
    assert alone == [" yes\n#### 42\n", " no" * 30, " done", " yes\n#### 42\n"]
    assert generate_batched(*_load(tmp_path), prompts, batch_size=4, max_new_tokens=30) == alone

    result = run_eval(EvalConfig.from_dict(dict(model=str(tmp_path), dataset=str(data), max_new_tokens=30, batch_size=4,
                                 progress=False)))
    out = tmp_path / "eval-rows-test.jsonl"  # the default: beside the model
    assert result.out == str(out) and result.template == "bare"  # the template recorded in kava.json
    items = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    # Stopped at the answer line's newline (5 tokens), at the budget, and at EOS (counted).
    assert [i["generated_tokens"] for i in items] == [5, 30, 2, 5]
    assert [i["predicted"] for i in items] == ["42", None, None, "42"]
    assert [i["stop"] for i in items] == ["answer", "budget", "eos", "answer"]
    assert [i["correct"] for i in items] == [True, False, False, False]
    assert (result.n, result.correct, result.accuracy) == (4, 1, 0.25)
    assert result.generated_tokens == 42


# ---------------------------------------------------------------------------------------------------------------------
# Config


def test_config_reports_every_problem_at_once(tmp_path):
    config = EvalConfig.from_dict(dict(model="", dataset="synthetic", data_files="nowhere.jsonl", split="dev",
                                       batch_size=0, max_new_tokens=0, limit=-1, threads=0, template="fancy",
                                       device="tpu"))
    with pytest.raises(ConfigError, match=r"(?s)Found 9 problems.*--model.*--data-files is for --dataset gsm8k.*"
                                          r"--split: expected one of train, validation, test.*--template.*"
                                          r"--batch-size.*--max-new-tokens.*--limit.*--threads.*--device"):
        config.validate()
    with pytest.raises(ConfigError, match=r"^--dataset: expected synthetic, gsm8k, a JSONL/Parquet file, a folder "
                                          r"or a datasets id \(owner/name\)\. Got 'nowhere\.csv' instead\.$"):
        EvalConfig.from_dict(dict(model="m", dataset="nowhere.csv")).validate()
    EvalConfig(model="m").validate()


def test_template_and_output_defaults(tmp_path):
    config = EvalConfig.from_dict(dict(model=str(tmp_path), dataset="synthetic", split="validation"))
    assert resolve_template(config) is TEMPLATES["plain"]  # no kava.json
    assert config.out_path == tmp_path / "eval-synthetic-validation.jsonl"
    (tmp_path / "kava.json").write_text(json.dumps({"template": "cot", "other": 1}), encoding="utf-8")
    assert resolve_template(config) is TEMPLATES["cot"]
    assert resolve_template(EvalConfig(model=str(tmp_path), template="chat")) is TEMPLATES["chat"]
    (tmp_path / "kava.json").write_text("[1, 2]", encoding="utf-8")
    with pytest.raises(ConfigError, match="to hold a JSON object.*Pass --template"):
        resolve_template(config)
    assert EvalConfig(model="org/some-model").out_path.name == "eval-gsm8k-test.jsonl"


def test_prompt_of_a_row_without_reasoning():
    row = ReasoningRow("x/test/000000", "What is 2 + 2?", "", "4")
    assert prompt_text(row, TEMPLATES["plain"]) == "Question: What is 2 + 2?\nAnswer:"
    assert prompt_text(row, TEMPLATES["cot"]) == "Q: What is 2 + 2?\nA: Let's think step by step.\n"


def _labels_after_prompt(tokenizer, row, template):
    """input_ids and labels of one row for the model's own loss: every token that reaches past the prompt, and the
    EOS that ends every training sample."""
    text, cut = format_row(row, template).text, len(prompt_text(row, template))
    enc = tokenizer(text, return_offsets_mapping=True, return_tensors="pt")
    ids = torch.cat([enc["input_ids"], torch.tensor([[tokenizer.eos_token_id]])], dim=1)
    labels = ids.clone()
    spans = enc["offset_mapping"][0].tolist()
    first = next(i for i, (a, b) in enumerate(spans) if b > a and b > cut)
    labels[0, :first] = -100  # the prompt (and BOS) is not scored
    return ids, labels, text[cut:]


def test_reference_nll_equals_transformers_loss_on_the_completion_tokens(assets):
    """Batched, padded scoring equals the model's own loss row by row, with the prompt's labels masked."""
    from kava.distill.evaluate import reference_nll, reference_nll_items

    model, tokenizer = _load(assets(STORIES))
    rows = list(load_rows("synthetic", split="test", limit=5))
    template = TEMPLATES["plain"]
    batched = reference_nll(model, tokenizer, rows, template, batch_size=3)
    items = reference_nll_items(model, tokenizer, rows, template, batch_size=2)

    total, count = 0.0, 0
    for row, item in zip(rows, items):
        ids, labels, scored = _labels_after_prompt(tokenizer, row, template)
        n = int((labels[0, 1:] != -100).sum())
        with torch.no_grad():
            loss = model(input_ids=ids, labels=labels).loss
        assert (item.nats, item.tokens) == (pytest.approx(float(loss) * n, rel=1e-5), n)
        assert (item.chars, item.bytes) == (len(scored), len(scored.encode("utf-8")))
        total, count = total + float(loss) * n, count + n
    assert batched == pytest.approx(total / count, rel=1e-5)


@pytest.mark.parametrize("name", ["tokenizers/gpt2", "tokenizers/qwen2", "tokenizers/llama2", STORIES])
def test_every_tokenizer_scores_the_same_characters(assets, name):
    """The scored text is the continuation of the prompt under every tokenizer, its first word included (byte-level
    BPE fuses the space before it into ``ĠJanet``, SentencePiece into ``▁Jan``), so nats per character compare."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from kava.distill.evaluate import reference_nll_items

    tok = AutoTokenizer.from_pretrained(assets(name))
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32,
                                         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2)).eval()
    rows = list(load_rows("gsm8k", split="test", data_files=assets("gsm8k/test.jsonl"), limit=3))
    rows.append(ReasoningRow("x/test/000000", "Où est le café?", "Le café coûte 3 €.", "3"))  # bytes != chars
    template = TEMPLATES["plain"]
    items = reference_nll_items(model, tok, rows, template, batch_size=2)
    for row, item in zip(rows, items):
        ids, labels, scored = _labels_after_prompt(tok, row, template)
        assert scored == format_row(row, template).text[len(prompt_text(row, template)) :]
        assert scored.startswith(" " + row.reasoning[:3])
        assert (item.chars, item.bytes) == (len(scored), len(scored.encode("utf-8")))
        kept = ids[0, 1:][labels[0, 1:] != -100].tolist()
        assert tok.decode(kept, skip_special_tokens=True).strip() == scored.strip()  # the first word is scored
        assert item.tokens == len(kept)
    assert items[-1].bytes > items[-1].chars


def test_run_eval_writes_the_nll_of_every_item(assets, tmp_path):
    from transformers import AutoTokenizer

    from kava.extract.grid import tokenizer_fingerprint

    out = tmp_path / "items.jsonl"
    result = run_eval(EvalConfig.from_dict(dict(model=str(assets(STORIES)), dataset="synthetic", split="test", limit=5,
                                           max_new_tokens=4, batch_size=2, out=str(out), progress=False, threads=1,
                                           nll=True)))
    items = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    nats = sum(i["nll_nats"] for i in items)
    assert all(i["nll_tokens"] > 0 and i["nll_chars"] > 0 and i["nll_bytes"] >= i["nll_chars"] for i in items)
    assert result.reference_nll == pytest.approx(nats / sum(i["nll_tokens"] for i in items), rel=1e-12)
    assert result.reference_nll_per_char == pytest.approx(nats / sum(i["nll_chars"] for i in items), rel=1e-12)
    assert result.reference_nll_per_byte == pytest.approx(nats / sum(i["nll_bytes"] for i in items), rel=1e-12)
    assert result.nll_tokenizer == tokenizer_fingerprint(AutoTokenizer.from_pretrained(assets(STORIES)))
    # Without --nll nothing is scored and the items say so.
    plain = run_eval(EvalConfig.from_dict(dict(model=str(assets(STORIES)), dataset="synthetic", split="test", limit=2,
                                          max_new_tokens=4, out=str(out), progress=False, threads=1)))
    assert plain.reference_nll is None and plain.nll_tokenizer is None
    assert all(json.loads(line)["nll_nats"] is None for line in out.read_text(encoding="utf-8").splitlines())


# ---------------------------------------------------------------------------------------------------------------------
# Only a terminated answer counts


@pytest.mark.parametrize(
    ("text", "ended", "terminator", "expected"),
    [
        ("#### 12\n", False, "", "12"),  # a newline ends it
        ("#### 12 \t\nmore", False, "", "12"),
        ("#### 12", True, "", "12"),  # the model wrote EOS right after it
        ("#### 12", False, "", None),  # cut by the token budget: the next token might have been a digit
        ("#### 122-92=", True, "", None),  # runs on: for gold 12 this must not score
        ("#### 12-92=80\n", True, "", None),  # "12" runs on into "-"
        ("#### 12 marbles\n", True, "", None),
        ("#### 12.\n", True, "", None),
        ("#### 12<|im_end|>", False, "<|im_end|>", "12"),  # the template's terminator, written as text
        ("#### 12<|im_end|>", True, "", None),  # ... but only that template's
        ("#### 12-3\n#### 9\n", False, "", "9"),  # the first terminated answer
        ("So it is 12", True, "", "12"),  # no mark: the last number of a text that ended
        ("So it is 12", False, "", None),  # ... not of one cut short
    ],
)
def test_only_a_terminated_answer_is_credited(text, ended, terminator, expected):
    assert extract_answer(text, ended=ended, terminator=terminator) == expected
    if expected is None:
        assert not answers_match(extract_answer(text, ended=ended, terminator=terminator), "12")


def _rows(*golds):
    return [ReasoningRow(f"t/{i}", "Say it", "It is so.", gold) for i, gold in enumerate(golds)]


def test_a_run_on_answer_is_never_credited(assets):
    """' yes\\n#### 12-9= yes\\n...': its answer line once scored 12; now it is no answer and runs to the budget."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(assets("tokenizers/gpt2"))
    model = _forced_model(tok, {":": "Ġyes", "Ġyes": "Ċ", "Ċ": "####", "####": "Ġ12", "Ġ12": "-", "-": "9",
                                "9": "=", "=": "Ġyes"})
    result = evaluate(model, tok, _rows("12"), TEMPLATES["plain"], batch_size=1, max_new_tokens=30)
    (item,) = result.items
    assert item.generated.startswith(" yes\n#### 12-9= yes\n#### 12-9=")
    assert (item.stop, item.generated_tokens, item.predicted, item.correct) == ("budget", 30, None, False)


def test_eos_right_after_the_number_is_credited_but_the_budget_is_not(assets):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(assets("tokenizers/gpt2"))
    model = _forced_model(tok, {":": "####", "####": "Ġ12", "Ġ12": None})  # "#### 12" then EOS
    ended = evaluate(model, tok, _rows("12"), TEMPLATES["plain"], batch_size=1, max_new_tokens=10).items[0]
    assert (ended.generated, ended.stop, ended.generated_tokens, ended.correct) == ("#### 12", "eos", 3, True)
    # The same text cut by --max-new-tokens before the EOS: "#### 12" might have gone on "3".
    result = evaluate(model, tok, _rows("12", "12"), TEMPLATES["plain"], batch_size=1, max_new_tokens=2)
    cut = result.items[0]
    assert (cut.generated, cut.stop, cut.generated_tokens, cut.predicted) == ("#### 12", "budget", 2, None)
    assert (result.budget_stops, result.max_new_tokens) == (2, 2)
    assert "2 of 2 generations (100%) stopped at the 2-token budget" in result.truncation_note()


def test_truncation_note_warns_above_five_percent_and_names_the_fix():
    assert truncation_note(5, 100, 64) is None  # 5% is tolerated: a model that rambles on a few problems
    assert truncation_note(0, 0, 64) is None
    note = truncation_note(6, 100, 64, 121, option="`eval.max_new_tokens`")
    assert note == ("6 of 100 generations (6%) stopped at the 64-token budget before an answer and count as wrong "
                    "(the longest reference solution is 121 tokens): the accuracy measures the budget as much as the "
                    "model. Raise `eval.max_new_tokens`.")
    assert truncation_note(200, 300, 64).endswith("Raise --max-new-tokens.")


def test_chat_stops_on_the_im_end_token(assets):
    """Qwen2 writes chat's terminator as one special token: generation stops on it as on EOS, and it scores."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(assets("tokenizers/qwen2"))
    assert "<|im_end|>" not in tok.eos_token  # not the tokenizer's EOS: the template makes it a stop
    # After the prompt's "assistant\n": "#### 12<|im_end|>", then (were it not stopped) "\n" and round again.
    model = _forced_model(tok, {"Ċ": "####", "####": "Ġ", "Ġ": "1", "1": "2", "2": "<|im_end|>", "<|im_end|>": "Ċ"})
    item = evaluate(model, tok, _rows("12"), TEMPLATES["chat"], batch_size=1, max_new_tokens=20).items[0]
    assert (item.generated, item.stop, item.generated_tokens, item.correct) == ("#### 12", "eos", 5, True)


def test_the_stop_check_decodes_lines_not_the_whole_continuation(assets):
    """``AnswerStop`` stops where the naive check (decode everything generated, every step) does, while decoding
    about one line per newline instead of the whole continuation per step."""
    from transformers import AutoTokenizer

    from kava.distill.evaluate import AnswerStop, answer_pattern

    tok = AutoTokenizer.from_pretrained(assets("tokenizers/gpt2"))
    texts = ["a = 1\nb = 22 + 3 = 25\n#### 12-3= 4\nmore words here to make it long\n#### 7\nafter that",
             "x" * 40 + "\n#### 122-92=30 and on\n#### 1,080 \nlater\n#### 5\n",
             "no answer at all, only words " * 6,
             "#### 3<|im_end|>trailing"]
    decoded = []

    class Counting:  # the tokenizer, counting how many tokens each decode call reads
        def decode(self, ids, **kwargs):
            decoded.append(len(ids))
            return tok.decode(ids, **kwargs)

    for terminator in ("", "<|im_end|>"):
        seqs = [tok(t)["input_ids"] for t in texts]
        width, steps = 3, max(map(len, seqs))
        ids = torch.zeros(len(seqs), width + steps, dtype=torch.long)
        for r, seq in enumerate(seqs):
            ids[r, width : width + len(seq)] = torch.tensor(seq)
            ids[r, width + len(seq) :] = tok.convert_tokens_to_ids("x")
        decoded.clear()
        stop = AnswerStop(Counting(), width, len(seqs), terminator)
        for step in range(1, steps + 1):
            stop(ids[:, : width + step], None)
        for r in range(len(seqs)):
            padded = ids[r, width:].tolist()
            naive = next((k for k in range(1, steps + 1)
                          if answer_pattern(terminator, ended=False).search(tok.decode(padded[:k]))), None)
            assert stop.stopped_at[r] == naive, (terminator, texts[r])
        assert stop.stopped_at[0] is not None and stop.stopped_at[2] is None
        assert (stop.stopped_at[3] is not None) == (terminator != "")
        naive_cost = sum(range(1, steps + 1)) * len(seqs)
        assert sum(decoded) < naive_cost / 5, (sum(decoded), naive_cost)


def _greedy_then_cut(model, tok, prompt: str, max_new_tokens: int, terminator: str) -> tuple[str, int, str]:
    """The reference for kava's generation loop: plain ``model.generate`` greedy on the prompt alone, with no stop
    criterion, then cut by hand where kava must stop: after the first token whose continuation holds a terminated
    answer (the whole continuation decoded at every length), or after the first EOS, or at the budget."""
    from kava.distill.evaluate import answer_pattern

    ids = tok(prompt, add_special_tokens=True)["input_ids"]
    eos = tok.eos_token_id
    with torch.no_grad():
        out = model.generate(input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                             max_new_tokens=max_new_tokens, do_sample=False, num_beams=1, eos_token_id=None,
                             pad_token_id=eos)
    tokens = out[0, len(ids):].tolist()
    assert len(tokens) == max_new_tokens  # no stop criterion: the whole budget
    head = tok.decode(ids, skip_special_tokens=True)

    def text(n: int) -> str:
        return tok.decode(ids + tokens[:n], skip_special_tokens=True)[len(head):]

    answered = next((n for n in range(1, len(tokens) + 1)
                     if answer_pattern(terminator, ended=False).search(text(n))), None)
    at_eos = next((n + 1 for n, t in enumerate(tokens) if t == eos), None)
    if answered is not None and (at_eos is None or answered < at_eos):
        n, why = answered, "answer"
    elif at_eos is not None:
        n, why = at_eos, "eos"
    else:
        n, why = len(tokens), "budget"
    return cut_after_answer(text(n), terminator), n, why


@pytest.mark.parametrize("batch_size", [1, 4])
def test_kava_generation_is_plain_greedy_generation_cut_at_the_stop(assets, tmp_path, batch_size):
    """Texts, token counts and stop reasons of the generation loop equal ``model.generate``'s greedy tokens cut at
    the stop point, on the forced model (answers, EOS, budget) and on the real stories260K over synthetic prompts."""
    from transformers import AutoTokenizer

    from kava.core.synthetic import synthetic_rows
    from kava.distill.evaluate import generate_with_stops

    tok = AutoTokenizer.from_pretrained(assets("tokenizers/gpt2"))
    _forced_model(tok, CHAIN).save_pretrained(tmp_path / "forced")
    tok.save_pretrained(tmp_path / "forced")
    forced = ["Q: Say it:", "Q: How many?", "Q: Stop!", "Q: Tell me:", "Q: ?!:"]
    stories_prompts = [prompt_text(row, TEMPLATES["plain"]) for row in synthetic_rows(6, seed=3, split="test")]
    for path, prompts in ((tmp_path / "forced", forced), (assets(STORIES), stories_prompts)):
        model, tokenizer = _load(path)
        got = generate_with_stops(model, tokenizer, prompts, batch_size=batch_size, max_new_tokens=24,
                                  terminator="\n")
        want = [_greedy_then_cut(model, tokenizer, p, 24, "\n") for p in prompts]
        assert got == want
    assert {why for _, _, why in got} | {why for _, _, why in
                                         generate_with_stops(*_load(tmp_path / "forced"), forced,
                                                             batch_size=batch_size, max_new_tokens=24,
                                                             terminator="\n")} >= {"answer", "eos", "budget"}
