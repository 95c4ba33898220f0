"""`python -m data_prep`: raw text -> SentencePiece -> packed WebDataset shards -> manifest.json.

The run, in order:
1. find the inputs (and fetch a named corpus), cut them into slices; fingerprint them with the settings that
   shape the output (not the number of tasks or workers, which never change it);
2. compare with an existing manifest: the same fingerprint is a no-op, a different one is refused unless
   `overwrite=true`; work left by an interrupted run of the same fingerprint is continued, of another
   fingerprint discarded;
3. write `<output_dir>/.data_prep/run.json`, then run the stages (data_prep/task.py) here
   (`launcher=local`, data_prep/local.py) or submit them as Slurm jobs (`launcher=slurm`, data_prep/slurm.py):
   scan, plan (deduplication, tokenizer), encode, merge (shards into place, the manifest last).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from common.app import to_container
from common.errors import UserError
from common.slurm import active_jobs
from data_prep.config import PrepConfig, SlurmLauncherConfig
from data_prep.corpus import fetch_corpus
from data_prep.manifest import FORMAT_VERSION, MANIFEST_NAME, TOKENIZER_NAMES, load_manifest, verify_shards
from data_prep.plan import given_tokenizer
from data_prep.sources import InputFile, discover, plan_slices
from data_prep.tokenizer import TokenizerInfo
from data_prep.workdir import RunSpec, WorkDir

# Settings that do not change the output, left out of the fingerprint (so changing them is still a no-op).
_NOT_FINGERPRINTED = ("output_dir", "num_workers", "overwrite", "task_mb", "tasks", "launcher")


def _fingerprint(config: PrepConfig, files: list[InputFile], tokenizer: TokenizerInfo | None) -> str:
    settings = {k: v for k, v in to_container(config).items() if k not in _NOT_FINGERPRINTED}
    settings.pop("corpus", None)  # the files it brings are fingerprinted below
    # Keys added with Hugging Face tokenizers count only when set: a dataset prepared before them stays as it is.
    for key in ("hf_path", "hf_eos_token"):
        if settings["tokenizer"].get(key) is None:
            settings["tokenizer"].pop(key, None)
    payload: dict[str, Any] = {
        "format_version": FORMAT_VERSION,
        "settings": settings,
        "files": [(f.path, f.size, f.mtime_ns) for f in files],
        "tokenizer_sha256": tokenizer.sha256 if tokenizer else None,
    }
    if config.tokenizer.hf_path is not None and tokenizer is not None:
        # Its EOS is named beside tokenizer.json (tokenizer_config.json): a change there changes the dataset.
        payload["tokenizer_special_ids"] = tokenizer.special_ids
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def _check_writable(out: Path) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".data_prep.write-test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as error:
        raise UserError(
            f"output_dir={str(out)!r} is not writable ({error.strerror or error}); choose a directory you can write"
        ) from None


def _existing_dataset(out: Path) -> dict[str, Any] | None:
    path = out / MANIFEST_NAME
    if not path.is_file():
        return None
    try:
        loaded = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return {}
    return loaded if isinstance(loaded, dict) else {}


def _has_shards(out: Path) -> bool:
    return bool(list(out.glob("train-*.tar")) or list(out.glob("val-*.tar")))


def _remove_dataset(out: Path, manifest: dict[str, Any]) -> None:
    # The manifest goes first, so that at no moment does a manifest point at a shard being replaced.
    (out / MANIFEST_NAME).unlink(missing_ok=True)
    for split in (manifest.get("splits") or {}).values():
        for shard in split.get("shards", []):
            (out / shard["name"]).unlink(missing_ok=True)
    for stale in [*out.glob("train-*.tar"), *out.glob("val-*.tar")]:
        stale.unlink()
    for name in TOKENIZER_NAMES:
        (out / name).unlink(missing_ok=True)


def _refuse_while_jobs_run(work: WorkDir) -> None:
    jobs_file = work.slurm_dir / "jobs.json"
    if not jobs_file.is_file():
        return
    try:
        jobs = list(json.loads(jobs_file.read_text(encoding="utf-8")).values())
    except (OSError, ValueError, AttributeError):
        return
    still = active_jobs(jobs) if jobs else []
    if still:
        raise UserError(
            f"output_dir={str(work.out)!r} is being prepared by Slurm jobs still queued or running "
            f"({', '.join(sorted(set(still)))}); wait for them or cancel them (scancel {' '.join(jobs)}) first"
        )


def prepare(config: PrepConfig) -> int:
    config.problems().raise_if_any()
    patterns = list(config.input)
    if config.corpus is not None:
        patterns.append(str(fetch_corpus(config.corpus)))
    files = discover(patterns)
    out = Path(config.output_dir)
    _check_writable(out)
    reused = given_tokenizer(config)
    fingerprint = _fingerprint(config, files, reused)
    work = WorkDir(out)

    existing = _existing_dataset(out)
    if existing is not None:
        if existing.get("fingerprint") == fingerprint:
            manifest = load_manifest(out)
            if not verify_shards(out, manifest, check_hash=False):
                print(
                    f"{out}: up to date, nothing to do ({manifest.tokens} tokens in "
                    f"{sum(len(s.shards) for s in manifest.splits.values())} shards from the same inputs and "
                    "settings); check it with `python -m data_prep.inspect_dataset`",
                    flush=True,
                )
                return 0
        elif not config.overwrite:
            raise UserError(
                f"output_dir={str(out)!r} holds a different dataset (its manifest.json comes from other inputs "
                "or settings); choose another output_dir, or pass overwrite=true to replace it"
            )
        _refuse_while_jobs_run(work)
        work.remove()
        _remove_dataset(out, existing)
    elif _has_shards(out) and not work.root.is_dir() and not config.overwrite:
        raise UserError(
            f"output_dir={str(out)!r} holds shards but no manifest.json, and not from an interrupted run of "
            "data_prep; choose another output_dir, or pass overwrite=true to replace them"
        )

    previous = work.read_run()
    if previous is not None and previous.fingerprint != fingerprint:
        _refuse_while_jobs_run(work)
        print(f"{out}: discarding the work of an interrupted run with other inputs or settings", flush=True)
        work.remove()
        previous = None
    if previous is None and work.root.exists():
        work.remove()  # unreadable, or from a version of data_prep without run.json: start over
    if previous is None:
        # Shards outside the work directory without a manifest: a merge of another run interrupted midway.
        _remove_dataset(out, {})
    spec = RunSpec(
        fingerprint=fingerprint,
        config=to_container(config),
        patterns=patterns,
        files=files,
        slices=plan_slices(files, max(1, int(config.slice_mb * 1e6))),
    )
    work.write_run(spec)
    if isinstance(config.launcher, SlurmLauncherConfig):
        from data_prep.slurm import submit

        return submit(work, spec, config)
    from data_prep.local import run_local

    return run_local(work, spec, config)
