"""Where the dataset comes from: a folder in the upstream layout, or a git repository (URL, path, bundle).

A :class:`Source` is opened into a :class:`Snapshot`: one fixed state of the data that can read
``metadata.csv`` and image files and names its own version (a git commit, or a content hash for a
folder). Later source kinds (HTTP, S3) only need to provide another ``Snapshot``; ingest never looks
behind it. Every path a snapshot reads is checked to stay inside the source root, symlinks included.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

UPSTREAM = "https://github.com/ieee8023/covid-chestxray-dataset"
METADATA_FILE = "metadata.csv"


class SourceError(RuntimeError):
    """The source cannot be opened (no such folder, git failure, unknown ref)."""


class UnsafePath(ValueError):
    """A file name that would read outside the source root."""


class Snapshot(Protocol):
    """One fixed state of a source."""

    description: str

    def read_metadata(self) -> bytes: ...

    def read_file(self, relative_path: str, max_bytes: int) -> bytes:
        """Bytes of a file under the root. Raises UnsafePath, FileNotFoundError, or ValueError (too big)."""
        ...

    def version(self, content_digest: str) -> str:
        """The source version; ``content_digest`` hashes metadata and the files ingest read."""
        ...


class Source(Protocol):
    def open(self) -> Snapshot: ...


def is_plain_relative(path: str) -> bool:
    """True for a relative path that stays below its folder: no root, drive, ``..`` or NUL."""
    parts = re.split(r"[/\\]", path)
    return bool(path) and "\x00" not in path and parts[0] != "" and ":" not in parts[0] and ".." not in parts


@dataclass(frozen=True)
class FolderSnapshot:
    """A local folder in the upstream layout: ``metadata.csv`` and ``images/``."""

    root: Path
    description: str
    commit: str | None = None  # set when the folder is a checkout of a known git commit

    def read_metadata(self) -> bytes:
        try:
            return (self.root / METADATA_FILE).read_bytes()
        except FileNotFoundError:
            raise SourceError(f"{self.description}: no {METADATA_FILE}") from None

    def resolve(self, relative_path: str) -> Path:
        """The real path of ``relative_path``, refusing anything that leaves the root."""
        if not is_plain_relative(relative_path):
            raise UnsafePath(f"path leaves the source root: {relative_path!r}")
        candidate = (self.root / relative_path).resolve()
        if not candidate.is_relative_to(self.root):
            raise UnsafePath(f"path resolves outside the source root: {relative_path!r}")
        return candidate

    def read_file(self, relative_path: str, max_bytes: int) -> bytes:
        path = self.resolve(relative_path)
        if not path.is_file():
            raise FileNotFoundError(relative_path)
        size = path.stat().st_size
        if size > max_bytes:
            raise ValueError(f"file is {size} bytes, over the {max_bytes}-byte cap")
        # O_NOFOLLOW: a symlink swapped in after resolve() is refused rather than followed.
        descriptor = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
        with os.fdopen(descriptor, "rb") as stream:
            data = stream.read(max_bytes + 1)
        if len(data) > max_bytes:  # grew since stat()
            raise ValueError(f"file is over the {max_bytes}-byte cap")
        return data

    def version(self, content_digest: str) -> str:
        return f"git:{self.commit}" if self.commit else f"sha256:{content_digest}"


@dataclass(frozen=True)
class FolderSource:
    path: Path

    def open(self) -> FolderSnapshot:
        root = self.path.expanduser().resolve()
        if not (root / METADATA_FILE).is_file():
            raise SourceError(f"{self.path}: not a folder in the upstream layout (no {METADATA_FILE})")
        return FolderSnapshot(root=root, description=str(root))


def default_cache_dir() -> Path:
    """Local cache of git clones: ``$LXN_CACHE`` or ``~/.cache/lxn_ray``."""
    return Path(os.environ.get("LXN_CACHE") or Path.home() / ".cache" / "lxn_ray")


@dataclass(frozen=True)
class GitSource:
    """A git repository: URL, local path or bundle file. Cloned once into the cache, fetched after."""

    url: str
    ref: str | None = None
    cache_dir: Path | None = None

    def open(self) -> FolderSnapshot:
        cache = (
            (self.cache_dir or default_cache_dir())
            / "git"
            / hashlib.sha256(self.url.encode()).hexdigest()[:16]
        )
        repository = cache / "repo.git"
        if not (repository / "HEAD").exists():
            shutil.rmtree(repository, ignore_errors=True)
            repository.parent.mkdir(parents=True, exist_ok=True)
            _git(None, "init", "--bare", "--quiet", str(repository))
        # Heads land under our own namespace so a moved upstream branch updates on fetch.
        _git(
            repository,
            "fetch",
            "--quiet",
            "--force",
            "--prune",
            "--tags",
            self.url,
            "+refs/heads/*:refs/remotes/origin/*",
            "+refs/tags/*:refs/tags/*",
        )
        commit = self._resolve(repository)
        checkout = cache / "checkouts" / commit
        if not checkout.is_dir():
            _extract(repository, commit, checkout)
        for stale in (cache / "checkouts").iterdir():  # keep only the checkout in use
            if stale.name != commit:
                shutil.rmtree(stale, ignore_errors=True)
        return FolderSnapshot(root=checkout.resolve(), description=f"{self.url}@{commit[:12]}", commit=commit)

    def _resolve(self, repository: Path) -> str:
        if self.ref:
            candidates = [self.ref, f"refs/tags/{self.ref}", f"refs/remotes/origin/{self.ref}"]
        else:
            candidates = [
                _default_branch(self.url, repository),
                "refs/remotes/origin/main",
                "refs/remotes/origin/master",
            ]
        for candidate in candidates:
            if candidate is None:
                continue
            result = subprocess.run(
                [
                    "git",
                    "--git-dir",
                    str(repository),
                    "rev-parse",
                    "--verify",
                    "--quiet",
                    f"{candidate}^{{commit}}",
                ],
                capture_output=True,
                text=True,
            )
            if result.returncode == 0:
                return result.stdout.strip()
        raise SourceError(f"{self.url}: no commit for ref {self.ref or 'HEAD'!r}")


def _default_branch(url: str, repository: Path) -> str | None:
    """The branch the remote's HEAD points at (a bundle or server may not say)."""
    result = subprocess.run(
        ["git", "--git-dir", str(repository), "ls-remote", "--symref", url, "HEAD"],
        capture_output=True,
        text=True,
    )
    match = re.search(r"^ref: refs/heads/(\S+)\s+HEAD", result.stdout, re.MULTILINE)
    return f"refs/remotes/origin/{match.group(1)}" if match else None


