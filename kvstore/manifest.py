"""The store's metadata as frozen dataclasses: parsed from JSON, never read as loose dicts.

Every on-disk field goes through a ``parse_<field>()`` function with one error template,
``"Expected X. Got Y instead."``; every dataclass round-trips through ``to_dict()`` / ``from_dict()``.
The exact format is written down in ``FORMAT.md`` next to this file.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from kava.core.errors import ConfigError, FormatVersionError, SchemaError, short_repr

FORMAT_VERSION = 5
"""The store format this code writes and the newest it reads."""
EVICTED_Q_SINCE = 5
"""The first format version whose compressed teachers may store queries (on their kept rows)."""
EVICTION_SINCE = 4
"""The first format version whose teachers may keep only some rows of a segment (``TeacherSpec.eviction``)."""
LOWBIT_SINCE = 3
"""The first format version whose teachers may use the packed int4/int2 storage dtypes."""
SEALED_SINCE = 2
"""The first format version whose manifest and teacher specs must carry a digest (version 1 had none)."""
DIGEST_FIELD = "digest"
"""The field of the manifest and of a teacher spec that holds the digest of its other fields."""
MAX_NAME_BYTES = 255
"""The longest plain name (UTF-8 bytes) a store may hold: a file name on common file systems."""

SEGMENT_NAMES = ("prompt", "reasoning", "answer", "special")
"""Segment id ``i`` of a student token means ``SEGMENT_NAMES[i]``."""

KV_DTYPES = ("float16", "bfloat16", "float32", "int8", "int4", "int2")
LOWBIT_DTYPES = ("int4", "int2")
"""Storage dtypes packed below a byte per value (format version 3 on)."""
K_ROPE = ("pre", "post")
ATTENTION_KINDS = ("causal", "bidirectional", "cross")
"""How a teacher's queries saw its keys: a decoder's (or an encoder-decoder's decoder's) causal self-attention, an
encoder's bidirectional self-attention, or a decoder's cross-attention over encoder states."""
POSITIONS = ("rope", "absolute", "relative-bias", "none")
"""Where a teacher's positions entered its attention: rotary K/Q (``rope``), learned or sinusoidal embeddings added
to the input (``absolute``), a bias on the attention scores (``relative-bias``, T5), or nowhere (``none``:
cross-attention, whose keys are encoder states)."""
QUANTIZATIONS = ("none", "nf4", "fp4", "int8")
EVICTION_RULES = ("r-kv", "attention", "streaming", "random")
"""How a compressed teacher chose the rows it kept (``kava.extract.evict``)."""
_TEACHER_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,99}$")


def _expect(cond: bool, what: str, got: Any, where: str) -> None:
    if not cond:
        raise SchemaError(f"{where}: expected {what}. Got {short_repr(got)} instead.")


def parse_int(value: Any, where: str, *, minimum: int | None = None) -> int:
    _expect(isinstance(value, int) and not isinstance(value, bool), "an integer", value, where)
    if minimum is not None:
        _expect(value >= minimum, f"an integer >= {minimum}", value, where)
    return value


def parse_str(value: Any, where: str, *, choices: tuple[str, ...] | None = None) -> str:
    _expect(isinstance(value, str), "a string", value, where)
    if choices is not None:
        _expect(value in choices, f"one of {', '.join(choices)}", value, where)
    return value


def parse_opt_str(value: Any, where: str) -> str | None:
    return None if value is None else parse_str(value, where)


def parse_int_list(value: Any, where: str) -> tuple[int, ...]:
    _expect(isinstance(value, (list, tuple)), "a list of integers", value, where)
    return tuple(parse_int(v, f"{where}[{i}]", minimum=0) for i, v in enumerate(value))


def parse_dict(value: Any, where: str) -> dict[str, Any]:
    _expect(isinstance(value, Mapping), "an object", value, where)
    return dict(value)


def parse_format_version(value: Any, where: str = "format_version") -> int:
    version = parse_int(value, where, minimum=1)
    if version > FORMAT_VERSION:
        raise FormatVersionError(
            f"{where}: this store has format version {version}; this kava reads up to {FORMAT_VERSION}. "
            "Upgrade kava (pip install -U kava) to read it."
        )
    return version


def is_plain_name(name: Any) -> bool:
    """Whether ``name`` can be used as one file name inside a folder and stays there: a non-empty string with no
    ``/``, ``\\`` or ``:`` (no absolute path, no drive), not ``.`` or ``..``, no NUL or other control character,
    at most :data:`MAX_NAME_BYTES` bytes."""
    if not isinstance(name, str) or name in ("", ".", "..") or any(c in name for c in "/\\:"):
        return False
    if not name.isprintable():  # NUL, newlines, other control and format characters, lone surrogates
        return False
    return len(name.encode("utf-8")) <= MAX_NAME_BYTES


def parse_plain_name(value: Any, where: str) -> str:
    """A name a reader turns into a path (a tokenizer file name): see :func:`is_plain_name`."""
    _expect(is_plain_name(value), f"a plain file name (no '/', '\\' or ':', not '.' or '..', no control "
                                  f"characters, at most {MAX_NAME_BYTES} bytes)", value, where)
    return value


def is_teacher_name(name: Any) -> bool:
    """Whether ``name`` may name a folder: letters, digits and ``. _ + -``, at most 100, no ``..``."""
    return isinstance(name, str) and bool(_TEACHER_NAME.match(name)) and ".." not in name


def parse_teacher_name(value: Any, where: str) -> str:
    """A teacher name read from a store (it names a folder): the rule of :func:`check_teacher_name`."""
    _expect(is_teacher_name(value), "a teacher name of letters, digits and '._+-' (at most 100, no '..')",
            value, where)
    return value


def check_teacher_name(name: Any) -> str:
    """A teacher name becomes a folder name: letters, digits and ``. _ + -``, no path separators, no ``..``."""
    if not is_teacher_name(name):
        raise ConfigError(
            f"Expected a teacher name of letters, digits and '._+-' (at most 100, not starting with a "
            f"separator, no '..'). Got {short_repr(name)} instead. Choose another name with --name."
        )
    return name


# --------------------------------------------------------------------------------------------------------------
# Digests: the manifest and each teacher spec carry a sha256 of every other field, so an edit is caught


def _plain_json(value: Any) -> Any:
    """``value`` as JSON will hold it (tuples become lists, numpy scalars plain numbers)."""

    def default(x: Any) -> Any:
        if hasattr(x, "tolist"):  # numpy scalars and arrays
            return x.tolist()
        raise TypeError(f"Expected JSON-serialisable metadata. Got {type(x).__name__} {short_repr(x)} instead.")

    return json.loads(json.dumps(value, default=default))


def _field_digest(value: Any) -> str:
    """sha256 of a field's canonical JSON: sorted keys, no spaces, ASCII escapes."""
    canonical = json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(canonical.encode("ascii")).hexdigest()


