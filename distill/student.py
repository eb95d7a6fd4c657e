"""The student: a Hugging Face causal LM from a directory or hub id, or a small preset initialised at random.

Presets (``tiny-qwen2``, ``tiny-llama``) are built from a config on the store's own student tokenizer, the one the
grid was cut with, so their vocabulary is the grid's by construction. Their layer count is taken from the store's
layer map (every student layer has its teacher targets); without a store it is the preset's own.

LoRA goes through peft (``--lora-r``): the adapters are injected into the model's own linear layers, so the model
that runs forward — and whose attention the capture records — is still the transformers model, with the adapters
inside it.

`kava run` checks its config before anything loads and reads ``PRESETS`` to do it, so torch and transformers are
imported inside the functions that build a model, and peft (seconds to import) only under ``--lora-r``.
"""

from __future__ import annotations

import copy
import tempfile
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from kava.core.errors import ConfigError, SchemaError
from kava.core.models import load_model, load_tokenizer, resolve_model
from kava.kvstore.manifest import is_plain_name

if TYPE_CHECKING:  # types only: peft and transformers load with a model (module docstring)
    from peft import PeftModel
    from transformers import PretrainedConfig, PreTrainedModel, PreTrainedTokenizerBase

PRESETS: dict[str, dict[str, Any]] = {
    # Small enough to train on a laptop CPU in minutes; GQA on the Qwen2 one, plain MHA on the Llama one.
    "tiny-qwen2": dict(arch="qwen2", hidden_size=128, intermediate_size=352, num_hidden_layers=4,
                       num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True),
    "tiny-llama": dict(arch="llama", hidden_size=128, intermediate_size=352, num_hidden_layers=4,
                       num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=True),
}
"""Embedded student presets: random initialisation from these config values."""


@dataclass
class Student:
    """A loaded student. ``model`` is what the optimiser trains (a peft model under LoRA); ``inner`` is the
    transformers model inside it, which runs forward and is captured."""

    model: PreTrainedModel | PeftModel
    inner: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    name: str
    preset: str | None
    lora_r: int | None

    @property
    def config(self) -> PretrainedConfig:
        return self.inner.config

    def trainable_parameters(self) -> int:
        return sum(p.numel() for p in self.model.parameters() if p.requires_grad)

    def total_parameters(self) -> int:
        return sum(p.numel() for p in self.model.parameters())


def _preset_config(name: str, tokenizer: PreTrainedTokenizerBase, num_layers: int | None) -> PretrainedConfig:
    from transformers import LlamaConfig, Qwen2Config  # noqa: PLC0415 - keeps config checks light (module docstring)

    values = dict(PRESETS[name])
    arch = values.pop("arch")
    if num_layers is not None:
        values["num_hidden_layers"] = num_layers
    cls = {"qwen2": Qwen2Config, "llama": LlamaConfig}[arch]
    return cls(
        vocab_size=len(tokenizer), max_position_embeddings=4096,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, **values,
    )


def tokenizer_from_files(files: dict[str, bytes]) -> PreTrainedTokenizerBase:
    """A tokenizer rebuilt from the files a store keeps under ``student_tokenizer/``.

    Each name must be a plain file name: one that is a path (``/tmp/x``, ``../x``) is refused before anything is
    written, so a store can never write outside the temporary folder.
    """
    from transformers import AutoTokenizer  # noqa: PLC0415 - keeps config checks light (module docstring)

    bad = [name for name in files if not is_plain_name(name)]
    if bad:
        raise SchemaError(
            f"Expected plain tokenizer file names (no '/', '\\' or ':', not '.' or '..', no control characters). "
            f"Got {[name[:80] for name in bad[:3]]!r} instead. The store's student_tokenizer.files was edited: "
            "re-create the store with `kava extract`."
        )
    with tempfile.TemporaryDirectory(prefix="kava-tok-") as tmp:
        for name, data in files.items():
            (Path(tmp) / name).write_bytes(data)
        return AutoTokenizer.from_pretrained(tmp)


