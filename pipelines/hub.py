"""Sharing stores and students on the Hugging Face Hub: `kava store push|pull`, `kava push`, `kava pull`.

Through huggingface_hub's ``HfApi`` rather than HTTP by hand: it uploads large files through LFS (Xet where the Hub
offers it), splits a large folder into several commits and resumes an interrupted upload, retries what the network
drops, and writes the card metadata the Hub indexes.

Two backends (:mod:`.hub_backends`): the Hub itself, or a private one that ``HF_ENDPOINT`` names, and a local
directory standing in for it (``--hub-dir`` or ``KAVA_HUB_DIR``). Everything here (which files go, the cards, the
checks before a push and after a pull) is shared by both, so the tests run all of it but the HfApi calls.

A push is two commits: every file but the one that makes the repo what it is (a store's root ``zarr.json``, which
holds its manifest), deleting whatever an earlier push left; then that file and the card. A pull downloads into DEST
with the root ``zarr.json`` last, then checks the copy whole before it reports success (a store: `kava store verify`;
a student: every file's sha256 against its card). A marker in ``DEST/.cache/`` lets an interrupted pull resume; it
goes, with huggingface_hub's own download records, once the copy checks out.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from fnmatch import fnmatch
from pathlib import Path
from typing import Any

from huggingface_hub import ModelCard
from huggingface_hub.utils import DEFAULT_IGNORE_PATTERNS

from kava.core.errors import ChecksumError, ConfigError, KavaError, StoreError
from kava.core.locks import beside, writer_lock
from kava.core.log import human_bytes
from kava.kvstore import KVStore, summary, verify_store
from kava.kvstore import layout as store_layout
from kava.kvstore.remote import is_url, redact
from kava.kvstore.zarr_io import group_attributes

from .hub_backends import HubBackend, LocalHub, Repo, files_in, open_hub, select
from .hub_cards import CARD, StoreFacts, StudentDir, dataset_card, model_card, read_results

__all__ = ["HubBackend", "LocalHub", "PullReport", "PushReport", "Repo", "open_hub", "pull_store", "pull_student",
           "push_store", "push_student"]

ROOT_META = "zarr.json"
"""A store's root metadata, with its manifest: the file that makes a directory an openable store."""
PULL_MARK = ".cache/kava-pull.json"
"""In DEST while a pull is under way: which repo it pulls (so a rerun resumes it)."""
_HF_LOCAL_RECORDS = ".cache/huggingface"
"""Where ``snapshot_download(local_dir=...)`` keeps what it downloaded (etags), for its own resume."""
_NEVER_PUSHED = [*DEFAULT_IGNORE_PATTERNS, PULL_MARK]
_NEVER_PULLED = [".gitattributes"]
STUDENT_FILES = (
    "config.json", "generation_config.json", "model.safetensors", "model-*-of-*.safetensors",
    "model.safetensors.index.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
    "tokenizer.model", "vocab.json", "vocab.txt", "merges.txt", "added_tokens.json", "chat_template.jinja",
    "chat_template.json", "kava.json", "config.yaml",
)
"""What a student push uploads from its directory: the model, its tokenizer, ``kava.json`` and ``config.yaml``; not
checkpoints, metrics, projectors or locks."""
LATENT_FILES = ("latent.json", "latent.safetensors", "eval.json")
"""And from a `kava latent` directory: the latent tokens' settings and weights, and its own evaluation."""

Log = Callable[[str], None]


def _quiet(_: str) -> None:
    pass


# --------------------------------------------------------------------------------------------------------------
# Reports and the pull's destination


@dataclass
class PushReport:
    repo: str
    kind: str
    revision: str
    where: str
    source: str
    files: int
    bytes: int
    digest: str | None = None
    """A store's digest (the one its card and its students' cards name)."""


@dataclass
class PullReport:
    repo: str
    kind: str
    revision: str
    where: str
    dest: str
    files: int
    bytes: int
    resumed: bool
    checked: str
    """What was checked before success was reported."""


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _mark(repo: Repo) -> dict[str, str]:
    return {"repo": repo.id, "kind": repo.kind, "revision": repo.revision}


def _start_pull(dest: Path, repo: Repo, *, same: Callable[[Path], bool]) -> bool:
    """Make ``dest`` ready to pull ``repo`` into and mark it; True when this resumes a pull (or refreshes a copy).

    A DEST holding anything but an interrupted pull of ``repo`` or a copy of it (``same``) is refused."""
    if dest.exists() and not dest.is_dir():
        raise ConfigError(f"DEST {dest}: expected a directory to pull into. Got a file. Choose another DEST.")
    mark = dest / PULL_MARK
    resuming = dest.is_dir() and any(dest.iterdir())
    if resuming:
        try:
            ours = json.loads(mark.read_text()) == _mark(repo)
        except (OSError, ValueError):
            ours = False
        if not ours and not same(dest):
            raise ConfigError(f"DEST {dest}: not empty, and neither an interrupted pull of {repo} nor a copy of it. "
                              "Choose an empty or new DEST, or delete it first.")
    mark.parent.mkdir(parents=True, exist_ok=True)
    mark.write_text(json.dumps(_mark(repo)))
    return resuming


