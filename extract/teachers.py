"""The teacher registry: named presets (``qwen-7b-4bit`` → Qwen2.5-7B-Instruct in nf4 with bf16 compute, ...) and
resolving what the user typed after ``--teacher`` through it.

Loading itself is shared with the students and lives in :mod:`kava.core.models`; this module owns only the table
of tested teachers and the ``kava extract --list-teachers`` listing.
"""

from __future__ import annotations

from typing import Any

from kava.core.models import ModelPreset, ModelSource, resolve_model

_PRESETS: tuple[ModelPreset, ...] = (
    ModelPreset(
        "qwen-7b-4bit", "Qwen/Qwen2.5-7B-Instruct", "nf4", "bfloat16",
        "Qwen2.5 7B Instruct in nf4 (~5.5 GB): the default large teacher; 28 layers, 4 KV heads, head dim 128",
    ),
    ModelPreset(
        "qwen-7b", "Qwen/Qwen2.5-7B-Instruct", "none", "bfloat16",
        "Qwen2.5 7B Instruct unquantized (~15 GB in bf16)",
    ),
    ModelPreset(
        "qwen-1.5b", "Qwen/Qwen2.5-1.5B-Instruct", "none", "bfloat16",
        "Qwen2.5 1.5B Instruct (~3 GB in bf16); shares the Qwen2.5 tokenizer with the 0.5B student",
    ),
    ModelPreset(
        "qwen-0.5b", "Qwen/Qwen2.5-0.5B-Instruct", "none", "bfloat16",
        "Qwen2.5 0.5B Instruct (~1 GB); a quick teacher for smoke runs",
    ),
    ModelPreset(
        "llama-3.2-1b", "meta-llama/Llama-3.2-1B-Instruct", "none", "bfloat16",
        "Llama 3.2 1B Instruct (gated on the hub); a different tokenizer than Qwen",
    ),
    ModelPreset(
        "llama-3.2-3b-4bit", "meta-llama/Llama-3.2-3B-Instruct", "nf4", "bfloat16",
        "Llama 3.2 3B Instruct in nf4 (~2.2 GB; gated on the hub)",
    ),
)
PRESETS: dict[str, ModelPreset] = {p.name: p for p in _PRESETS}


def list_presets() -> list[ModelPreset]:
    """Every registered preset, in registry order."""
    return list(_PRESETS)


def format_preset_table() -> str:
    """The preset registry as an aligned text table (``kava extract --list-teachers``)."""
    header = ("name", "hub id", "quant", "dtype", "description")
    rows = [header] + [(p.name, p.hf_id, p.quantization, p.dtype, p.description) for p in _PRESETS]
    widths = [max(len(row[i]) for row in rows) for i in range(len(header) - 1)]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row[:-1], widths)) + "  " + row[-1] for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths) + "  " + "-" * len(header[-1]))
    lines.append("")
    lines.append("Also accepted: a local model directory, or any Hugging Face hub id (org/name).")
    return "\n".join(lines)


def resolve_teacher(name_or_path: str, **options: Any) -> ModelSource:
    """Resolve a preset name, a local model directory or a hub id into a ``ModelSource`` for a teacher, checking
    every option: :func:`kava.core.models.resolve_model` with this registry's presets, which takes the same keyword
    options (``load_in_4bit``, ``load_in_8bit``, ``dtype``, ``device``, ``revision``, ``trust_remote_code``).

    Raises:
        ConfigError: listing every problem found (unknown name with close preset matches, both quantization flags,
            bad dtype or device, CUDA missing, an uncached hub id while offline, ...).
    """
    return resolve_model(name_or_path, presets=PRESETS, role="teacher", **options)