def seal(doc: Mapping[str, Any]) -> dict[str, Any]:
    """The document to write: ``doc`` as plain JSON plus ``digest``, the sha256 of each other field by name.

    One digest per field (rather than one for the whole document) lets a reader say which field was changed.
    """
    body = _plain_json({k: v for k, v in doc.items() if k != DIGEST_FIELD})
    return {**body, DIGEST_FIELD: {k: _field_digest(v) for k, v in sorted(body.items())}}


def digest_problem(doc: Mapping[str, Any], *, required: bool) -> str | None:
    """What in ``doc`` differs from its digest, as a phrase; None when it matches (or, where ``required`` is
    False, when it has no digest at all)."""
    digest = doc.get(DIGEST_FIELD)
    if digest is None:
        return "its digest is missing" if required else None
    if not (isinstance(digest, Mapping) and all(isinstance(v, str) for v in digest.values())):
        return f"its digest is malformed (expected an object of sha256 strings, got {short_repr(digest)})"
    body = {k: v for k, v in doc.items() if k != DIGEST_FIELD}
    changed = sorted(k for k in body if k in digest and _field_digest(body[k]) != digest[k])
    added = sorted(set(body) - set(digest))
    removed = sorted(set(digest) - set(body))
    parts = [f"{what} {', '.join(map(str, keys))}" for what, keys in
             (("changed", changed), ("added", added), ("removed", removed)) if keys]
    return "; ".join(parts) or None