def load_student(
    name: str,
    *,
    tokenizer: PreTrainedTokenizerBase | None = None,
    num_layers: int | None = None,
    seed: int = 0,
    lora_r: int | None = None,
    lora_alpha: float | None = None,
    lora_dropout: float = 0.0,
    lora_targets: str = "all-linear",
    trust_remote_code: bool = False,
    attn_implementation: str = "sdpa",
) -> Student:
    """Load or build the student, in training mode on CPU (the trainer moves it), on ``attn_implementation``.

    Args:
        name: a preset (``tiny-qwen2``, ``tiny-llama``), a local model directory, or a hub id.
        tokenizer: the grid's tokenizer. Required for a preset; for a pretrained student its own tokenizer is
            loaded and the caller checks it against the store.
        num_layers: a preset's layer count (the store's layer map); ignored for pretrained students.
        seed: seeds a preset's random initialisation.
        lora_r: LoRA rank; ``None`` or 0 trains every weight.
    """
    import torch  # noqa: PLC0415 - keeps config checks light (module docstring)
    from transformers import AutoModelForCausalLM  # noqa: PLC0415 - keeps config checks light (module docstring)

    preset = name.lower() if name.lower() in PRESETS else None
    if preset is not None:
        if tokenizer is None:
            raise ConfigError(
                f"Expected a tokenizer for the preset student {name!r}. Got none: pass --store (its student "
                "tokenizer is used) or --tokenizer NAME_OR_PATH."
            )
        config = _preset_config(preset, tokenizer, num_layers)
        config._attn_implementation = attn_implementation
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = AutoModelForCausalLM.from_config(config, attn_implementation=attn_implementation)
        model_tokenizer = tokenizer
    else:
        source = resolve_model(name, role="student", dtype="float32", trust_remote_code=trust_remote_code)
        model_tokenizer = load_tokenizer(source)
        model = load_model(source, trainable=True, attn_implementation=attn_implementation)
    if model_tokenizer.pad_token_id is None:
        # Padding positions are masked everywhere; any id works, eos is the usual choice.
        model_tokenizer.pad_token = model_tokenizer.eos_token
    inner: PreTrainedModel = model
    trained: PreTrainedModel | PeftModel = model
    if lora_r:
        trained = _with_lora(model, lora_r, lora_alpha, lora_dropout, lora_targets)
        inner = cast("PreTrainedModel", trained.get_base_model())
    trained.train()
    return Student(model=trained, inner=inner, tokenizer=model_tokenizer, name=name, preset=preset,
                   lora_r=lora_r or None)


def _with_lora(model: PreTrainedModel, r: int, alpha: float | None, dropout: float, targets: str) -> PeftModel:
    from peft import LoraConfig, get_peft_model  # noqa: PLC0415 - ~7 s to import; only --lora-r needs it

    target: str | list[str] = targets if targets == "all-linear" else [t.strip() for t in targets.split(",")
                                                                        if t.strip()]
    # peft annotates lora_alpha as int; it is only a scale (alpha / r), and a float one works.
    config = LoraConfig(r=r, lora_alpha=alpha if alpha is not None else 2 * r,  # type: ignore[arg-type]
                        lora_dropout=dropout, target_modules=target, task_type="CAUSAL_LM")
    try:
        with _quiet_peft():
            return get_peft_model(model, config)
    except ValueError as e:
        raise ConfigError(f"--lora-targets {targets!r}: {e}. Name linear modules of the student, or 'all-linear'.") \
            from e


@contextmanager
def _quiet_peft() -> Iterator[None]:
    """peft still reads transformers' deprecated ``is_gradient_checkpointing``: that FutureWarning is peft's, not
    the user's, and would otherwise repeat on every LoRA run."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        yield


def save_student(student: Student, out: Path) -> None:
    """Write the student where ``AutoModelForCausalLM.from_pretrained(out)`` loads it: a LoRA student is merged
    into its base weights first (its adapters alone are kept under ``out/adapter``)."""
    model = student.model
    if student.lora_r:
        model.save_pretrained(str(out / "adapter"))
        # merge_and_unload changes the training model in place; merge a copy so training state stays intact.
        with _quiet_peft():
            model = copy.deepcopy(cast("PeftModel", model)).merge_and_unload()
    model.save_pretrained(str(out))
    student.tokenizer.save_pretrained(out)
