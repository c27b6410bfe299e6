"""Where the dataset comes from: a folder in the upstream layout, a git repository (URL, path, bundle), an
``s3://bucket/prefix`` mirror, or an ``https://`` base URL in the upstream raw layout.

A :class:`Source` is opened into a :class:`Snapshot`: one fixed state of the data that can read
``metadata.csv`` and image files and names its own version (a git commit, or a content hash). Ingest
never looks behind it. Every path a snapshot reads is checked to stay inside the source root: symlinks
for folders, plain relative keys for S3, and for HTTP also no redirect out of the base URL. A listing
(class-folder layouts) follows one rule on every transport, :func:`visible_files`: hidden and system files
(dot-files and dot-folders at any depth, ``__MACOSX``, ``Thumbs.db``, ``desktop.ini``, ...) are not data.

Local snapshots are read by the driver, and by the decoding tasks on nodes that see the same folder
(:mod:`lxn_ray.data.fetch`). Remote ones (``remote = True``) are small, picklable values that Ray Data
tasks use to fetch images on the workers themselves, with timeouts, retries and size caps.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import tarfile
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from lxn_ray.infra.storage import s3_client

UPSTREAM = "https://github.com/ieee8023/covid-chestxray-dataset"
METADATA_FILE = "metadata.csv"


class SourceError(RuntimeError):
    """The source cannot be opened (no such folder, git failure, unknown ref)."""


class UnsafePath(ValueError):
    """A file name that would read outside the source root."""


class Snapshot(Protocol):
    """One fixed state of a source."""

    description: str
    remote: bool  # True: fetch images in Ray tasks on the workers, not in the driver

    def read_metadata(self) -> bytes: ...

    def read_file(self, relative_path: str, max_bytes: int) -> bytes:
        """Bytes of a file under the root. Raises UnsafePath, FileNotFoundError, or ValueError (too big)."""
        ...

    def version(self, content_digest: str) -> str:
        """The source version; ``content_digest`` hashes metadata and the files ingest read."""
        ...

    def list_files(self) -> list[str]:
        """Every file below the root, as sorted relative paths (class-folder layouts), less hidden and
        system files (:func:`visible_files`, the same rule for every transport). Raises SourceError
        where the location cannot be listed (an HTTP mirror)."""
        ...


class Source(Protocol):
    def open(self) -> Snapshot: ...


# -- the one listing rule -----------------------------------------------------------------------------
# Names that operating systems, archivers and tools leave beside the data. Compared case-insensitively
# with each part of a path (a folder name hides everything below it); every name starting with "." is
# hidden too (.DS_Store, ._* AppleDouble forks, .ipynb_checkpoints, .git, .Trashes, .Spotlight-V100).
SYSTEM_NAMES = frozenset(
    {
        "__macosx",  # macOS Archive Utility: resource forks of a zip's files, as ._NAME
        "thumbs.db",  # Windows Explorer thumbnail caches
        "ehthumbs.db",
        "ehthumbs_vista.db",
        "desktop.ini",  # Windows folder settings
        "$recycle.bin",
        "system volume information",
        "icon\r",  # macOS custom folder icon
        "@eadir",  # Synology thumbnails (SYNOFILE_THUMB_*.jpg: images, but not films)
        "#recycle",  # Synology recycle bin
        "#snapshot",  # Synology / QNAP snapshots: copies of the tree
        "lost+found",
    }
)


def is_hidden_part(name: str) -> bool:
    """Whether one file or folder name is hidden or a system file: it starts with ``.``, or is one of
    :data:`SYSTEM_NAMES` (case-insensitive)."""
    return name.startswith(".") or name.casefold() in SYSTEM_NAMES


def is_hidden(relative_path: str) -> bool:
    """Whether a path below a source root is, or lies below, a hidden or system file or folder
    (:func:`is_hidden_part` on any of its parts, at any depth)."""
    return any(is_hidden_part(part) for part in re.split(r"[/\\]", relative_path) if part)


def visible_files(paths: Iterable[str]) -> list[str]:
    """The listing rule: the sorted paths less those :func:`is_hidden` names. Every snapshot lists through
    :meth:`Listing.list_files`, the one place it is applied, so one tree lists the same from a folder, a git
    checkout or S3 (an HTTP mirror is not listed: a manifest names its files, and manifest rows naming
    hidden files are excluded by :func:`lxn_ray.sources.metadata.parse_metadata` with the same test)."""
    return sorted(path for path in paths if not is_hidden(path))


class Listing:
    """What every snapshot's listing shares: the transport finds every file (:meth:`every_file`), and
    :meth:`list_files` applies the listing rule (:func:`visible_files`) - here, for all transports."""

    def every_file(self) -> Iterable[str]:
        """Every file below the root as a relative path, hidden ones included. Raises SourceError where
        the location cannot be listed."""
        raise NotImplementedError

    def list_files(self) -> list[str]:
        """The files below the root, sorted, less hidden and system files (:func:`visible_files`)."""
        return visible_files(self.every_file())


def is_plain_relative(path: str) -> bool:
    """True for a relative path that stays below its folder: no root, drive, ``..`` or NUL."""
    parts = re.split(r"[/\\]", path)
    return bool(path) and "\x00" not in path and parts[0] != "" and ":" not in parts[0] and ".." not in parts


@dataclass(frozen=True)
class FolderSnapshot(Listing):
    """A local folder in the upstream layout: ``metadata.csv`` and ``images/``."""

    root: Path
    description: str
    commit: str | None = None  # set when the folder is a checkout of a known git commit
    commit_date: str | None = None  # that commit's committer date (ISO 8601): the date of the data
    remote = False

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

    def read_head(self, relative_path: str, max_bytes: int) -> bytes:
        """The first ``max_bytes`` bytes of a file (a DICOM header), with :meth:`read_file`'s path checks."""
        path = self.resolve(relative_path)
        if not path.is_file():
            raise FileNotFoundError(relative_path)
        descriptor = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
        with os.fdopen(descriptor, "rb") as stream:
            return stream.read(max_bytes)

    def version(self, content_digest: str) -> str:
        return f"git:{self.commit}" if self.commit else f"sha256:{content_digest}"

    def every_file(self) -> list[str]:
        """Regular files below the root; symlinks, which could lead out of it, are not files here."""
        found = []
        for folder, _, names in os.walk(self.root):  # os.walk does not follow linked folders
            for name in names:
                path = Path(folder) / name
                if not path.is_symlink() and path.is_file():
                    found.append(path.relative_to(self.root).as_posix())
        return found


