"""Saving and loading a latent student: the model as ``save_pretrained`` writes it, its tokenizer,
``latent.safetensors`` (``start`` and the projection; absent for the SFT baselines) and ``latent.json`` (mode, M, T,
projection, shift)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, cast

from safetensors.torch import load_file, save_file

from kava.core.errors import ConfigError
from kava.core.models import load_model, load_tokenizer, resolve_model

from .config import LATENT_JSON
from .model import LatentReasoner
from .objective import Mode

LATENT_WEIGHTS = "latent.safetensors"


def save_latent(reasoner: LatentReasoner, tokenizer: Any, out: Path, *, mode: Mode) -> None:
    """Write what ``load_latent`` reads back."""
    out.mkdir(parents=True, exist_ok=True)
    reasoner.model.save_pretrained(str(out))
    tokenizer.save_pretrained(out)
    if mode == "latent":
        save_file({k: v.detach().contiguous() for k, v in reasoner.latent_state().items()}, str(out / LATENT_WEIGHTS))
    record = {
        "mode": mode,
        "latent": reasoner.latents,
        "jacobi": reasoner.iterations,
        "projection": reasoner.project.kind,
        "shift": reasoner.shift,
    }
    (out / LATENT_JSON).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")


def load_latent(path: str | Path) -> tuple[LatentReasoner, Any, Mode]:
    """A saved run's reasoner (model and latent weights), its tokenizer and its mode, in eval mode on CPU."""
    path = Path(path)
    try:
        record = json.loads((path / LATENT_JSON).read_text(encoding="utf-8"))
        mode, latents, jacobi = record["mode"], int(record["latent"]), int(record["jacobi"])
        projection, shift = record["projection"], bool(record["shift"])
    except (OSError, json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise ConfigError(
            f"Expected {path / LATENT_JSON} to hold mode, latent, jacobi, projection and shift. Got "
            f"it unreadable ({e}). Re-run `kava latent`."
        ) from e
    source = resolve_model(str(path), role="model")
    tokenizer = load_tokenizer(source)
    model = load_model(source, attn_implementation="sdpa")
    reasoner = LatentReasoner(model, latents=latents, iterations=jacobi, projection=projection, shift=shift)
    if mode == "latent":
        state = load_file(str(path / LATENT_WEIGHTS))
        missing = set(reasoner.latent_state()) - set(state)
        if missing:
            raise ConfigError(
                f"Expected {path / LATENT_WEIGHTS} to hold {sorted(missing)}. Got "
                f"{sorted(state)} instead. Re-run `kava latent`."
            )
        reasoner.load_state_dict(state, strict=False)
    return reasoner.eval(), tokenizer, cast(Mode, mode)