def _finish_pull(dest: Path) -> None:
    (dest / PULL_MARK).unlink(missing_ok=True)
    shutil.rmtree(dest / _HF_LOCAL_RECORDS, ignore_errors=True)
    with contextlib.suppress(OSError):  # only when nothing else is in it
        (dest / PULL_MARK).parent.rmdir()


def _tally(root: Path, paths: Sequence[str]) -> tuple[int, int]:
    return len(paths), sum((root / p).stat().st_size for p in paths)


# --------------------------------------------------------------------------------------------------------------
# Stores


def _store_docs(store: KVStore) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """The raw manifest and teacher specs, digests included, as their groups' attributes hold them."""
    manifest = group_attributes(store.zarr_store, "")[store_layout.MANIFEST_ATTR]
    return manifest, {name: store.teacher_document(name)[1] for name in store.teachers}


def _manifest_in(root_meta: bytes | None) -> dict[str, Any] | None:
    """The store manifest in a root ``zarr.json``'s bytes; None when they are not a store's."""
    try:
        found = json.loads(root_meta or b"null")["attributes"][store_layout.MANIFEST_ATTR]
    except (ValueError, KeyError, TypeError):
        return None
    return found if isinstance(found, dict) else None


def push_store(path: str | os.PathLike[str], repo_id: str, *, hub: HubBackend, revision: str = "main",
               private: bool = False, log: Log = _quiet) -> PushReport:
    """Push the local store at ``path`` to the dataset repo ``repo_id`` with a card from its manifest.

    Refused, before anything is uploaded, unless the store verifies whole (every chunk's crc32c, every shard of
    every teacher complete) and has a teacher. The store's lock is held shared meanwhile, so an extraction cannot
    start writing it."""
    repo = Repo.parse(repo_id, "dataset", revision)
    if is_url(str(path)):
        raise ConfigError(f"STORE {redact(str(path))}: a push reads a store on this machine. Copy it here first "
                          f"(`kava store cp {redact(str(path))} runs/kv.zarr`), then push that copy.")
    where = Path(path)
    if not where.is_dir():
        raise ConfigError(f"STORE {where}: no such directory. Pass the path of a store written by `kava extract`.")
    with contextlib.ExitStack() as hold:
        if os.access(where.parent, os.W_OK):  # (the lock file lives beside the store)
            hold.enter_context(writer_lock(beside(where), output=where, shared=True,
                                           fix="push another, finished store"))
        log(f"verifying {where} before the push (every chunk's crc32c)")
        checked = verify_store(where)
        if not checked.ok:
            raise StoreError(f"{where}: does not verify, so it is not pushed: {checked.problems[0]} "
                             f"({len(checked.problems)} problem(s); `kava store verify {where}` lists them). "
                             "Fix it, then push again.")
        store = KVStore.open(where)
        if not store.teachers:
            raise StoreError(f"{where}: holds no teacher yet, so there is nothing to push. Run `kava extract "
                             f"--store {where} ...` first.")
        manifest, teachers = _store_docs(store)
        digest = StoreFacts.from_docs(str(where), manifest, teachers).digest
        card = dataset_card(summary(store), digest, store.manifest.grid_fingerprint, repo.id)
        files = select(files_in(where), None, _NEVER_PUSHED)
        count, size = _tally(where, files)
        hub.create_repo(repo, private=private)
        log(f"uploading {count} files ({human_bytes(size)}) to {repo} on {hub.where}")
        hub.upload_folder(repo, where, ignore=[ROOT_META, CARD, *_NEVER_PUSHED],
                          message=f"kava store push: {where.name} (chunks and metadata)")
        hub.commit_files(repo, {ROOT_META: where / ROOT_META, CARD: str(card).encode()},
                         message=f"kava store push: {where.name} (manifest and card)")
    return PushReport(repo=repo.id, kind=repo.kind, revision=repo.revision, where=hub.where, source=str(where),
                      files=count, bytes=size, digest=digest)


