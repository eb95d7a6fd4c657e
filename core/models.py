"""Loading a Hugging Face causal LM and its tokenizer by name, local path or hub id, optionally quantized.

Both stages load models: extraction its teachers (through the preset registry extraction passes in),
distillation its pretrained students, eval the trained ones. Three steps, kept apart so the CLI can validate before
anything heavy happens:

1. ``resolve_model(name_or_path, ...)`` → ``ModelSource``: pure checks, no model load and no network. A preset name
   (when the caller passes its registry), a local model directory, or a hub id (``org/name``). Every problem is
   reported at once as one ``ConfigError``; a hub id that is not cached while ``HF_HUB_OFFLINE=1`` fails here, in
   milliseconds, instead of deep inside ``from_pretrained``.
2. ``load_tokenizer(source)`` and ``load_model(source)``: ``AutoTokenizer`` (fast tokenizers only: alignment needs
   character offsets) and ``AutoModelForCausalLM``, bitsandbytes nf4 or int8 when asked.
3. ``describe_model(model, source)`` → a JSON-ready dict for the store's manifest.

transformers, torch and bitsandbytes are imported inside the functions that need them: config validation (and
``kava extract --list-teachers``, through the teacher presets) must stay instant, and bitsandbytes alone costs
~1.5 s to import.

bitsandbytes 0.50 runs nf4 and int8 on CPU too (through accelerate), so the quantized path is the same on a laptop
and on a GPU. On CPU its int8 matmul casts activations to float16 (and logs a warning per call unless the model is
float16), hence float16 is the default compute dtype for int8; nf4 defaults to bfloat16 like the presets.
"""

from __future__ import annotations

import difflib
import importlib.util
import json
import logging
import re
import warnings
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from .errors import ConfigError
from .hub import hub_offline, uncached_problem
from .placement import adopt_offload_folder, parse_device_map, parse_max_memory, placement_kwargs

if TYPE_CHECKING:  # pragma: no cover - imports for type hints only (torch/transformers are slow to import)
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

Quantization = Literal["none", "nf4", "int8"]

QUANTIZATIONS: tuple[str, ...] = ("none", "nf4", "int8")
# Accepted spellings of --dtype → canonical torch attribute name. "auto" = what the checkpoint's config says.
_DTYPE_ALIASES: dict[str, str] = {
    "auto": "auto",
    "float32": "float32",
    "fp32": "float32",
    "bfloat16": "bfloat16",
    "bf16": "bfloat16",
    "float16": "float16",
    "fp16": "float16",
    "half": "float16",
}
# Compute dtype when neither the user nor a preset names one. bitsandbytes' CPU int8 matmul works in float16.
_DEFAULT_DTYPE: dict[str, str] = {"none": "auto", "nf4": "bfloat16", "int8": "float16"}
# "org/name" as the hub spells repo ids; a string like this that is not a local directory is taken as a hub id.
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")
_DEVICE = re.compile(r"^(cpu|cuda(:\d+)?)$")


@dataclass(frozen=True)
class ModelPreset:
    """A named, tested way to load a model (the teacher registry is a table of these)."""

    name: str
    """What the user types, e.g. ``--teacher qwen-7b-4bit``."""
    hf_id: str
    """Hugging Face hub id of the checkpoint."""
    quantization: Quantization
    """``"none"``, ``"nf4"`` (bitsandbytes 4-bit, double quant) or ``"int8"`` (bitsandbytes LLM.int8)."""
    dtype: str
    """Compute dtype: the dtype of unquantized weights and of activations (nf4 dequantizes into it)."""
    description: str
    """One line for a listing such as ``kava extract --list-teachers``."""

    def __post_init__(self) -> None:
        if self.quantization not in QUANTIZATIONS:
            raise ConfigError(f"Expected quantization in {QUANTIZATIONS}. Got {self.quantization!r} instead.")
        if self.dtype not in _DTYPE_ALIASES.values() or self.dtype == "auto":
            raise ConfigError(f"Expected a preset dtype of float32, bfloat16 or float16. Got {self.dtype!r} instead.")