@dataclass(frozen=True)
class FolderSource:
    """A local folder; ``marker`` is the file its layout needs (None: class folders need none)."""

    path: Path
    marker: str | None = METADATA_FILE

    def open(self) -> FolderSnapshot:
        root = self.path.expanduser().resolve()
        if not root.is_dir():
            raise SourceError(f"{self.path}: no such folder")
        if self.marker and not (root / self.marker).is_file():
            raise SourceError(f"{self.path}: no {self.marker} (wrong layout?)")
        return FolderSnapshot(root=root, description=str(root))


# -- remote sources: read on the workers ---------------------------------------------------------------
MAX_METADATA_BYTES = 64 * 1024 * 1024
FETCH_ATTEMPTS = 4  # transient failures (timeouts, 5xx, throttling) are retried with backoff
FETCH_TIMEOUT_S = 30.0


def _with_retries(fetch, what: str):
    """``fetch()``, retried on transient errors; FileNotFoundError and size errors are final."""
    for attempt in range(1, FETCH_ATTEMPTS + 1):
        try:
            return fetch()
        except (FileNotFoundError, ValueError, UnsafePath):
            raise
        except OSError as error:
            if attempt == FETCH_ATTEMPTS:
                raise OSError(f"{what}: {error} (after {attempt} attempts)") from None
            time.sleep(min(8.0, 0.5 * 2**attempt))
    raise AssertionError("unreachable")


def _read_capped(stream, max_bytes: int, what: str) -> bytes:
    data = stream.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise ValueError(f"{what} is over the {max_bytes}-byte cap")
    return data


def _key_below(root: str, relative_path: str) -> str:
    if not is_plain_relative(relative_path):
        raise UnsafePath(f"path leaves the source root: {relative_path!r}")
    return f"{root}/{relative_path}" if root else relative_path


class _RemoteSnapshot(Listing):
    """What S3 and HTTP mirrors share: read on the workers, versioned by content."""

    description: str
    remote = True

    def read_metadata(self) -> bytes:
        try:
            return self.read_file(METADATA_FILE, MAX_METADATA_BYTES)
        except FileNotFoundError:
            raise SourceError(f"{self.description}: no {METADATA_FILE}") from None

    def version(self, content_digest: str) -> str:
        return f"sha256:{content_digest}"

    def every_file(self) -> list[str]:
        raise SourceError(f"{self.description}: an HTTP mirror cannot be listed; give it a manifest CSV")