def pull_store(repo_id: str, dest: str | os.PathLike[str], *, hub: HubBackend, revision: str = "main",
               log: Log = _quiet) -> PullReport:
    """Download the store in the dataset repo ``repo_id`` into ``dest`` and verify it whole before reporting success.

    DEST must be empty or new, or hold an interrupted pull of the same repo (which this resumes) or a copy of the
    same store (which is checked again). The root ``zarr.json`` comes last and is removed again when the copy does
    not verify, so DEST is never an openable store that is not sound."""
    repo = Repo.parse(repo_id, "dataset", revision)
    dest = Path(dest)
    root_meta = hub.read_file(repo, ROOT_META)
    if _manifest_in(root_meta) is None:
        raise StoreError(f"{repo} on {hub.where}: holds no KaVa store (no root zarr.json with a store manifest). "
                         "Check REPO_ID, or push the store with `kava store push`.")
    resumed = _start_pull(dest, repo, same=lambda d: (d / ROOT_META).is_file()
                          and (d / ROOT_META).read_bytes() == root_meta)
    (dest / ROOT_META).unlink(missing_ok=True)  # back last, after everything else is in place
    log(f"{'resuming the pull' if resumed else 'pulling'} {repo} from {hub.where} into {dest}")
    hub.download(repo, dest, ignore=[ROOT_META, CARD, *_NEVER_PULLED])
    hub.download(repo, dest, allow=[ROOT_META])
    log(f"verifying {dest} (every chunk's crc32c)")
    try:
        checked = verify_store(dest)
        problems = [str(p) for p in checked.problems]
    except KavaError as e:
        problems = [str(e)]
    if problems:
        (dest / ROOT_META).unlink(missing_ok=True)
        raise StoreError(f"{dest}: the store pulled from {repo} fails verification, so it is not kept as a store: "
                         f"{problems[0]} ({len(problems)} problem(s)). Delete {dest} and pull again; if that fails "
                         "too, the copy on the hub is damaged: push it again from a sound store.")
    _finish_pull(dest)
    count, size = _tally(dest, files_in(dest))
    return PullReport(repo=repo.id, kind=repo.kind, revision=repo.revision, where=hub.where, dest=str(dest),
                      files=count, bytes=size, resumed=resumed,
                      checked=f"{checked.chunks_checked} chunks' crc32c ({human_bytes(checked.bytes_checked)})")


# --------------------------------------------------------------------------------------------------------------
# Students


def _student_dir(path: Path) -> StudentDir:
    """The student at ``path``, refused with the reason unless `kava distill` or `kava latent` finished it."""
    if not path.is_dir():
        raise ConfigError(f"STUDENT {path}: no such directory. Pass the --out of a finished `kava distill` or "
                          "`kava latent`.")
    latent = (path / "latent.json").is_file()
    if not latent and not (path / "kava.json").is_file():
        running = " (its checkpoints are there: finish it with --resume)" if (path / "checkpoints").is_dir() else ""
        raise ConfigError(f"STUDENT {path}: expected a directory written by `kava distill` (kava.json and "
                          f"config.json) or `kava latent` (latent.json). Got no kava.json{running}.")
    if not (path / "config.json").is_file() or not any(path.glob("model*.safetensors")):
        raise ConfigError(f"STUDENT {path}: expected the model's config.json and safetensors weights beside "
                          f"{'latent.json' if latent else 'kava.json'}. Got none. Train it again.")
    return StudentDir.read(path, latent=latent)


def _store_facts(student: StudentDir, hub: HubBackend, store_repo: Repo | None) -> tuple[StoreFacts | None, str]:
    """What is known of the store a student was distilled from: read from the store where ``kava.json`` says it is,
    else from the dataset repo ``store_repo`` it was pushed to; (None, why) when neither can be read."""
    where = student.record.get("store")
    if student.latent or not where:
        return None, "trained without a store"
    repo_id = store_repo.id if store_repo else None
    if not is_url(where) and Path(where).is_dir():
        try:
            return StoreFacts.from_docs(where, *_store_docs(KVStore.open(where)), repo=repo_id), ""
        except KavaError as e:
            note = f"the store at {where} did not open ({e})"
    else:
        note = f"the store at {redact(where)} is not on this machine"
    if store_repo is not None:
        manifest = _manifest_in(hub.read_file(store_repo, ROOT_META))
        teachers = {}
        for name in student.record.get("teachers") or []:
            raw = hub.read_file(store_repo, f"{store_layout.teacher_key(name)}/{ROOT_META}")
            try:
                teachers[name] = json.loads(raw or b"{}")["attributes"][store_layout.TEACHER_ATTR]
            except (ValueError, KeyError, TypeError):
                teachers[name] = None
        if manifest is not None and all(teachers.values()):
            return StoreFacts.from_docs(f"{store_repo}", manifest, teachers, repo=repo_id), ""
        note += f", and {store_repo} on {hub.where} holds no store with its teachers"
    return None, note