@dataclass(frozen=True)
class ModelSource:
    """A resolved model: everything ``load_model`` needs, JSON-ready for the store's manifest."""

    name: str
    """Preset name, or the id/path as the user typed it."""
    model_id: str
    """Hub id (``org/name``) or absolute path of a local model directory."""
    revision: str | None
    """Hub branch, tag or commit; None = the default branch (always None for local directories)."""
    quantization: Quantization
    """``"none"``, ``"nf4"`` or ``"int8"``."""
    dtype: str
    """Compute dtype (``"float32"``, ``"bfloat16"``, ``"float16"``) or ``"auto"`` (the checkpoint's own)."""
    device: str
    """``"cpu"`` or ``"cuda:N"``."""
    trust_remote_code: bool = False
    """Run modelling code shipped with the checkpoint. Only behind the explicit ``--trust-remote-code`` flag."""
    is_local: bool = False
    """True when ``model_id`` is a local directory."""
    role: str = "teacher"
    """What the model is to the run (``"teacher"``, ``"student"``): names it in messages."""
    device_map: str | None = None
    """accelerate's placement over several devices (``auto``, ``balanced``, ... or JSON; ``kava.core.placement``);
    None puts the whole model on ``device``."""
    max_memory: str | None = None
    """With ``device_map``: the most each device may hold (``0=70GiB,cpu=200GiB``)."""

    def __post_init__(self) -> None:
        problems = []
        if self.quantization not in QUANTIZATIONS:
            problems.append(f"Expected quantization in {QUANTIZATIONS}. Got {self.quantization!r} instead.")
        if self.dtype not in ("auto", "float32", "bfloat16", "float16"):
            problems.append(f"Expected dtype auto, float32, bfloat16 or float16. Got {self.dtype!r} instead.")
        if self.quantization != "none" and self.dtype == "auto":
            problems.append("A quantized teacher needs an explicit compute dtype. Got dtype 'auto'.")
        if not _DEVICE.match(self.device):
            problems.append(f"Expected device cpu, cuda or cuda:N. Got {self.device!r} instead.")
        _raise_all(problems)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def resolve_model(
    name_or_path: str,
    *,
    presets: Mapping[str, ModelPreset] | None = None,
    role: str = "teacher",
    load_in_4bit: bool = False,
    load_in_8bit: bool = False,
    dtype: str | torch.dtype | None = None,
    device: str | None = None,
    revision: str | None = None,
    trust_remote_code: bool = False,
    device_map: str | None = None,
    max_memory: str | None = None,
) -> ModelSource:
    """Resolve a preset name, a local model directory or a hub id into a ``ModelSource``, checking every option.

    Lookup order: a name in ``presets`` (case-insensitive), then an existing local directory, then a hub id
    (``org/name``). ``role`` (``"teacher"``, ``"student"``) names the model in messages.
    ``load_in_4bit`` / ``load_in_8bit`` override a preset's quantization; ``dtype`` overrides its compute dtype.
    Nothing is loaded and the network is never touched; with ``HF_HUB_OFFLINE=1`` a hub id must already be in the
    local Hugging Face cache.

    Raises:
        ConfigError: listing every problem found (unknown name with close preset matches, both quantization flags,
            bad dtype or device, CUDA missing, an uncached hub id while offline, ...).
    """
    problems: list[str] = []
    if load_in_4bit and load_in_8bit:
        problems.append("Can't set both --load-in-4bit and --load-in-8bit. Choose one.")
    dtype_name = _parse_dtype(dtype, problems)
    device_name = _parse_device(device, problems)
    device_map = parse_device_map(device_map, problems)
    max_memory = parse_max_memory(max_memory, problems)
    if device_map is not None and device is not None:
        problems.append("Can't set both --device and --device-map: the map places every layer. Choose one.")
    if max_memory is not None and device_map is None:
        problems.append("--max-memory needs --device-map (e.g. --device-map auto): it bounds what the map places.")

    key = str(name_or_path).strip()
    preset = (presets or {}).get(key.lower())
    path = Path(key).expanduser()
    model_id, is_local, is_hub = key, False, False
    if preset is not None:
        model_id = preset.hf_id
    elif path.is_dir():
        model_id, is_local = str(path.resolve()), True
        if not (path / "config.json").is_file():
            problems.append(
                f"Expected a model directory with a config.json (as saved by `save_pretrained`). "
                f"Got {model_id} without one instead."
            )
        else:
            problems.extend(_config_json_problems(path / "config.json"))
        if revision is not None:
            problems.append(f"--revision applies to hub ids only. Got --revision {revision} with local path {key}.")
    elif _looks_like_path(key):
        problems.append(f"{role.capitalize()} path {key!r} does not exist or is not a directory. "
                        "Expected a model directory.")
    elif _HUB_ID.match(key):
        is_hub = True
    else:
        problems.append(_unknown_model_message(key, presets, role))

    quantization: str = preset.quantization if preset else "none"
    if load_in_4bit and not load_in_8bit:
        quantization = "nf4"
    elif load_in_8bit and not load_in_4bit:
        quantization = "int8"
    if quantization != "none":
        for package in ("bitsandbytes", "accelerate"):
            if importlib.util.find_spec(package) is None:
                problems.append(f"{quantization} quantization needs `{package}`. Run `pip install {package}`.")
    if dtype_name is None:
        # A preset's dtype goes with its quantization; a flag that changes the quantization takes that one's default.
        same = preset is not None and preset.quantization == quantization
        dtype_name = preset.dtype if same and preset is not None else _DEFAULT_DTYPE[quantization]
    if dtype_name == "auto" and quantization != "none":
        dtype_name = _DEFAULT_DTYPE[quantization]

    if (is_hub or preset is not None) and hub_offline():
        missing = uncached_problem(model_id, revision, role=role.capitalize())
        if missing:
            problems.append(missing)

    _raise_all(problems)
    return ModelSource(
        name=preset.name if preset else key,
        model_id=model_id,
        revision=revision,
        quantization=quantization,  # type: ignore[arg-type]
        dtype=dtype_name or "auto",
        device=device_name or "cpu",
        trust_remote_code=bool(trust_remote_code),
        is_local=is_local,
        role=role,
        device_map=device_map,
        max_memory=max_memory,
    )