# --------------------------------------------------------------------------------------------------------------
# Store level


@dataclass(frozen=True)
class TokenizerSpec:
    """The student tokenizer that defines the store's token grid."""

    name: str
    """Model id or path the tokenizer was loaded from (informational; the fingerprint is what is checked)."""
    fingerprint: str
    """sha256 of the tokenizer's canonical serialisation; two stores with equal fingerprints share a token grid."""
    vocab_size: int
    kind: str = ""
    """Tokenizer class, e.g. ``Qwen2TokenizerFast``."""
    files: tuple[str, ...] = ()
    """Files saved under ``student_tokenizer/`` in the store, enough to rebuild it offline."""
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    pad_token_id: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "files": list(self.files)}

    @classmethod
    def from_dict(cls, d: Any) -> TokenizerSpec:
        w = "student_tokenizer"
        d = parse_dict(d, w)
        opt = lambda k: None if d.get(k) is None else parse_int(d[k], f"{w}.{k}")  # noqa: E731
        return cls(
            name=parse_str(d.get("name"), f"{w}.name"),
            fingerprint=parse_str(d.get("fingerprint"), f"{w}.fingerprint"),
            vocab_size=parse_int(d.get("vocab_size"), f"{w}.vocab_size", minimum=1),
            kind=parse_str(d.get("kind", ""), f"{w}.kind"),
            files=_parse_files(d.get("files", []), f"{w}.files"),
            bos_token_id=opt("bos_token_id"),
            eos_token_id=opt("eos_token_id"),
            pad_token_id=opt("pad_token_id"),
        )


def _parse_files(value: Any, where: str) -> tuple[str, ...]:
    _expect(isinstance(value, (list, tuple)), "a list of file names", value, where)
    names = tuple(parse_plain_name(f, f"{where}[{i}]") for i, f in enumerate(value))
    _expect(len(set(names)) == len(names), "distinct file names", list(names), where)
    return names


@dataclass(frozen=True)
class DatasetSpec:
    """Which data the grid was made from."""

    name: str
    """``synthetic``, ``gsm8k`` or a file path."""
    split: str
    fingerprint: str
    """sha256 over the samples' ids and texts."""
    sample_ids_hash: str = ""
    """sha256 of the sample ids in store order, one per line; computed by the store itself at creation."""
    details: dict[str, Any] = field(default_factory=dict)
    """Free-form: template name and hash, limit, seed, calculator notes kept or stripped, max length policy."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Any) -> DatasetSpec:
        w = "dataset"
        d = parse_dict(d, w)
        return cls(
            name=parse_str(d.get("name"), f"{w}.name"),
            split=parse_str(d.get("split"), f"{w}.split"),
            fingerprint=parse_str(d.get("fingerprint"), f"{w}.fingerprint"),
            sample_ids_hash=parse_str(d.get("sample_ids_hash", ""), f"{w}.sample_ids_hash"),
            details=parse_dict(d.get("details", {}), f"{w}.details"),
        )


@dataclass(frozen=True)
class StoreManifest:
    """Store-level metadata, written once at creation in the root group's ``attributes["kava"]``."""

    student_tokenizer: TokenizerSpec
    dataset: DatasetSpec
    num_samples: int
    num_tokens: int
    num_shards: int
    grid_fingerprint: str = ""
    """sha256 over the grid's offsets and input ids: equal fingerprints mean the same student token grid."""
    created_by: str = ""
    """The command line that created the store."""
    created_at: str = ""
    kava_version: str = ""
    format_version: int = FORMAT_VERSION
    segment_names: tuple[str, ...] = SEGMENT_NAMES

    def to_dict(self) -> dict[str, Any]:
        return {
            "format_version": self.format_version,
            "num_samples": self.num_samples,
            "num_tokens": self.num_tokens,
            "num_shards": self.num_shards,
            "grid_fingerprint": self.grid_fingerprint,
            "segment_names": list(self.segment_names),
            "student_tokenizer": self.student_tokenizer.to_dict(),
            "dataset": self.dataset.to_dict(),
            "created_by": self.created_by,
            "created_at": self.created_at,
            "kava_version": self.kava_version,
        }

    @classmethod
    def from_dict(cls, d: Any) -> StoreManifest:
        d = parse_dict(d, "manifest")
        return cls(
            format_version=parse_format_version(d.get("format_version")),
            num_samples=parse_int(d.get("num_samples"), "num_samples", minimum=0),
            num_tokens=parse_int(d.get("num_tokens"), "num_tokens", minimum=0),
            num_shards=parse_int(d.get("num_shards"), "num_shards", minimum=0),
            grid_fingerprint=parse_str(d.get("grid_fingerprint", ""), "grid_fingerprint"),
            segment_names=tuple(parse_str(s, "segment_names") for s in d.get("segment_names", SEGMENT_NAMES)),
            student_tokenizer=TokenizerSpec.from_dict(d.get("student_tokenizer")),
            dataset=DatasetSpec.from_dict(d.get("dataset")),
            created_by=parse_str(d.get("created_by", ""), "created_by"),
            created_at=parse_str(d.get("created_at", ""), "created_at"),
            kava_version=parse_str(d.get("kava_version", ""), "kava_version"),
        )