def push_student(path: str | os.PathLike[str], repo_id: str, *, hub: HubBackend, revision: str = "main",
                 private: bool = False, results: str | os.PathLike[str] | None = None,
                 store_repo: str | None = None, log: Log = _quiet) -> PushReport:
    """Push a student (a `kava distill` or `kava latent` --out) to the model repo ``repo_id``: its weights, tokenizer,
    ``kava.json`` (or ``latent.json`` and ``latent.safetensors``), ``config.yaml`` and a model card naming its
    teachers, the store's digest, the objective, steps, final losses and, with ``results``, an evaluation."""
    repo = Repo.parse(repo_id, "model", revision)
    linked = None if store_repo is None else Repo.parse(store_repo, "dataset", flag="--store-repo")
    where = Path(path)
    student = _student_dir(where)
    if results is not None:
        shown = read_results(results, student=where)
    elif student.latent and (where / "eval.json").is_file():
        shown = read_results(where / "eval.json")
    else:
        shown = None
    patterns = STUDENT_FILES + (LATENT_FILES if student.latent else ())
    names = sorted(p.name for p in where.iterdir() if p.is_file() and any(fnmatch(p.name, pat) for pat in patterns))
    facts, note = _store_facts(student, hub, linked)
    log(f"hashing {len(names)} files of {where}")
    files = {name: _sha256(where / name) for name in names}
    card = model_card(student, repo.id, files, store=facts, store_note=note, results=shown)
    count, size = _tally(where, names)
    hub.create_repo(repo, private=private)
    log(f"uploading {count} files ({human_bytes(size)}) to {repo} on {hub.where}")
    hub.upload_folder(repo, where, allow=names, message=f"kava push: {where.name}")
    hub.commit_files(repo, {CARD: str(card).encode()}, message=f"kava push: {where.name} (card)")
    return PushReport(repo=repo.id, kind=repo.kind, revision=repo.revision, where=hub.where, source=str(where),
                      files=count, bytes=size, digest=facts.digest if facts else None)


def _card_files(raw: bytes | None) -> dict[str, str] | None:
    """The files a card written by `kava push` lists, with their sha256; None for any other README."""
    if raw is None:
        return None
    try:
        block = getattr(ModelCard(raw.decode("utf-8"), ignore_metadata_errors=True).data, "kava", None)
    except (UnicodeDecodeError, ValueError):
        return None
    files = block.get("files") if isinstance(block, dict) else None
    if not isinstance(files, dict) or not all(isinstance(v, str) for v in files.values()):
        return None
    # Names are joined to DEST (and a mismatched file removed): only plain paths inside it.
    if not all(isinstance(k, str) and k and not k.startswith("/") and ".." not in k.split("/") for k in files):
        return None
    return dict(files)


def pull_student(repo_id: str, dest: str | os.PathLike[str], *, hub: HubBackend, revision: str = "main",
                 log: Log = _quiet) -> PullReport:
    """Download the student in the model repo ``repo_id`` into ``dest`` and check every file against the sha256 its
    card records before reporting success. DEST as for :func:`pull_store`."""
    repo = Repo.parse(repo_id, "model", revision)
    dest = Path(dest)
    card = hub.read_file(repo, CARD)
    files = _card_files(card)
    if files is None:
        raise ConfigError(f"{repo} on {hub.where}: its README.md is not a card `kava push` wrote (no list of files "
                          "with their sha256), so a download could not be checked. Fetch it with `hf download` "
                          "instead.")
    resumed = _start_pull(dest, repo, same=lambda d: (d / CARD).is_file() and (d / CARD).read_bytes() == card)
    log(f"{'resuming the pull' if resumed else 'pulling'} {repo} from {hub.where} into {dest}")
    hub.download(repo, dest, ignore=_NEVER_PULLED)
    bad = [name for name, want in files.items() if not (dest / name).is_file() or _sha256(dest / name) != want]
    if bad:
        for name in bad:  # so that running the command again downloads them again
            (dest / name).unlink(missing_ok=True)
        raise ChecksumError(f"{dest}: {len(bad)} file(s) pulled from {repo} are missing or differ from the sha256 "
                            f"its card records (first: {bad[0]}); they were removed. Run the same command again to "
                            "download them again; if that fails too, the copy on the hub is damaged: push the "
                            "student again.")
    _finish_pull(dest)
    count, size = _tally(dest, files_in(dest))
    return PullReport(repo=repo.id, kind=repo.kind, revision=repo.revision, where=hub.where, dest=str(dest),
                      files=count, bytes=size, resumed=resumed, checked=f"{len(files)} files' sha256")