def _config_json_problems(path: Path) -> list[str]:
    """A model directory's config.json must be one JSON object naming its ``model_type``: checked here, because
    transformers reports a broken config as a missing tokenizer or an unrecognised model."""
    try:
        config = json.loads(path.read_bytes())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        return [f"Expected {path} to be JSON as written by `save_pretrained`. Got a file that does not parse "
                f"({e}). Restore it from the original model."]
    if not isinstance(config, dict):
        return [f"Expected {path} to hold a JSON object. Got a {type(config).__name__}. Restore it from the "
                "original model."]
    return []


def _common_kwargs(source: ModelSource) -> dict[str, Any]:
    return {
        "revision": source.revision,
        # Explicit False (not None): transformers would otherwise prompt on a terminal for repos with custom code.
        "trust_remote_code": source.trust_remote_code,
        # huggingface_hub reads HF_HUB_OFFLINE once at import; ask again so a later setting is honoured too.
        "local_files_only": source.is_local or hub_offline(),
    }


def load_tokenizer(source: ModelSource) -> PreTrainedTokenizerBase:
    """The model's fast tokenizer: cheap, so callers load it first and fail fast (no tokenizer.json, remote code)
    before gigabytes of weights load.

    Raises:
        ConfigError: a slow-only tokenizer, remote code needed without the flag, or files that cannot be found.
    """
    import transformers  # noqa: PLC0415 - heavy; loaded with a model only (module docstring)

    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(source.model_id, **_common_kwargs(source))
    except (OSError, ValueError) as e:
        raise _load_error(source, "tokenizer", e) from e
    if not getattr(tokenizer, "is_fast", False):
        raise ConfigError(
            f"Expected a fast (tokenizers-backed) tokenizer for {source.model_id}, needed for character offsets. "
            f"Got {type(tokenizer).__name__} instead. Save a tokenizer.json next to the model."
        )
    return tokenizer