# --------------------------------------------------------------------------------------------------------------
# Teacher level


@dataclass(frozen=True)
class LayerMap:
    """Which teacher layers feed which student layer.

    ``sources[s]`` lists ``(teacher_layer, weight)`` pairs for student layer ``s``; weights of one student layer
    sum to 1. Only the teacher layers named here are stored (``TeacherSpec.layers``).
    """

    method: str
    """``proportional``, ``explicit`` or ``cka``."""
    sources: tuple[tuple[tuple[int, float], ...], ...]
    details: dict[str, Any] = field(default_factory=dict)
    """E.g. the CKA estimator and top-k for ``cka``."""

    @property
    def student_layers(self) -> int:
        return len(self.sources)

    @property
    def teacher_layers(self) -> tuple[int, ...]:
        """The sorted teacher layers any student layer uses."""
        return tuple(sorted({t for src in self.sources for t, _ in src}))

    def __post_init__(self) -> None:
        for s, src in enumerate(self.sources):
            if not src:
                raise SchemaError(f"layer_map.sources[{s}]: expected at least one teacher layer. Got none instead.")
            total = sum(w for _, w in src)
            if abs(total - 1.0) > 1e-4:
                raise SchemaError(f"layer_map.sources[{s}]: expected weights summing to 1. Got {total} instead.")

    def to_dict(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "sources": [[[t, w] for t, w in src] for src in self.sources],
            "details": self.details,
        }

    @classmethod
    def from_dict(cls, d: Any) -> LayerMap:
        w = "layer_map"
        d = parse_dict(d, w)
        raw = d.get("sources")
        _expect(isinstance(raw, list), "a list (one entry per student layer)", raw, f"{w}.sources")
        sources = []
        for s, src in enumerate(raw):
            _expect(isinstance(src, list), "a list of [teacher_layer, weight] pairs", src, f"{w}.sources[{s}]")
            pairs = []
            for pair in src:
                ok = isinstance(pair, list) and len(pair) == 2 and isinstance(pair[1], (int, float))
                _expect(ok, "a [teacher_layer, weight] pair", pair, f"{w}.sources[{s}]")
                pairs.append((parse_int(pair[0], f"{w}.sources[{s}]", minimum=0), float(pair[1])))
            sources.append(tuple(pairs))
        return cls(
            method=parse_str(d.get("method"), f"{w}.method"),
            sources=tuple(sources),
            details=parse_dict(d.get("details", {}), f"{w}.details"),
        )


