"""API keys for the endpoint: minted here, kept only as hashes, checked on every protected request.

A key is 32 random bytes (``secrets.token_urlsafe``), shown once when minted. What the endpoint keeps is
its SHA-256 digest, in two places a replica reads:

- the key file ``serve/api-keys.json`` in storage (``jobs/serve.py --mint-key NAME`` appends to it,
  ``--revoke-key NAME`` removes from it; replicas re-read it every poll, so neither needs a restart);
- ``LXN_API_KEYS`` (comma-separated keys) in the environment of ``jobs/serve.py``, hashed there and
  handed to the replicas as digests, or in the replicas' own environment (``serve deploy``).

A plain SHA-256 suffices because keys are random 256-bit secrets: there is no dictionary to attack, so a
slow password hash would only add latency. Keys and digests are never logged; a request is logged (when
at all) by its key's name.
"""

from __future__ import annotations

import hashlib
import os
import secrets
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from lxn_ray.infra.storage import Storage

KEY_FILE = "serve/api-keys.json"  # storage key of the hashed key file
ENV_KEYS = "LXN_API_KEYS"
KEY_PREFIX = "lxn_"
MIN_KEY_CHARS = 16  # a key from LXN_API_KEYS shorter than this is refused: too easy to guess


class ApiKeyError(ValueError):
    """A key that cannot be minted, revoked or accepted (bad name, duplicate, too short)."""


def digest(key: str) -> str:
    """SHA-256 hex digest of a key (what is stored and compared)."""
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def env_digests(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """``{digest: name}`` for the keys in ``LXN_API_KEYS`` (named ``env-1``, ``env-2``, ...).

    Raises :class:`ApiKeyError` for a key shorter than :data:`MIN_KEY_CHARS`."""
    environ = os.environ if environ is None else environ
    keys = [key.strip() for key in environ.get(ENV_KEYS, "").split(",") if key.strip()]
    for key in keys:
        if len(key) < MIN_KEY_CHARS:
            raise ApiKeyError(f"{ENV_KEYS}: every key needs at least {MIN_KEY_CHARS} characters")
    return {digest(key): f"env-{number}" for number, key in enumerate(keys, 1)}


def stored_keys(storage: Storage) -> list[dict[str, str]]:
    """The key file's entries (``name``, ``sha256``, ``created``); [] when there is none."""
    if not storage.exists(KEY_FILE):
        return []
    document = storage.read_json(KEY_FILE)
    entries = document.get("keys", []) if isinstance(document, dict) else []
    return [entry for entry in entries if isinstance(entry, dict) and "sha256" in entry and "name" in entry]


def _check_name(name: str) -> None:
    if not name or len(name) > 64 or not all(c.isalnum() or c in "-_." for c in name):
        raise ApiKeyError(f"key name {name!r}: use 1-64 letters, digits, '-', '_' or '.'")


def new_key() -> str:
    """A new random key: ``lxn_`` and 32 random bytes, URL-safe base64 (43 characters)."""
    return KEY_PREFIX + secrets.token_urlsafe(32)


def register(storage: Storage, name: str, key: str) -> None:
    """Add ``key``'s digest to the key file under ``name``. Raises :class:`ApiKeyError` for a bad or
    existing name."""
    _check_name(name)
    entries = stored_keys(storage)
    if any(entry["name"] == name for entry in entries):
        raise ApiKeyError(f"a key named {name!r} exists; revoke it first or pick another name")
    created = datetime.now(timezone.utc).isoformat(timespec="seconds")
    entries.append({"name": name, "sha256": digest(key), "created": created})
    storage.write_json(KEY_FILE, {"keys": entries})


def mint(storage: Storage, name: str) -> str:
    """A new key named ``name``, registered (:func:`register`); the key itself is returned and stored
    nowhere."""
    key = new_key()
    register(storage, name, key)
    return key


def revoke(storage: Storage, name: str) -> bool:
    """Remove the key named ``name`` from the key file; False when there was none."""
    entries = stored_keys(storage)
    kept = [entry for entry in entries if entry["name"] != name]
    if len(kept) == len(entries):
        return False
    storage.write_json(KEY_FILE, {"keys": kept})
    return True


def save_key(key: str, path: Path) -> Path:
    """Write a minted key to ``path``, readable by its owner only (mode 0600); never overwrites."""
    path = path.expanduser()
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "w") as stream:
        stream.write(key + "\n")
    return path


def default_key_path(name: str) -> Path:
    """Where ``--mint-key`` writes a key unless told: ``$LXN_CONFIG`` (default ``~/.config/lxn_ray``)
    ``/api-keys/<name>.key``."""
    root = os.environ.get("LXN_CONFIG") or "~/.config/lxn_ray"
    return Path(root).expanduser() / "api-keys" / f"{name}.key"


@dataclass(frozen=True)
class KeyRing:
    """The digests a replica accepts, and each one's name."""

    names: Mapping[str, str]  # digest -> key name

    @classmethod
    def load(cls, storage: Storage, *extra: Mapping[str, str]) -> KeyRing:
        """The key file's keys, the replica's own ``LXN_API_KEYS`` and ``extra`` digest maps."""
        names = {entry["sha256"]: entry["name"] for entry in stored_keys(storage)}
        names.update(env_digests())
        for more in extra:
            names.update(more)
        return cls(names)

    def __len__(self) -> int:
        return len(self.names)

    def name_of(self, authorization: str | None) -> str | None:
        """The key's name for an ``Authorization: Bearer KEY`` header value, or None when it is missing,
        malformed or unknown. Compares digests, so the time taken says nothing about the key."""
        scheme, _, token = (authorization or "").strip().partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            return None
        return self.names.get(digest(token.strip()))


def describe(storage: Storage, digests: Iterable[str] = ()) -> str:
    """One line on where the keys come from, for the start-up summary (counts only, no digests)."""
    stored = len(stored_keys(storage))
    from_env = len(set(digests))
    return f"{stored} in {storage.uri_of(KEY_FILE)}, {from_env} from {ENV_KEYS}"