def load_model(source: ModelSource, *, trainable: bool = False,
               attn_implementation: str | None = None, head: str = "causal-lm") -> PreTrainedModel:
    """The model on ``source.device``: in eval mode with gradients off (a teacher, a model under evaluation), or,
    with ``trainable``, as loaded (a student: the trainer moves it and sets its mode).

    ``head``: ``"causal-lm"`` (default) loads ``AutoModelForCausalLM``; ``"base"`` loads ``AutoModel``, the body
    without a head, for encoder and encoder-decoder teachers (whose K/V need no LM head).

    nf4 uses bitsandbytes 4-bit with double quantization and ``source.dtype`` as the compute dtype; int8 uses
    LLM.int8. Both run on CPU as well as CUDA. Remote code runs only when ``source.trust_remote_code`` is set.

    Raises:
        ConfigError: CUDA requested but unavailable, remote code needed without the flag, or files that cannot be
            found (wrapping the underlying error).
    """
    import torch  # noqa: PLC0415 - heavy; loaded with a model only (module docstring)
    import transformers  # noqa: PLC0415 - heavy; loaded with a model only (module docstring)

    if source.device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(_no_cuda_message(source.device))
    quantization_config = _quantization_config(source)
    placement = {} if trainable else placement_kwargs(source.device, source.device_map, source.max_memory)
    if attn_implementation is not None:
        placement["attn_implementation"] = attn_implementation
    try:
        auto = transformers.AutoModel if head == "base" else transformers.AutoModelForCausalLM
        model = auto.from_pretrained(
            source.model_id,
            dtype=source.dtype if source.dtype == "auto" else getattr(torch, source.dtype),
            quantization_config=quantization_config,
            # Placed directly on the device by accelerate; bitsandbytes quantizes weights as they are placed.
            **placement,
            **_common_kwargs(source),
        )
    except (OSError, ValueError) as e:
        adopt_offload_folder(None, placement)
        raise _load_error(source, "model", e) from e
    adopt_offload_folder(model, placement)
    if trainable:
        return model
    model.eval()
    model.requires_grad_(False)  # a teacher only runs forward; no grad buffers, no autograd graph
    return model