@dataclass(frozen=True)
class StorageSpec:
    """How a teacher's K/V/Q values are encoded on disk."""

    dtype: str = "float16"
    """``float16`` (default), ``bfloat16`` (stored as its uint16 bit pattern), ``float32``, ``int8``
    (with one float16 scale per token, layer and head), or ``int4``/``int2`` (packed, asymmetric groups)."""
    compressor: dict[str, Any] = field(default_factory=dict)
    """The zarr bytes-to-bytes codec before the checksum, as zarr writes it (``{"name": "blosc", ...}``)."""
    checksum: str = "crc32c"
    chunk_tokens: int = 4096
    """Rows of the token axis per chunk."""
    chunk_layers: int = 1
    """Layers per chunk: 1 lets a reader skip layers it does not need; all layers when a layer is small."""
    group_tokens: int = 0
    """int4/int2: tokens per key/query group (one scale and zero per group, layer, head and channel); divides
    ``chunk_tokens``. 0 for the other dtypes."""
    group_channels: int = 0
    """int4/int2: channels per value group (one scale and zero per token, layer, head and group); divides the head
    dimension. 0 for the other dtypes."""

    def __post_init__(self) -> None:
        parse_str(self.dtype, "storage.dtype", choices=KV_DTYPES)
        parse_int(self.chunk_tokens, "storage.chunk_tokens", minimum=1)
        parse_int(self.chunk_layers, "storage.chunk_layers", minimum=1)
        if self.dtype in LOWBIT_DTYPES:
            g = parse_int(self.group_tokens, "storage.group_tokens", minimum=1)
            parse_int(self.group_channels, "storage.group_channels", minimum=1)
            _expect(self.chunk_tokens % g == 0, f"chunk_tokens {self.chunk_tokens} a multiple of group_tokens",
                    g, "storage.group_tokens")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        if self.dtype not in LOWBIT_DTYPES:  # the other dtypes' specs read exactly as in version 2
            del d["group_tokens"], d["group_channels"]
        return d

    @classmethod
    def from_dict(cls, d: Any) -> StorageSpec:
        w = "storage"
        d = parse_dict(d, w)
        return cls(
            dtype=parse_str(d.get("dtype"), f"{w}.dtype", choices=KV_DTYPES),
            compressor=parse_dict(d.get("compressor", {}), f"{w}.compressor"),
            checksum=parse_str(d.get("checksum", "crc32c"), f"{w}.checksum", choices=("crc32c",)),
            chunk_tokens=parse_int(d.get("chunk_tokens"), f"{w}.chunk_tokens", minimum=1),
            chunk_layers=parse_int(d.get("chunk_layers"), f"{w}.chunk_layers", minimum=1),
            group_tokens=parse_int(d.get("group_tokens", 0), f"{w}.group_tokens", minimum=0),
            group_channels=parse_int(d.get("group_channels", 0), f"{w}.group_channels", minimum=0),
        )


@dataclass(frozen=True)
class LogitSpec:
    """The teacher's next-token distribution, kept per student token as its top-k log-probabilities
    (``logit_ids`` int32 and ``logit_logp`` float16, both ``[tokens, top_k]``; see FORMAT.md)."""

    top_k: int
    vocab_size: int
    """Size of the teacher's vocabulary: the ids' range."""
    tokenizer_fingerprint: str
    """The teacher tokenizer's fingerprint: equal to the student tokenizer's, the ids are the student's tokens."""

    def __post_init__(self) -> None:
        parse_int(self.top_k, "logits.top_k", minimum=1)
        parse_int(self.vocab_size, "logits.vocab_size", minimum=1)
        _expect(self.top_k <= self.vocab_size, f"top_k at most vocab_size {self.vocab_size}", self.top_k,
                "logits.top_k")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Any, where: str = "logits") -> LogitSpec:
        d = parse_dict(d, where)
        return cls(
            top_k=parse_int(d.get("top_k"), f"{where}.top_k", minimum=1),
            vocab_size=parse_int(d.get("vocab_size"), f"{where}.vocab_size", minimum=1),
            tokenizer_fingerprint=parse_str(d.get("tokenizer_fingerprint"), f"{where}.tokenizer_fingerprint"),
        )