@dataclass(frozen=True)
class S3Snapshot(_RemoteSnapshot):
    """An ``s3://bucket/prefix`` mirror of the upstream layout, read object by object with boto3."""

    bucket: str
    prefix: str
    description: str

    def read_file(self, relative_path: str, max_bytes: int) -> bytes:
        from botocore.exceptions import BotoCoreError, ClientError

        key = _key_below(self.prefix, relative_path)

        def fetch() -> bytes:
            try:
                response = s3_client().get_object(Bucket=self.bucket, Key=key)
            except ClientError as error:
                if error.response.get("Error", {}).get("Code") in ("NoSuchKey", "404", "NotFound"):
                    raise FileNotFoundError(relative_path) from None
                raise OSError(str(error)) from None
            except BotoCoreError as error:
                raise OSError(str(error)) from None
            if response["ContentLength"] > max_bytes:
                raise ValueError(f"file is {response['ContentLength']} bytes, over the {max_bytes}-byte cap")
            with response["Body"] as body:
                return _read_capped(body, max_bytes, "file")

        return _with_retries(fetch, f"s3://{self.bucket}/{key}")

    def every_file(self) -> list[str]:
        """Every object below the prefix (S3 has no folders: keys ending in ``/`` are folder markers)."""
        from botocore.exceptions import BotoCoreError, ClientError

        base = f"{self.prefix}/" if self.prefix else ""
        found = []
        try:
            for page in (
                s3_client().get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=base)
            ):
                for item in page.get("Contents", []):
                    relative = item["Key"][len(base) :]
                    if is_plain_relative(relative) and not relative.endswith("/"):
                        found.append(relative)
        except (BotoCoreError, ClientError) as error:
            raise SourceError(f"{self.description}: cannot list ({error})") from None
        return found


@dataclass(frozen=True)
class S3Source:
    uri: str
    marker: str | None = METADATA_FILE

    def open(self) -> S3Snapshot:
        bucket, _, prefix = self.uri.removeprefix("s3://").partition("/")
        if not bucket:
            raise SourceError(f"{self.uri}: no bucket")
        snapshot = S3Snapshot(bucket=bucket, prefix=prefix.strip("/"), description=self.uri.rstrip("/"))
        _check_marker(snapshot, self.marker)  # fail early, with the source's name, when not in the layout
        return snapshot


def _check_marker(snapshot: _RemoteSnapshot, marker: str | None) -> None:
    if marker:
        try:
            snapshot.read_file(marker, MAX_METADATA_BYTES)
        except FileNotFoundError:
            raise SourceError(f"{snapshot.description}: no {marker} (wrong layout?)") from None


class _SameBaseRedirects(urllib.request.HTTPRedirectHandler):
    """Follow a redirect only while it stays below the source's base URL (no SSRF through redirects)."""

    def __init__(self, base: str) -> None:
        self.base = base

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        if not urllib.parse.urljoin(req.full_url, newurl).startswith(self.base):
            raise urllib.error.HTTPError(newurl, code, f"redirect out of {self.base} refused", headers, fp)
        return super().redirect_request(req, fp, code, msg, headers, newurl)


@dataclass(frozen=True)
class HttpSnapshot(_RemoteSnapshot):
    """A base URL in the upstream raw layout: ``BASE/metadata.csv`` and ``BASE/images/FILE``."""

    base: str  # ends with "/"
    description: str

    def url_of(self, relative_path: str) -> str:
        """The file's URL: each path segment percent-encoded, so a name cannot add a query or climb up."""
        key = _key_below("", relative_path)
        return self.base + "/".join(urllib.parse.quote(part, safe="") for part in key.split("/"))

    def read_file(self, relative_path: str, max_bytes: int) -> bytes:
        url = self.url_of(relative_path)
        opener = urllib.request.build_opener(_SameBaseRedirects(self.base))

        def fetch() -> bytes:
            request = urllib.request.Request(url, headers={"User-Agent": "lxn_ray"})
            try:
                with opener.open(request, timeout=FETCH_TIMEOUT_S) as response:
                    declared = response.headers.get("Content-Length")
                    if declared and declared.isdigit() and int(declared) > max_bytes:
                        raise ValueError(f"file is {declared} bytes, over the {max_bytes}-byte cap")
                    return _read_capped(response, max_bytes, "file")
            except urllib.error.HTTPError as error:
                if error.code in (404, 410):
                    raise FileNotFoundError(relative_path) from None
                if error.code in (408, 429) or error.code >= 500:
                    raise OSError(f"HTTP {error.code}") from None  # transient: retried
                raise ValueError(f"HTTP {error.code}: {error.reason}") from None

        return _with_retries(fetch, url)


