"""The local Hugging Face hub cache and the offline setting, read one way by every stage and by ``kava doctor``."""

from __future__ import annotations

import os
from pathlib import Path

from huggingface_hub import constants


def hub_offline() -> bool:
    """Offline by huggingface_hub's setting (read at its import) or by the environment now."""
    env = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return bool(constants.HF_HUB_OFFLINE) or env.strip().upper() in {"1", "ON", "YES", "TRUE"}


def hub_cache_dir() -> Path:
    """The hub cache as the environment names it now: HF_HUB_CACHE, else HF_HOME/hub, else huggingface_hub's own.

    huggingface_hub reads these once, at import; reading them again here lets a caller (or a test) point at another
    cache without a new process.
    """
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    return Path(constants.HF_HUB_CACHE)


def uncached_problem(model_id: str, revision: str | None, *, role: str = "Teacher") -> str | None:
    """None when ``model_id``'s config.json is in the local cache; else the message saying how to get it there.

    A plain file-system lookup (milliseconds): transformers would otherwise fail only after its own retries.
    ``role`` starts the message (``"Teacher"``, ``"Student"``).
    """
    # file_download pulls in the HTTP client (~0.15 s): only a lookup pays for it, not `kava --help`.
    from huggingface_hub import try_to_load_from_cache  # noqa: PLC0415 - see the line above

    cached = try_to_load_from_cache(model_id, "config.json", revision=revision)
    if isinstance(cached, str):
        return None
    at = f" at revision {revision}" if revision else ""
    return (
        f"{role} {model_id}{at} is not cached in the local Hugging Face cache ({constants.HF_HUB_CACHE}), "
        f"and HF_HUB_OFFLINE=1 forbids downloading it. Fix: download it on a machine with hub access "
        f"(`hf download {model_id}`) and copy the cache here, set HF_HOME (or HF_HUB_CACHE) to a cache that has it, "
        f"or pass a local model directory instead."
    )