def parse_budget(value: Any, where: str) -> int | float:
    """A kept-row budget: an int count >= 1, or a float fraction in (0, 1] (``1.0`` keeps every row)."""
    count = isinstance(value, int) and not isinstance(value, bool) and value >= 1
    share = isinstance(value, float) and 0 < value <= 1
    _expect(count or share, "a count >= 1 or a fraction in (0, 1]", value, where)
    return value


@dataclass(frozen=True)
class EvictionSpec:
    """A compressed teacher (format version 4): per sample, layer and KV head it keeps every row outside
    ``segments`` and ``keep_count(S, budget)`` of the ``S`` rows inside them, chosen by ``rule``; K and V then hold
    only the kept rows, on a *slot* axis, and ``kept`` their positions (see FORMAT.md, "Compressed teachers")."""

    rule: str
    budget: int | float
    """Rows kept of a sample's segment rows: a count (int), or a fraction of them rounded up (float)."""
    segments: tuple[str, ...] = ("reasoning",)
    """The segments (``SEGMENT_NAMES``) the budget applies to; every other row is kept."""
    seed: int = 0
    """The ``random`` rule's seed."""
    r_kv_lambda: float = 0.1
    pool: int = 5
    sinks: int = 4

    def __post_init__(self) -> None:
        parse_str(self.rule, "eviction.rule", choices=EVICTION_RULES)
        parse_budget(self.budget, "eviction.budget")
        _expect(bool(self.segments) and all(s in SEGMENT_NAMES for s in self.segments)
                and len(set(self.segments)) == len(self.segments), f"distinct segments of {list(SEGMENT_NAMES)}",
                list(self.segments), "eviction.segments")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["segments"] = list(self.segments)
        return d

    @classmethod
    def from_dict(cls, d: Any, where: str = "eviction") -> EvictionSpec:
        d = parse_dict(d, where)
        lam = d.get("r_kv_lambda", 0.1)
        _expect(isinstance(lam, (int, float)) and not isinstance(lam, bool) and 0 <= lam <= 1, "a number in [0, 1]",
                lam, f"{where}.r_kv_lambda")
        segments = d.get("segments", ["reasoning"])
        _expect(isinstance(segments, list), "a list of segment names", segments, f"{where}.segments")
        return cls(
            rule=parse_str(d.get("rule"), f"{where}.rule", choices=EVICTION_RULES),
            budget=parse_budget(d.get("budget"), f"{where}.budget"),
            segments=tuple(parse_str(s, f"{where}.segments", choices=SEGMENT_NAMES) for s in segments),
            seed=parse_int(d.get("seed", 0), f"{where}.seed", minimum=0),
            r_kv_lambda=float(lam),
            pool=parse_int(d.get("pool", 5), f"{where}.pool", minimum=1),
            sinks=parse_int(d.get("sinks", 4), f"{where}.sinks", minimum=0),
        )

    @property
    def segment_ids(self) -> tuple[int, ...]:
        """The grid's ids (``grid/segment_ids``) of ``segments``."""
        return tuple(SEGMENT_NAMES.index(s) for s in self.segments)


