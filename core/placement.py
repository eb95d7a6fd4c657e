"""Where a model's layers live: one device, or spread over several and offloaded (``--device-map``, ``--max-memory``).

A teacher too large for one GPU is loaded through accelerate's big-model placement: ``--device-map auto`` (or
``balanced``, ``balanced_low_0``, ``sequential``) fills the GPUs in order, then the CPU, then disk, within
``--max-memory`` per device; a JSON object names each module's device (``{"model.embed_tokens": 0,
"model.layers.0": 0, ..., "lm_head": "cpu"}``). accelerate's hooks move each layer's inputs (and offloaded weights)
to where it runs, so a forward pass, and the K/V captured from it, are those of the model on one device. Weights
offloaded to ``disk`` go to a temporary folder that is removed with the model.

The two options are kept as text (``ModelSource`` is hashable and JSON-ready) and parsed here, every problem
collected in the caller's list in the flags' spelling.
"""

from __future__ import annotations

import json
import re
import shutil
import tempfile
import weakref
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel

DEVICE_MAPS = ("auto", "balanced", "balanced_low_0", "sequential")
"""accelerate's placement strategies; anything else must be a JSON object of module → device."""
_PLACE = re.compile(r"^(cpu|disk|cuda:\d+|\d+)$")
_SIZE = re.compile(r"^\d+(\.\d+)?\s*(B|KB|MB|GB|TB|KiB|MiB|GiB|TiB)$", re.IGNORECASE)


def parse_device_map(text: str | None, problems: list[str]) -> str | None:
    """``--device-map`` checked: a strategy name or a JSON object of module names to devices (a GPU index,
    ``cuda:N``, ``cpu`` or ``disk``); returned as given (stripped), None when not set."""
    if text is None:
        return None
    value = str(text).strip()
    if value in DEVICE_MAPS:
        return value
    try:
        mapping = json.loads(value)
    except json.JSONDecodeError:
        mapping = None
    if not isinstance(mapping, dict) or not mapping:
        problems.append(f"--device-map: expected one of {', '.join(DEVICE_MAPS)} or a JSON object of module names to "
                        f"devices ('{{\"model.layers.0\": 0, \"lm_head\": \"cpu\"}}'). Got {text!r} instead.")
        return None
    bad = {k: v for k, v in mapping.items() if isinstance(v, bool) or not _PLACE.match(str(v))}
    if bad:
        problems.append(f"--device-map: expected each module on a GPU index, cuda:N, cpu or disk. Got {bad} instead.")
        return None
    return value


def parse_max_memory(text: str | None, problems: list[str]) -> str | None:
    """``--max-memory`` checked: ``DEVICE=SIZE`` pairs separated by commas (``0=70GiB,1=70GiB,cpu=200GiB``) or the
    same as a JSON object; sizes with a unit (``GiB``, ``MB``, ...) or in bytes."""
    if text is None:
        return None
    parsed = _max_memory_pairs(str(text))
    if parsed is None:
        problems.append(f"--max-memory: expected DEVICE=SIZE pairs such as '0=70GiB,cpu=200GiB' (devices: a GPU "
                        f"index, cpu or disk; sizes with a unit or in bytes). Got {text!r} instead.")
        return None
    return str(text).strip()


def _max_memory_pairs(text: str) -> dict[int | str, int | str] | None:
    """``{device: size}`` as accelerate takes it (GPU indices as ints), or None for malformed text."""
    text = text.strip()
    try:
        raw = json.loads(text) if text.startswith("{") else None
    except json.JSONDecodeError:
        return None
    if raw is None:
        pairs = [part.split("=", 1) for part in text.split(",") if part.strip()]
        if not pairs or any(len(p) != 2 for p in pairs):
            return None
        raw = {k.strip(): v.strip() for k, v in pairs}
    if not isinstance(raw, dict) or not raw:
        return None
    out: dict[int | str, int | str] = {}
    for key, size in raw.items():
        device = str(key).strip()
        if device not in ("cpu", "disk") and not device.isdigit():
            return None
        ok = (isinstance(size, int) and not isinstance(size, bool) and size > 0) or (
            isinstance(size, str) and (size.isdigit() or _SIZE.match(size)))
        if not ok:
            return None
        out[int(device) if device.isdigit() else device] = int(size) if isinstance(size, str) and size.isdigit() \
            else size
    return out


def placement_kwargs(device: str, device_map: str | None, max_memory: str | None) -> dict[str, Any]:
    """``from_pretrained`` keywords that place a model: all of it on ``device``, or accelerate's ``device_map``
    with ``max_memory`` and a temporary ``offload_folder`` for layers that go to disk (hand the model and these
    keywords to :func:`adopt_offload_folder` once it is loaded)."""
    if device_map is None:
        return {"device_map": {"": device}}
    value: Any = device_map if device_map in DEVICE_MAPS else json.loads(device_map)
    out: dict[str, Any] = {"device_map": value}
    if max_memory is not None:
        out["max_memory"] = _max_memory_pairs(max_memory)
    out["offload_folder"] = tempfile.mkdtemp(prefix="kava-offload-")
    return out


def adopt_offload_folder(model: PreTrainedModel | None, kwargs: dict[str, Any]) -> None:
    """Remove the temporary offload folder of ``kwargs`` when ``model`` is garbage collected (at once if nothing
    was offloaded to it, or no model was loaded)."""
    folder = kwargs.get("offload_folder")
    if folder is None:
        return
    if model is None or "disk" not in set(map(str, (getattr(model, "hf_device_map", None) or {}).values())):
        shutil.rmtree(folder, ignore_errors=True)
        return
    weakref.finalize(model, shutil.rmtree, folder, True)


def input_device(model: PreTrainedModel) -> torch.device:
    """Where a batch's input ids go: for a model spread by a device map, the device of its input embedding (the CPU
    when that is offloaded: accelerate moves it); else the device of its first parameter."""
    import torch  # noqa: PLC0415 - heavy; only with a loaded model

    placed = {module: str(device) for module, device in (getattr(model, "hf_device_map", None) or {}).items()}
    if len(set(placed.values())) <= 1 and "disk" not in placed.values():
        return next(model.parameters()).device
    embedding = model.get_input_embeddings()
    name = next(n for n, m in model.named_modules() if m is embedding)
    owners = [m for m in placed if m == "" or name == m or name.startswith(m + ".")]
    where = placed[max(owners, key=len)] if owners else "cpu"  # the most specific entry places it
    return torch.device("cpu" if where in ("cpu", "disk") else f"cuda:{where}" if where.isdigit() else where)
