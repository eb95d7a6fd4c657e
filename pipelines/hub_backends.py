"""Where shared stores and students live: the Hugging Face Hub through ``HfApi``, or a local directory standing in
for it (``--hub-dir`` / ``KAVA_HUB_DIR``), behind one small interface, :class:`HubBackend`.

:class:`LocalHub` lays repos out as ``DIR/datasets/<owner>/<name>/<revision>/`` and ``DIR/models/<owner>/<name>/
<revision>/``. :class:`HfHub` talks to ``HF_ENDPOINT`` (else huggingface.co); huggingface_hub finds the token
(``HF_TOKEN``, else the file ``hf auth login`` wrote) and KaVa never passes, writes or logs one. Its errors become
one line naming the repo and the fix (:func:`hub_errors`).
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Protocol

from huggingface_hub import CommitOperationAdd, HfApi, constants, get_token, hf_hub_download, snapshot_download
from huggingface_hub import errors as hf_errors
from huggingface_hub.utils import DEFAULT_IGNORE_PATTERNS, filter_repo_objects, validate_repo_id

from kava.core.errors import ConfigError, KavaError, StoreError
from kava.core.hub import hub_offline

HUB_DIR_ENV = "KAVA_HUB_DIR"
"""The environment variable `--hub-dir` falls back to."""
_REVISION = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")


def _version() -> str:
    try:
        return version("kava")
    except PackageNotFoundError:  # pragma: no cover - running from a source tree
        return "0+unknown"


@dataclass(frozen=True)
class Repo:
    """A repo on the Hub (or in a hub dir): ``owner/name``, its kind and the branch read or written."""

    id: str
    kind: str
    """``dataset`` (a store) or ``model`` (a student)."""
    revision: str = "main"

    def __str__(self) -> str:
        return f"{self.kind} repo {self.id}" + ("" if self.revision == "main" else f"@{self.revision}")

    @classmethod
    def parse(cls, repo_id: str, kind: str, revision: str = "main", *, flag: str = "REPO_ID") -> Repo:
        """Checked up front: ``owner/name`` as the Hub spells ids, and a plain branch name."""
        problems = []
        try:
            validate_repo_id(repo_id)
            ok = repo_id.count("/") == 1
        except ValueError:  # HFValidationError
            ok = False
        if not ok:
            problems.append(f"{flag}: expected owner/name (letters, digits, '-', '_' and '.'). Got {repo_id!r} "
                            "instead.")
        if not _REVISION.match(revision or ""):
            problems.append(f"--revision: expected a branch name (letters, digits, '-', '_' and '.'). Got "
                            f"{revision!r} instead.")
        if problems:
            raise ConfigError.from_problems(problems)
        return cls(repo_id, kind, revision)


class HubBackend(Protocol):
    """Where repos live. Paths in a repo are POSIX and relative; ``allow``/``ignore`` are huggingface_hub's glob
    patterns (``*`` crosses ``/``)."""

    where: str
    """Named in messages: ``the Hub at https://...`` or ``hub dir DIR``."""

    def create_repo(self, repo: Repo, *, private: bool) -> None:
        """Create ``repo`` and its revision unless they exist (an existing repo keeps its visibility)."""

    def upload_folder(self, repo: Repo, folder: Path, *, ignore: Sequence[str] = (),
                      allow: Sequence[str] | None = None, message: str) -> None:
        """Make the revision's files ``folder``'s (those ``allow`` matches, less those ``ignore`` matches): upload
        them and delete every other file there but ``.gitattributes``."""

    def commit_files(self, repo: Repo, files: Mapping[str, Path | bytes], *, message: str) -> None:
        """Add ``files`` (path in the repo → a local file or its bytes) in one commit."""

    def read_file(self, repo: Repo, path: str) -> bytes | None:
        """One file's bytes; None when the repo has no such file (a missing repo is an error)."""

    def download(self, repo: Repo, dest: Path, *, ignore: Sequence[str] = (),
                 allow: Sequence[str] | None = None) -> None:
        """Download the revision's files into ``dest``, keeping those an interrupted download already finished."""


def select(paths: Sequence[str], allow: Sequence[str] | None, ignore: Sequence[str]) -> list[str]:
    return sorted(filter_repo_objects(paths, allow_patterns=list(allow) if allow is not None else None,
                                      ignore_patterns=[*ignore, *DEFAULT_IGNORE_PATTERNS]))