@dataclass(frozen=True)
class TeacherSpec:
    """Everything distillation needs to know about one teacher's arrays; written in ``teachers/<name>/``.

    K and V are ``[tokens, len(layers), kv_heads, head_dim]``; Q (optional) is
    ``[tokens, len(q_layers), num_heads, head_dim]``. ``layers`` are teacher layer indices, in axis-1 order.
    """

    name: str
    model: dict[str, Any]
    """Model id or path, revision, architecture, quantization, compute dtype, parameter count."""
    num_layers: int
    """The teacher's total layer count (``layers`` is the stored subset)."""
    layers: tuple[int, ...]
    num_heads: int
    kv_heads: int
    head_dim: int
    layer_map: LayerMap
    k_rope: str = "pre"
    """``pre``: keys before the rotary embedding (default); ``post``: as the KV cache holds them."""
    rope: dict[str, Any] | None = None
    """The teacher's RoPE parameters (type, theta, scaling, rotary dims); None for models without RoPE."""
    q_layers: tuple[int, ...] = ()
    """Teacher layers whose queries are stored; empty when Q is not stored."""
    alignment: dict[str, Any] = field(default_factory=lambda: {"method": "identity"})
    """How teacher tokens were mapped to the student grid: ``identity``, ``char_iou``, ``time_warp``."""
    storage: StorageSpec = field(default_factory=StorageSpec)
    created_by: str = ""
    details: dict[str, Any] = field(default_factory=dict)
    logits: LogitSpec | None = None
    """The teacher's stored top-k log-probabilities per student token; None when not stored."""
    eviction: EvictionSpec | None = None
    """A compressed teacher: which rows its K/V keep (format version 4); None keeps every row."""
    attention: str = "causal"
    """``causal``, ``bidirectional`` or ``cross`` (:data:`ATTENTION_KINDS`); absent from a spec: ``causal``."""
    positions: str | None = None
    """``rope``, ``absolute``, ``relative-bias`` or ``none`` (:data:`POSITIONS`); None (absent from a spec) reads as
    ``rope`` when ``rope`` is set, else ``absolute``: what every teacher was before the field existed."""
    part_of: str | None = None
    """The model an encoder-decoder part came from, shared by its parts (``t5.enc``, ``t5.dec``, ``t5.cross``);
    None for a whole model."""

    def __post_init__(self) -> None:
        check_teacher_name(self.name)
        if self.positions is None:
            object.__setattr__(self, "positions", "rope" if self.rope is not None else "absolute")
        if self.attention not in ATTENTION_KINDS:
            raise SchemaError(f"attention: expected one of {', '.join(ATTENTION_KINDS)}. Got {self.attention!r} "
                              "instead.")
        if self.positions not in POSITIONS:
            raise SchemaError(f"positions: expected one of {', '.join(POSITIONS)}. Got {self.positions!r} instead.")
        if (self.positions == "rope") != (self.rope is not None):
            raise SchemaError(
                f"positions: expected 'rope' exactly when the spec has rope parameters. Got positions "
                f"{self.positions!r} with rope {'set' if self.rope is not None else 'null'} instead."
            )
        if self.attention == "cross" and self.part_of is None:
            raise SchemaError("part_of: expected the encoder-decoder a cross-attention teacher belongs to. Got none "
                              "instead.")
        if self.eviction is not None and not set(self.q_layers) <= set(self.layers):
            raise SchemaError(
                f"q_layers: a compressed teacher (eviction) stores queries only on its K/V layers {list(self.layers)} "
                f"(the rows it kept there). Got {list(self.q_layers)} instead. Pass --q-layers within --layers, or "
                "extract without --kv-budget."
            )
        if self.k_rope not in K_ROPE:
            raise SchemaError(f"k_rope: expected one of pre, post. Got {self.k_rope!r} instead.")
        for what, layers in (("layers", self.layers), ("q_layers", self.q_layers)):
            if any(not 0 <= l < self.num_layers for l in layers) or len(set(layers)) != len(layers):
                raise SchemaError(
                    f"{what}: expected distinct teacher layers in [0, {self.num_layers}). Got {list(layers)} instead."
                )
        missing = set(self.layer_map.teacher_layers) - set(self.layers)
        if missing:
            raise SchemaError(
                f"layers: expected every teacher layer the layer map uses. Got {list(self.layers)} instead, "
                f"missing {sorted(missing)}."
            )
        st = self.storage
        if st.dtype in LOWBIT_DTYPES and (self.head_dim % st.group_channels or (self.head_dim * 4) % 8
                                          or (st.dtype == "int2" and self.head_dim % 4)):
            raise SchemaError(
                f"storage: expected a head_dim divisible by group_channels {st.group_channels} and by "
                f"{8 // (4 if st.dtype == 'int4' else 2)} (codes packed per byte) for {st.dtype}. Got head_dim "
                f"{self.head_dim} instead. Store this teacher with --kv-dtype int8."
            )

    @property
    def has_q(self) -> bool:
        return bool(self.q_layers)

    @property
    def has_logits(self) -> bool:
        return self.logits is not None

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "model": self.model,
            "num_layers": self.num_layers,
            "layers": list(self.layers),
            "num_heads": self.num_heads,
            "kv_heads": self.kv_heads,
            "head_dim": self.head_dim,
            "k_rope": self.k_rope,
            "rope": self.rope,
            "q_layers": list(self.q_layers),
            "layer_map": self.layer_map.to_dict(),
            "alignment": self.alignment,
            "storage": self.storage.to_dict(),
            "created_by": self.created_by,
            "details": self.details,
            # Written only when stored: a teacher without logits keeps the spec it always had.
            **({"logits": self.logits.to_dict()} if self.logits is not None else {}),
            **({"eviction": self.eviction.to_dict()} if self.eviction is not None else {}),
            # Written only where they differ from what a spec without them reads as (a decoder), so every decoder
            # teacher keeps the spec, and digests, it always had.
            **({"attention": self.attention} if self.attention != "causal" else {}),
            **({"positions": self.positions} if self.positions != ("rope" if self.rope is not None else "absolute")
               else {}),
            **({"part_of": self.part_of} if self.part_of is not None else {}),
        }

    @classmethod
    def from_dict(cls, d: Any) -> TeacherSpec:
        d = parse_dict(d, "teacher")
        name = parse_teacher_name(d.get("name"), "teacher.name")
        w = f"teachers/{name}"
        rope = d.get("rope")
        return cls(
            name=name,
            model=parse_dict(d.get("model", {}), f"{w}.model"),
            num_layers=parse_int(d.get("num_layers"), f"{w}.num_layers", minimum=1),
            layers=parse_int_list(d.get("layers"), f"{w}.layers"),
            num_heads=parse_int(d.get("num_heads"), f"{w}.num_heads", minimum=1),
            kv_heads=parse_int(d.get("kv_heads"), f"{w}.kv_heads", minimum=1),
            head_dim=parse_int(d.get("head_dim"), f"{w}.head_dim", minimum=1),
            k_rope=parse_str(d.get("k_rope", "pre"), f"{w}.k_rope", choices=K_ROPE),
            rope=None if rope is None else parse_dict(rope, f"{w}.rope"),
            q_layers=parse_int_list(d.get("q_layers", []), f"{w}.q_layers"),
            layer_map=LayerMap.from_dict(d.get("layer_map")),
            alignment=parse_dict(d.get("alignment", {"method": "identity"}), f"{w}.alignment"),
            storage=StorageSpec.from_dict(d.get("storage")),
            created_by=parse_str(d.get("created_by", ""), f"{w}.created_by"),
            details=parse_dict(d.get("details", {}), f"{w}.details"),
            logits=None if d.get("logits") is None else LogitSpec.from_dict(d["logits"], f"{w}.logits"),
            eviction=None if d.get("eviction") is None else EvictionSpec.from_dict(d["eviction"], f"{w}.eviction"),
            attention=parse_str(d.get("attention", "causal"), f"{w}.attention", choices=ATTENTION_KINDS),
            positions=None if d.get("positions") is None else parse_str(d["positions"], f"{w}.positions",
                                                                         choices=POSITIONS),
            part_of=None if d.get("part_of") is None else parse_teacher_name(d["part_of"], f"{w}.part_of"),
        )


def proportional_layer_map(teacher_layers: int, student_layers: int) -> LayerMap:
    """Student layer ``s`` takes teacher layer ``round(s * (L_t - 1) / (L_s - 1))`` (ends map to ends)."""
    if teacher_layers < 1 or student_layers < 1:
        raise ConfigError(
            f"Expected positive layer counts. Got teacher={teacher_layers}, student={student_layers} instead."
        )
    if student_layers == 1:
        return LayerMap("proportional", (((teacher_layers - 1, 1.0),),))
    scale = (teacher_layers - 1) / (student_layers - 1)
    return LayerMap("proportional", tuple(((round(s * scale), 1.0),) for s in range(student_layers)))
