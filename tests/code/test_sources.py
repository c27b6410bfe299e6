"""Sources: path safety in folders, and git repositories cloned once into a cache and fetched after."""

import os
import subprocess
from pathlib import Path

import pytest

from lxn_ray.sources.transports import (
    FolderSource,
    GitSource,
    SourceError,
    UnsafePath,
    is_git_location,
    is_hidden,
    open_source,
    visible_files,
)


def git(cwd: Path, *args: str) -> str:
    env = {
        **os.environ,
        "GIT_AUTHOR_NAME": "t",
        "GIT_AUTHOR_EMAIL": "t@example.org",
        "GIT_COMMITTER_NAME": "t",
        "GIT_COMMITTER_EMAIL": "t@example.org",
    }
    return subprocess.run(
        ["git", *args], cwd=cwd, check=True, capture_output=True, text=True, env=env
    ).stdout.strip()


@pytest.fixture
def upstream(tmp_path: Path) -> Path:
    """A real git repository in the upstream layout with two commits and a tag on the first."""
    repo = tmp_path / "upstream"
    (repo / "images").mkdir(parents=True)
    git(tmp_path, "init", "-q", "-b", "main", str(repo))
    (repo / "metadata.csv").write_text("patientid,finding,view,filename\n1,COVID-19,PA,a.png\n")
    (repo / "images" / "a.png").write_bytes(b"first")
    git(repo, "add", ".")
    git(repo, "commit", "-q", "-m", "first")
    git(repo, "tag", "v1")
    (repo / "images" / "a.png").write_bytes(b"second")
    git(repo, "commit", "-q", "-am", "second")
    return repo


def test_folder_refuses_paths_outside_the_root(tmp_path: Path):
    root = tmp_path / "src"
    (root / "images").mkdir(parents=True)
    (root / "metadata.csv").write_text("filename\n")
    (tmp_path / "secret.png").write_bytes(b"secret")
    (root / "images" / "link.png").symlink_to(tmp_path / "secret.png")
    snapshot = FolderSource(root).open()
    for bad in ("../secret.png", "images/../../secret.png", "/etc/hostname", "images/link.png"):
        with pytest.raises(UnsafePath):
            snapshot.read_file(bad, 1000)
    with pytest.raises(FileNotFoundError):
        snapshot.read_file("images/absent.png", 1000)
    (root / "images" / "big.png").write_bytes(b"x" * 100)
    with pytest.raises(ValueError, match="cap"):
        snapshot.read_file("images/big.png", 10)


def test_git_source_clones_once_then_fetches(upstream: Path, tmp_path: Path):
    cache = tmp_path / "cache"
    head = GitSource(str(upstream), cache_dir=cache).open()
    assert head.read_file("images/a.png", 100) == b"second"
    assert head.version("ignored") == f"git:{git(upstream, 'rev-parse', 'HEAD')}"
    tagged = GitSource(str(upstream), ref="v1", cache_dir=cache).open()
    assert tagged.read_file("images/a.png", 100) == b"first"
    clones = list((cache / "git").iterdir())
    assert len(clones) == 1  # one cache per repository URL

    (upstream / "images" / "a.png").write_bytes(b"third")
    git(upstream, "commit", "-q", "-am", "third")
    assert GitSource(str(upstream), cache_dir=cache).open().read_file("images/a.png", 100) == b"third"
    with pytest.raises(SourceError, match="no commit"):
        GitSource(str(upstream), ref="no-such-ref", cache_dir=cache).open()


def test_git_bundle_is_a_git_source(upstream: Path, tmp_path: Path):
    bundle = tmp_path / "repo.bundle"
    git(upstream, "bundle", "create", str(bundle), "--all")
    assert is_git_location(str(bundle))
    snapshot = open_source(str(bundle), "v1", cache_dir=tmp_path / "cache").open()
    assert snapshot.read_file("images/a.png", 100) == b"first"


def test_open_source_kinds(upstream: Path, tmp_path: Path):
    assert isinstance(open_source(str(upstream)), FolderSource)  # a checkout with metadata.csv is a folder
    assert isinstance(open_source("https://github.com/ieee8023/covid-chestxray-dataset"), GitSource)
    with pytest.raises(SourceError):
        open_source(str(tmp_path / "missing"))
    with pytest.raises(SourceError, match="--ref"):
        open_source(str(upstream), ref="v1")


@pytest.mark.parametrize(
    ("path", "hidden"),
    [
        (".ipynb_checkpoints/a-checkpoint.png", True),
        ("Covid-19/.ipynb_checkpoints/a-checkpoint.png", True),
        ("Covid-19/._a.png", True),  # AppleDouble fork
        ("__MACOSX/Covid-19/._a.png", True),
        ("__macosx/a.png", True),
        ("Covid-19/.DS_Store", True),
        ("No_findings/Thumbs.db", True),
        ("No_findings/THUMBS.DB", True),
        ("No_findings/desktop.ini", True),
        ("@eaDir/a.png/SYNOFILE_THUMB_M.jpg", True),
        (".git/objects/ab/cdef", True),
        ("Covid-19/a.png", False),
        ("Covid-19/a.b.png", False),
        ("images/MACOSX.png", False),
        ("Thumbs/a.png", False),
    ],
)
def test_one_rule_names_hidden_and_system_files_at_any_depth(path, hidden):
    assert is_hidden(path) is hidden
    assert visible_files([path]) == ([] if hidden else [path])


def test_a_folder_lists_files_by_the_one_rule(tmp_path: Path):
    for path in ("Covid-19/a.png", "Covid-19/._a.png", ".ipynb_checkpoints/a-checkpoint.png", "x/Thumbs.db"):
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / path).write_bytes(b"x")
    assert FolderSource(tmp_path, marker=None).open().list_files() == ["Covid-19/a.png"]