def files_in(folder: Path) -> list[str]:
    """Every file under ``folder``, as POSIX paths relative to it."""
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())


def _put(target: Path, data: Path | bytes) -> None:
    """Write ``target`` whole: under a temporary name, then renamed, so a reader never sees half a file."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    if isinstance(data, bytes):
        tmp.write_bytes(data)
    else:
        shutil.copyfile(data, tmp)
    os.replace(tmp, target)


class LocalHub:
    """A directory standing in for the Hub: a repo's revision is ``DIR/<kind>s/<owner>/<name>/<revision>/``.

    Visibility means nothing here; files are copied whole (temporary name, then rename), and a download keeps a file
    already at DEST with the source's size (what an interrupted download left; the pull checks every file after)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.where = f"hub dir {root}"

    def _dir(self, repo: Repo) -> Path:
        return self.root / f"{repo.kind}s" / repo.id / repo.revision

    def _existing(self, repo: Repo) -> Path:
        base = self.root / f"{repo.kind}s" / repo.id
        if not base.is_dir():
            raise ConfigError(f"{repo}: not found in {self.where} (no {base}). Check REPO_ID and --hub-dir, or push "
                              "it first.")
        if not self._dir(repo).is_dir():
            raise ConfigError(f"{repo}: no revision {repo.revision!r} in {self.where} (it has "
                              f"{', '.join(sorted(p.name for p in base.iterdir())) or 'none'}). Check --revision.")
        return self._dir(repo)

    def create_repo(self, repo: Repo, *, private: bool) -> None:
        self._dir(repo).mkdir(parents=True, exist_ok=True)

    def upload_folder(self, repo: Repo, folder: Path, *, ignore: Sequence[str] = (),
                      allow: Sequence[str] | None = None, message: str) -> None:
        target = self._existing(repo)
        keep = select(files_in(folder), allow, ignore)
        for stale in set(files_in(target)) - set(keep) - {".gitattributes"}:
            (target / stale).unlink()
        for rel in keep:
            _put(target / rel, folder / rel)

    def commit_files(self, repo: Repo, files: Mapping[str, Path | bytes], *, message: str) -> None:
        target = self._existing(repo)
        for rel, data in files.items():
            _put(target / rel, data)

    def read_file(self, repo: Repo, path: str) -> bytes | None:
        found = self._existing(repo) / path
        return found.read_bytes() if found.is_file() else None

    def download(self, repo: Repo, dest: Path, *, ignore: Sequence[str] = (),
                 allow: Sequence[str] | None = None) -> None:
        source = self._existing(repo)
        for rel in select(files_in(source), allow, ignore):
            there = dest / rel
            if not (there.is_file() and there.stat().st_size == (source / rel).stat().st_size):
                _put(there, source / rel)


class HfHub:
    """The Hugging Face Hub (``HF_ENDPOINT``, else huggingface.co) through ``HfApi``."""

    def __init__(self) -> None:
        self.api = HfApi(library_name="kava", library_version=_version())
        self.where = f"the Hub at {constants.ENDPOINT}"
        self._client = {"library_name": "kava", "library_version": _version()}

    def create_repo(self, repo: Repo, *, private: bool) -> None:
        with hub_errors(repo, self.where):
            self.api.create_repo(repo.id, repo_type=repo.kind, private=private or None, exist_ok=True)
            if repo.revision != constants.DEFAULT_REVISION:
                self.api.create_branch(repo.id, branch=repo.revision, repo_type=repo.kind, exist_ok=True)

    def upload_folder(self, repo: Repo, folder: Path, *, ignore: Sequence[str] = (),
                      allow: Sequence[str] | None = None, message: str) -> None:
        with hub_errors(repo, self.where):
            self.api.upload_folder(repo_id=repo.id, folder_path=folder, repo_type=repo.kind, revision=repo.revision,
                                   allow_patterns=list(allow) if allow is not None else None,
                                   ignore_patterns=list(ignore), delete_patterns="*", commit_message=message)

    def commit_files(self, repo: Repo, files: Mapping[str, Path | bytes], *, message: str) -> None:
        operations = [CommitOperationAdd(path_in_repo=rel, path_or_fileobj=data if isinstance(data, bytes)
                                         else str(data)) for rel, data in files.items()]
        with hub_errors(repo, self.where):
            self.api.create_commit(repo.id, operations, commit_message=message, repo_type=repo.kind,
                                   revision=repo.revision)

    def read_file(self, repo: Repo, path: str) -> bytes | None:
        with hub_errors(repo, self.where):
            try:
                local = hf_hub_download(repo.id, path, repo_type=repo.kind, revision=repo.revision, **self._client)
            except hf_errors.RemoteEntryNotFoundError:
                return None
        return Path(local).read_bytes()

    def download(self, repo: Repo, dest: Path, *, ignore: Sequence[str] = (),
                 allow: Sequence[str] | None = None) -> None:
        with hub_errors(repo, self.where):
            snapshot_download(repo.id, repo_type=repo.kind, revision=repo.revision, local_dir=dest,
                              allow_patterns=list(allow) if allow is not None else None,
                              ignore_patterns=list(ignore), **self._client)