@dataclass(frozen=True)
class HttpSource:
    base_url: str
    marker: str | None = METADATA_FILE

    def open(self) -> HttpSnapshot:
        base = self.base_url if self.base_url.endswith("/") else self.base_url + "/"
        snapshot = HttpSnapshot(base=base, description=base)
        _check_marker(snapshot, self.marker)
        return snapshot


def serves_raw_layout(base_url: str, marker: str = METADATA_FILE) -> bool:
    """Whether ``base_url`` answers ``marker`` over HTTP (a raw mirror, not a git remote)."""
    base = base_url if base_url.endswith("/") else base_url + "/"
    request = urllib.request.Request(base + marker, method="HEAD", headers={"User-Agent": "lxn_ray"})
    try:
        with urllib.request.urlopen(request, timeout=FETCH_TIMEOUT_S) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError, ValueError):
        return False


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
        fresh = not (repository / "HEAD").exists()
        if fresh:
            shutil.rmtree(repository, ignore_errors=True)
            repository.parent.mkdir(parents=True, exist_ok=True)
            _git(None, "init", "--bare", "--quiet", str(repository))
        try:
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
        except SourceError as error:
            if fresh:  # leave no empty clone behind
                _remove_with_empty_parents(cache, stop=(self.cache_dir or default_cache_dir()).parent)
            if "://" not in self.url and "@" not in self.url:
                raise
            raise SourceError(f"{self.url}: {error}. {OFFLINE_HINT}") from None
        commit = self._resolve(repository)
        checkout = cache / "checkouts" / commit
        if not checkout.is_dir():
            _extract(repository, commit, checkout)
        for stale in (cache / "checkouts").iterdir():  # keep only the checkout in use
            if stale.name != commit:
                shutil.rmtree(stale, ignore_errors=True)
        committed = subprocess.run(
            ["git", "--git-dir", str(repository), "show", "-s", "--format=%cI", commit],
            capture_output=True,
            text=True,
        ).stdout.strip()
        return FolderSnapshot(
            root=checkout.resolve(),
            description=f"{self.url}@{commit[:12]}",
            commit=commit,
            commit_date=committed or None,
        )

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


OFFLINE_HINT = (
    "Without network, point --source at a local copy: a folder in the upstream layout (metadata.csv + "
    "images/), a git clone, or a git bundle file with --ref TAG (e.g. --source ieee8023.bundle --ref "
    "snapshot-2020-06-22)"
)


def _remove_with_empty_parents(folder: Path, stop: Path) -> None:
    """Remove ``folder``, then each parent below ``stop`` that is left empty."""
    shutil.rmtree(folder, ignore_errors=True)
    for parent in folder.parents:
        if parent == stop or not parent.is_relative_to(stop):
            return
        try:
            parent.rmdir()  # only when empty
        except OSError:
            return


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


def is_git_location(location: str, marker: str | None = METADATA_FILE) -> bool:
    """Whether ``location`` names a git repository rather than a plain folder."""
    if re.match(r"^(https?|ssh|git|file)://", location) or re.match(r"^[\w.-]+@[\w.-]+:", location):
        return True
    path = Path(location).expanduser()
    if path.is_file():
        return True  # a git bundle
    if path.is_dir() and not (marker and (path / marker).is_file()):
        return (path / ".git").exists() or (path / "HEAD").is_file()
    return False


def open_source(
    location: str | None = None,
    ref: str | None = None,
    cache_dir: Path | None = None,
    marker: str | None = METADATA_FILE,
) -> Source:
    """The source named by ``--source`` (default: the upstream repository) and ``--ref``.

    ``s3://`` is a mirror; an ``http(s)://`` URL that serves ``marker`` (``metadata.csv`` for the upstream
    layout) is a raw mirror (e.g. ``https://raw.githubusercontent.com/ieee8023/covid-chestxray-dataset/
    master/``); any other URL is git. ``marker`` is the file the source's layout needs (None for class
    folders).
    """
    location = location or UPSTREAM
    remote = location.startswith("s3://") or (
        re.match(r"^https?://", location)
        and not location.endswith(".git")
        and serves_raw_layout(location, marker or "")
    )
    if remote:
        if ref:
            raise SourceError(f"--ref needs a git source; {location} is a mirror")
        if location.startswith("s3://"):
            return S3Source(location, marker)
        return HttpSource(location, marker)
    if is_git_location(location, marker):
        url = location if "://" in location or "@" in location else str(Path(location).expanduser().resolve())
        return GitSource(url=url, ref=ref, cache_dir=cache_dir)
    if ref:
        raise SourceError(f"--ref needs a git source; {location} is a folder")
    if not Path(location).expanduser().is_dir():
        raise SourceError(f"{location}: no such folder or git repository")
    return FolderSource(Path(location), marker)