def _extract(repository: Path, commit: str, destination: Path) -> None:
    """Write the tree of ``commit`` to ``destination`` atomically (temp folder, then rename)."""
    destination.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".extract-", dir=destination.parent))
    try:
        archive = staging / "tree.tar"
        _git(repository, "archive", "--format=tar", "-o", str(archive), commit)
        with tarfile.open(archive) as tar:
            tar.extractall(staging / "tree", filter="data")  # refuses absolute paths and escaping links
        archive.unlink()
        (staging / "tree").rename(destination)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _git(repository: Path | None, command: str, *args: str) -> None:
    prefix = ["git", "--git-dir", str(repository)] if repository else ["git"]
    result = subprocess.run([*prefix, command, *args], capture_output=True, text=True)
    if result.returncode != 0:
        message = (result.stderr.strip().splitlines() or ["no output"])[-1]
        raise SourceError(f"git {command} failed: {message}")


def is_git_location(location: str) -> bool:
    """Whether ``location`` names a git repository rather than a plain folder."""
    if re.match(r"^(https?|ssh|git|file)://", location) or re.match(r"^[\w.-]+@[\w.-]+:", location):
        return True
    path = Path(location).expanduser()
    if path.is_file():
        return True  # a git bundle
    if path.is_dir() and not (path / METADATA_FILE).is_file():
        return (path / ".git").exists() or (path / "HEAD").is_file()
    return False


def open_source(location: str | None = None, ref: str | None = None, cache_dir: Path | None = None) -> Source:
    """The source named by ``--source`` (default: the upstream repository) and ``--ref``."""
    location = location or UPSTREAM
    if is_git_location(location):
        url = location if "://" in location or "@" in location else str(Path(location).expanduser().resolve())
        return GitSource(url=url, ref=ref, cache_dir=cache_dir)
    if ref:
        raise SourceError(f"--ref needs a git source; {location} is a folder")
    if not Path(location).expanduser().is_dir():
        raise SourceError(f"{location}: no such folder or git repository")
    return FolderSource(Path(location))