def offline_message() -> str:
    return ("The Hugging Face Hub is off here (HF_HUB_OFFLINE=1). Pass --hub-dir DIR (or set KAVA_HUB_DIR) to use "
            "a local directory standing in for it, or go online: unset HF_HUB_OFFLINE (and set HF_ENDPOINT for a "
            "private Hub).")


def _network_error(error: BaseException) -> bool:
    """A connection that failed or timed out (huggingface_hub's HTTP client raises its own types, after retries)."""
    seen: BaseException | None = error
    while seen is not None:
        if isinstance(seen, (ConnectionError, TimeoutError)) or type(seen).__module__.split(".")[0] == "httpx":
            return True
        seen = seen.__cause__ or seen.__context__
    return False


@contextlib.contextmanager
def hub_errors(repo: Repo, where: str) -> Iterator[None]:
    """huggingface_hub's errors as one line naming the repo, what happened and the fix."""
    try:
        yield
    except hf_errors.LocalTokenNotFoundError as e:
        raise ConfigError(f"{repo}: {where} needs a token. Set HF_TOKEN or run `hf auth login`, or pass --hub-dir "
                          "DIR.") from e
    except hf_errors.OfflineModeIsEnabled as e:
        raise ConfigError(offline_message()) from e
    except hf_errors.RevisionNotFoundError as e:
        raise ConfigError(f"{repo}: no revision {repo.revision!r} on {where}. Check --revision.") from e
    except hf_errors.GatedRepoError as e:
        raise ConfigError(f"{repo}: gated on {where}. Accept its conditions on its page with the account your "
                          "token belongs to.") from e
    except hf_errors.RepositoryNotFoundError as e:
        raise ConfigError(f"{repo}: not found on {where}, or your token may not read it. Check REPO_ID; for a "
                          "private repo set HF_TOKEN or run `hf auth login`.") from e
    except hf_errors.HfHubHTTPError as e:
        status = getattr(e.response, "status_code", None)
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        fix = ("Check that your token may write to it (a write token, for a repo of yours or of an organization "
               "you belong to)." if status in (401, 403) else "Run the same command again: it resumes.")
        raise StoreError(f"{repo}: {where} answered {status}: {first} {fix}") from e
    except Exception as e:
        if isinstance(e, KavaError) or not _network_error(e):
            raise
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise StoreError(f"{repo}: {where} could not be reached ({first}). Check the network (and HF_ENDPOINT), "
                         "then run the same command again: it resumes.") from e


def open_hub(hub_dir: str | os.PathLike[str] | None = None, *, write: bool = False) -> HubBackend:
    """A :class:`LocalHub` at ``hub_dir`` (else ``$KAVA_HUB_DIR``); with neither, the Hub, refused when the hub is
    offline here or, for a push (``write``), when huggingface_hub finds no token."""
    chosen = hub_dir or os.environ.get(HUB_DIR_ENV) or None
    if chosen:
        root = Path(chosen).expanduser()
        if root.exists() and not root.is_dir():
            raise ConfigError(f"--hub-dir {root}: expected a directory. Got a file. Choose another --hub-dir.")
        return LocalHub(root)
    if hub_offline():
        raise ConfigError(offline_message())
    if write and get_token() is None:
        raise ConfigError("Pushing to the Hub needs a token with write access: set HF_TOKEN or run `hf auth login`, "
                          "or pass --hub-dir DIR.")
    return HfHub()