def load_pretrained(source: ModelSource) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a resolved model for inference: its fast tokenizer first (see :func:`load_tokenizer`), then the model (see
    :func:`load_model`)."""
    tokenizer = load_tokenizer(source)
    return load_model(source), tokenizer


def load_fast_tokenizer(name: str, *, flag: str = "--student-tokenizer") -> PreTrainedTokenizerBase:
    """A fast tokenizer from a directory or a cached hub id, named in errors by the ``flag`` that asked for it."""
    from transformers import AutoTokenizer  # noqa: PLC0415 - heavy; loaded with a model only (module docstring)

    try:
        tok = AutoTokenizer.from_pretrained(name, local_files_only=hub_offline())
    except (OSError, ValueError) as e:
        raise ConfigError(
            f"{flag} {name!r}: its tokenizer could not be loaded ({e}). Pass a local directory, or a "
            "hub id that is in the local cache."
        ) from e
    if not getattr(tok, "is_fast", False):
        raise ConfigError(f"{flag}: expected a fast tokenizer (alignment needs character offsets). "
                          f"Got {type(tok).__name__} instead.")
    return tok


def describe_model(model: PreTrainedModel, source: ModelSource) -> dict[str, Any]:
    """JSON-ready metadata of a loaded model (a teacher) for the store manifest.

    ``num_params`` counts logical parameters (a 4-bit weight packs two per byte; transformers corrects for it).
    ``commit`` is the hub commit the files came from, when transformers knows it.
    """
    config = model.config
    num_heads = getattr(config, "num_attention_heads", None)
    head_dim = getattr(config, "head_dim", None)
    if head_dim is None and num_heads:
        head_dim = config.hidden_size // num_heads
    return {
        "name": source.name,
        "model_id": source.model_id,
        "is_local": source.is_local,
        "revision": source.revision,
        "commit": getattr(config, "_commit_hash", None),
        "architecture": type(model).__name__,
        "model_type": getattr(config, "model_type", None),
        "quantization": source.quantization,
        "dtype": str(model.dtype).removeprefix("torch."),
        "compute_dtype": source.dtype,
        "num_params": int(model.num_parameters()),
        "num_layers": getattr(config, "num_hidden_layers", None),
        "num_attention_heads": num_heads,
        "num_kv_heads": getattr(config, "num_key_value_heads", None) or num_heads,
        "head_dim": head_dim,
        "trust_remote_code": source.trust_remote_code,
    }


# --- helpers ---------------------------------------------------------------------------------------------------


def _load_error(source: ModelSource, what: str, error: Exception) -> ConfigError:
    """Turn a transformers loading error into a ConfigError that names the model and the fix."""
    if "trust_remote_code" in str(error) or "custom code" in str(error):
        return ConfigError(
            f"{source.role.capitalize()} {source.model_id} ships its own modelling code, which KaVa runs only when "
            "asked. Review that code, then pass --trust-remote-code."
        )
    hint = " Expected a tokenizer.json next to the model." if what == "tokenizer" else ""
    return ConfigError(f"Could not load the {what} of {source.role} {source.model_id}: {error}{hint}")


def _quantization_config(source: ModelSource) -> Any:
    """A ``BitsAndBytesConfig`` for nf4/int8, or None. Imports bitsandbytes only here."""
    if source.quantization == "none":
        return None
    import torch  # noqa: PLC0415 - heavy; loaded with a model only (module docstring)
    from transformers import BitsAndBytesConfig  # noqa: PLC0415 - heavy; loaded with a model only (module docstring)

    import_bitsandbytes()
    if source.quantization == "nf4":
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=getattr(torch, source.dtype),
        )
    return BitsAndBytesConfig(load_in_8bit=True)


def import_bitsandbytes() -> None:
    """Import bitsandbytes once, the same way whatever the caller's warning filters are.

    At import, bitsandbytes wraps some kernels in ``torch.compile``; that pulls in ``torch._inductor``, which imports
    ``torch.utils.mkldnn`` and trips torch's own "`torch.jit.script_method` is deprecated" DeprecationWarning. Under
    ``-W error`` (as in our tests) that exception is swallowed by bitsandbytes, which then silently keeps the
    uncompiled kernels. The warning is torch's internal business, so it is ignored here, for this import only.
    """
    # On CPU it also logs that an optional faster 4-bit kernel package ("kernels") is missing, at every import:
    # a speed notice, not a problem, so that one logger is quieted while importing.
    cpu_ops = logging.getLogger("bitsandbytes.backends.cpu.ops")
    level = cpu_ops.level
    cpu_ops.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings(
                "ignore", message=r"`torch\.jit\.script_method` is deprecated", category=DeprecationWarning
            )
            import bitsandbytes  # noqa: F401, PLC0415 - quantized loads only; 1.5 s to import
    except ImportError as e:
        raise ConfigError("Quantized teachers need bitsandbytes. Run `pip install bitsandbytes`.") from e
    finally:
        cpu_ops.setLevel(level)


def _parse_dtype(dtype: Any, problems: list[str]) -> str | None:
    if dtype is None:
        return None
    name = str(dtype).removeprefix("torch.").lower()
    if name not in _DTYPE_ALIASES:
        problems.append(f"Expected --dtype auto, float32, bfloat16 or float16. Got {dtype!r} instead.")
        return None
    return _DTYPE_ALIASES[name]


def _parse_device(device: str | None, problems: list[str]) -> str | None:
    if device is None:
        return None
    name = str(device).strip().lower()
    if not _DEVICE.match(name):
        problems.append(f"Expected --device cpu, cuda or cuda:N. Got {device!r} instead.")
        return None
    if name == "cuda":
        name = "cuda:0"
    if name.startswith("cuda"):
        import torch  # noqa: PLC0415 - heavy; loaded with a model only (module docstring)

        if not torch.cuda.is_available():
            problems.append(_no_cuda_message(name))
        elif int(name.split(":")[1]) >= torch.cuda.device_count():
            problems.append(f"--device {name} does not exist: torch sees {torch.cuda.device_count()} CUDA device(s).")
    return name


def _no_cuda_message(device: str) -> str:
    return f"--device {device} needs CUDA, but torch.cuda.is_available() is False here. Use --device cpu."


def _looks_like_path(key: str) -> bool:
    return key.startswith((".", "/", "~")) or "\\" in key or key.count("/") > 1 or Path(key).exists()


def _unknown_model_message(key: str, presets: Mapping[str, ModelPreset] | None, role: str) -> str:
    if not presets:
        return f"Unknown {role} {key!r}. Pass a local model directory or a Hugging Face hub id (org/name)."
    close = difflib.get_close_matches(key.lower(), list(presets), n=3, cutoff=0.6)
    hint = f" Did you mean: {', '.join(close)}?" if close else ""
    return (
        f"Unknown {role} {key!r}.{hint} Run `kava extract --list-teachers` for the presets, "
        f"or pass a local model directory or a Hugging Face hub id (org/name)."
    )


def _raise_all(problems: list[str]) -> None:
    if problems:
        raise ConfigError.from_problems(problems)
