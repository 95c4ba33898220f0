"""The datasets a run reads: one (`data_dir=DIR`) or a weighted mixture (`data_dirs=[A, B] data_weights=[0.7, 0.3]`).

`DataSources` owns the sources (each a `python -m data_prep` output, named by its directory), their weights,
their fingerprints (a digest of their training shards' sha256s), the checks that span them, and the run state
of the mixture; it builds the global order the data loader follows.

The global order is a function of (seed, weights, fingerprints). Position p of the run's sample stream goes
to a source by the `Interleave` of the weights (sample_order.py: every window of consecutive positions holds
each source's share within less than two samples), and to the next position of that source's own order
(`GlobalOrder`: its own epochs and permutations, seeded by (seed, fingerprint), so a small source repeats and a
large one does not, and two sources never share a permutation). All of it is arithmetic on p: any position
is found without replaying the ones before it, so the cursor (consumed samples) stays the whole data state.

Changing the weights (or the sources) of a run: the run state is a list of segments, each with its weights,
its first step and position, and how many samples of every source were consumed before it. A resumed run with
other weights is refused unless `data_reweight=true`; then a new segment starts at the resumed step, and each
source continues from its own count: nothing consumed is repeated or skipped. The segments are saved in every
checkpoint (`trainer_state.json`, key "mixture"), and each change is announced to the callbacks (metrics.jsonl
`kind: mixture` entries, W&B).

This module imports no torch: `python -m launch` validates a run's sources on a login node.
"""

from __future__ import annotations

import hashlib
import math
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from common.errors import ConfigProblems, UserError
from data_prep.manifest import MANIFEST_NAME, Manifest, load_manifest
from pretrain.core.sample_order import GlobalOrder, Interleave, weight_units


def fingerprint(manifest: Manifest) -> str:
    """A source's identity: 16 hex digits of the sha256 over its training shards' sha256s, in order (the
    samples and their numbering). A moved or renamed directory keeps it; re-prepared other data does not."""
    split = manifest.splits.get("train")
    digests = "\n".join(shard.sha256 for shard in split.shards) if split else ""
    return hashlib.sha256(digests.encode()).hexdigest()[:16]


def source_name(path: str) -> str:
    """A source's name in metrics (tokens/<name>): its directory's name, as given (symlinks not followed)."""
    return Path(os.path.abspath(path)).name


@dataclass(frozen=True)
class DataSource:
    key: str  # the config key naming it, for messages: data_dir or data_dirs[i]
    path: Path
    weight: float
    manifest: Manifest | None  # None when the directory holds none (reported by DataSources.problems)
    load_error: str | None = None

    @property
    def name(self) -> str:
        return source_name(str(self.path))

    @property
    def fingerprint(self) -> str:
        assert self.manifest is not None
        return fingerprint(self.manifest)

    @property
    def train_samples(self) -> int:
        split = self.manifest.splits.get("train") if self.manifest else None
        return split.samples if split else 0

    @property
    def has_val(self) -> bool:
        split = self.manifest.splits.get("val") if self.manifest else None
        return bool(split and split.samples)


@dataclass
class SourceRecord:
    """What the run state remembers of a source it has read: its permutation and where it was."""

    name: str
    path: str
    samples: int  # training samples: the length of its permutations
    seed: int  # its permutations' seed


@dataclass
class Segment:
    """A stretch of the run with one set of weights, from `step` (global position `start`) on."""

    step: int
    start: int
    units: dict[str, int]  # source id -> integer weight (sample_order.weight_units)
    consumed: dict[str, int] = field(default_factory=dict)  # source id -> its samples consumed before `start`

    def weights(self) -> dict[str, float]:
        period = sum(self.units.values())
        return {source: units / period for source, units in self.units.items()}


@dataclass
class MixtureState:
    """The mixture's part of the run state: every source read so far and the segments, oldest first."""

    sources: dict[str, SourceRecord]
    segments: list[Segment]

    def state_dict(self) -> dict[str, Any]:
        return {
            "sources": {source: asdict(record) for source, record in self.sources.items()},
            "segments": [asdict(segment) for segment in self.segments],
        }

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> MixtureState:
        return cls(
            {source: SourceRecord(**record) for source, record in state["sources"].items()},
            [Segment(**segment) for segment in state["segments"]],
        )

    @property
    def current(self) -> Segment:
        return self.segments[-1]

    def describe(self, units: dict[str, int] | None = None) -> str:
        """`books 0.7, poems 0.3`: the weights by source name (the current segment's by default)."""
        units = units if units is not None else self.current.units
        period = sum(units.values())
        named = sorted((self.sources[s].name, u / period) for s, u in units.items())
        return ", ".join(f"{name} {weight:.4g}" for name, weight in named)


class MixtureOrder:
    """Global position (from the current segment's start on) -> sample id of the training dataset, whose
    sources are concatenated at `offsets`."""

    def __init__(self, state: MixtureState, offsets: dict[str, int]) -> None:
        segment = state.current
        self.start = segment.start
        self.ids = sorted(segment.units)  # the interleave's source order: by id, whatever the config's order
        self.interleave = Interleave([segment.units[s] for s in self.ids])
        self.before = [segment.consumed.get(s, 0) for s in self.ids]
        self.orders = [GlobalOrder(state.sources[s].samples, state.sources[s].seed) for s in self.ids]
        self.offsets = [offsets[s] for s in self.ids]

    def __call__(self, position: int) -> int:
        if position < self.start:
            raise ValueError(f"position {position} is before the current mixture (from {self.start})")
        source, count = self.interleave.locate(position - self.start)
        return self.offsets[source] + self.orders[source](self.before[source] + count)

    def consumed(self, position: int) -> dict[str, int]:
        """Samples of each source of the current segment consumed before `position` (over the whole run)."""
        counts = self.interleave.counts(position - self.start)
        return {s: before + count for s, before, count in zip(self.ids, self.before, counts, strict=True)}


class DataSources:
    """The run's sources and their mixture. Built from the config (manifests loaded once, here); its run state
    starts with `begin` (a new run) or `resume` (a checkpoint's)."""

    def __init__(self, sources: Sequence[DataSource], is_mixture: bool) -> None:
        self.sources = list(sources)
        self.is_mixture = is_mixture  # data_dirs (per-source metrics), as opposed to one data_dir
        self.state: MixtureState | None = None
        self._order: MixtureOrder | None = None

    @classmethod
    def from_config(cls, config: Any) -> DataSources:
        """`config` is a RunConfig. Directories without a manifest (or with a corrupt one) are kept, and
        reported by `problems`."""
        if config.data_dirs:
            weights = list(config.data_weights) + [math.nan] * (len(config.data_dirs) - len(config.data_weights))
            given = [(f"data_dirs[{i}]", d, w) for i, (d, w) in enumerate(zip(config.data_dirs, weights, strict=False))]
        else:
            given = [("data_dir", config.data_dir, 1.0)]
        sources = []
        for key, directory, weight in given:
            manifest, error = None, None
            if (Path(directory) / MANIFEST_NAME).is_file():
                try:
                    manifest = load_manifest(directory)
                except UserError as failure:
                    error = str(failure)
            sources.append(DataSource(key, Path(directory), float(weight), manifest, error))
        return cls(sources, bool(config.data_dirs))

    # ------------------------------------------------------------------------------------ checks
    def problems(self) -> ConfigProblems:
        """Each source prepared, with training samples; one tokenizer and one seq_len for all; no two sources of
        one name (metrics tell them apart by name) or of the same shards."""
        problems = ConfigProblems()
        seen: list[DataSource] = []  # the sources with a manifest, in config order
        for source in self.sources:
            where = str(source.path)
            if source.manifest is None:
                why = source.load_error or "holds no manifest.json: run python -m data_prep first"
                problems.add(source.key, where, why)
                continue
            if source.train_samples == 0:
                problems.add(source.key, where, "has no training samples; prepare it from more text")
            namesake = next((s for s in seen if s.name == source.name), None)
            twin = next((s for s in seen if s.fingerprint == source.fingerprint), None)
            if namesake is not None:
                problems.add(
                    source.key,
                    where,
                    f"has the same directory name as {namesake.key}={str(namesake.path)!r} ({source.name!r}), and "
                    "sources are named by their directory in metrics: rename one directory, or drop a duplicate",
                )
            elif twin is not None:
                problems.add(
                    source.key,
                    where,
                    f"holds the same training shards as {twin.key}={str(twin.path)!r}: list the data once (give it "
                    "the sum of the weights)",
                )
            if seen:
                problems.extend(_compatibility(seen[0], source))
            seen.append(source)
        return problems

    @property
    def ready(self) -> bool:
        return all(source.manifest is not None for source in self.sources)

    # ------------------------------------------------------------------- what the sources share
    @property
    def manifest(self) -> Manifest:
        """The first source's manifest, which stands for what every source shares (validated): vocabulary,
        special ids, seq_len, tokenizer."""
        manifest = self.sources[0].manifest
        if manifest is None:
            raise UserError(f"{self.sources[0].key}={str(self.sources[0].path)!r} holds no manifest.json")
        return manifest

    def tokenizer_bytes(self) -> bytes:
        return (self.sources[0].path / self.manifest.tokenizer_file).read_bytes()

    @property
    def names(self) -> list[str]:
        return [source.name for source in self.sources]

    def units(self) -> dict[str, int]:
        """The configured mixture: source id -> integer weight."""
        units = weight_units([source.weight for source in self.sources])
        return {source.fingerprint: u for source, u in zip(self.sources, units, strict=True)}

    # ------------------------------------------------------------------------------ run state
    def _seed(self, run_seed: int, source: DataSource) -> int:
        if not self.is_mixture:
            return run_seed  # one data_dir: the order runs of earlier versions had, so they resume exactly
        words = np.random.SeedSequence([run_seed, int(source.fingerprint, 16)]).generate_state(2)
        return int(words[0]) << 32 | int(words[1])

    def _record(self, source: DataSource, run_seed: int) -> SourceRecord:
        return SourceRecord(source.name, str(source.path), source.train_samples, self._seed(run_seed, source))

    def begin(self, seed: int) -> dict[str, Any] | None:
        """A new run: one segment from step 0. Returns the mixture entry to announce (mixtures only)."""
        self.state = MixtureState(
            {source.fingerprint: self._record(source, seed) for source in self.sources},
            [Segment(0, 0, self.units())],
        )
        return self._entry(None) if self.is_mixture else None

    def saved_state(self, checkpoint_state: dict[str, Any], seed: int) -> MixtureState:
        """The mixture state of a checkpoint (checkpoints of earlier versions: one source, the run's seed)."""
        if "mixture" in checkpoint_state:
            return MixtureState.from_state_dict(checkpoint_state["mixture"])
        if self.is_mixture or len(self.sources) != 1:
            raise UserError(
                "the checkpoint predates data mixtures; resume it with data_dir=<its dataset> first (the next "
                "checkpoint records its data), then switch to data_dirs=[...] data_reweight=true"
            )
        source = self.sources[0]
        return MixtureState({source.fingerprint: self._record(source, seed)}, [Segment(0, 0, self.units())])

    def resume_problems(self, saved: MixtureState, reweight: bool, where: str) -> ConfigProblems:
        """Why the sources and weights of this config cannot continue the saved mixture (empty when they can).
        `where` names the checkpoint for the messages."""
        problems = ConfigProblems()
        current = saved.current
        for source in self.sources:
            known = saved.sources.get(source.fingerprint)
            namesakes = [r for s, r in saved.sources.items() if r.name == source.name and s != source.fingerprint]
            if known is None and namesakes:
                problems.add(
                    source.key,
                    str(source.path),
                    f"holds other training shards than the source {source.name!r} the run read ({where}): restore "
                    "them, or prepare the new data into a directory of another name and add it with data_reweight=true",
                )
        if problems.messages:
            return problems
        units = self.units()
        if units != current.units and not reweight:
            key = "data_weights" if self.is_mixture else "data_dir"
            value = [source.weight for source in self.sources] if self.is_mixture else str(self.sources[0].path)
            now = ", ".join(
                f"{s.name} {u / sum(units.values()):.4g}" for s, u in zip(self.sources, units.values(), strict=True)
            )
            problems.add(
                key,
                value,
                f"the run trained on {saved.describe()} (since step {current.step}, {where}), this config gives "
                f"{now}: resume with the run's data, or add data_reweight=true to switch to the new mixture from the "
                "resumed step on",
            )
        return problems

    def resume(
        self, checkpoint_state: dict[str, Any], step: int, cursor: int, reweight: bool, seed: int, where: str
    ) -> dict[str, Any] | None:
        """Continue a checkpoint's mixture at (step, cursor): unchanged, or (reweight) a new segment from here.
        Returns the mixture entry to announce when a new segment starts, else None."""
        saved = self.saved_state(checkpoint_state, seed)
        self.resume_problems(saved, reweight, where).raise_if_any("cannot resume this run")
        units = self.units()
        for source in self.sources:  # a renamed or moved directory keeps its identity; its new name is used
            record = saved.sources.get(source.fingerprint)
            if record is not None:
                record.name, record.path = source.name, str(source.path)
        if units == saved.current.units:
            self.state = saved
            return None
        previous = saved.current
        # Every source's count at the cursor: those of the segment that ends here, and those that left earlier
        # (their counts froze in its start counts). The new segment continues each source from its count.
        reading = MixtureOrder(saved, {s: 0 for s in previous.units}).consumed(cursor)
        before = {s: n for s, n in {**previous.consumed, **reading}.items() if n}
        for source in self.sources:
            saved.sources.setdefault(source.fingerprint, self._record(source, seed))
        saved.segments.append(Segment(step, cursor, units, before))
        self.state = saved
        return self._entry(previous)

    def _entry(self, previous: Segment | None) -> dict[str, Any]:
        """The announcement of the current segment: its step, position and weights by source name (and the
        weights it replaces)."""
        assert self.state is not None
        segment = self.state.current
        names = self.state.sources
        entry: dict[str, Any] = {
            "step": segment.step,
            "consumed_samples": segment.start,
            "tokens": segment.start * self.manifest.seq_len,
            "mixture_segment": len(self.state.segments) - 1,
        }
        left = previous.units if previous is not None else {}  # sources the new mixture leaves out: weight 0
        entry.update({f"data_weight/{names[s].name}": 0.0 for s in left})
        entry.update({f"data_weight/{names[s].name}": w for s, w in segment.weights().items()})
        if previous is not None:
            entry["previous"] = {names[s].name: w for s, w in previous.weights().items()}
        return entry

    def checkpoint_fields(self) -> dict[str, Any]:
        """What a checkpoint records of the data: the directories read (`data_dir`, or a mixture's `data_dirs`)
        and the mixture's run state (`mixture`), which `resume` reads back."""
        assert self.state is not None
        paths = [str(source.path) for source in self.sources]
        data = {"data_dirs": paths} if self.is_mixture else {"data_dir": paths[0]}
        return {**data, "mixture": self.state.state_dict()}

    def order(self, offsets: dict[str, int] | None = None) -> MixtureOrder:
        """The training order from the current segment on; `offsets` (source id -> first sample id in the
        training dataset) default to the sources concatenated in config order."""
        assert self.state is not None, "begin or resume first"
        if offsets is None:
            offsets, total = {}, 0
            for source in self.sources:
                offsets[source.fingerprint] = total
                total += source.train_samples
        self._order = MixtureOrder(self.state, offsets)
        return self._order

    def consumed_tokens(self, cursor: int) -> dict[str, int]:
        """`tokens/<name>` of each source of a mixture at the cursor (empty for one data_dir)."""
        if not self.is_mixture:
            return {}
        order = self._order or self.order()
        counts = order.consumed(cursor)
        seq_len = self.manifest.seq_len
        return {f"tokens/{source.name}": counts.get(source.fingerprint, 0) * seq_len for source in self.sources}


def _compatibility(first: DataSource, source: DataSource) -> ConfigProblems:
    """Whether `source` can be mixed with `first`: the same tokenizer and the same seq_len."""
    assert first.manifest is not None and source.manifest is not None
    problems, where = ConfigProblems(), str(source.path)
    mine, theirs = source.manifest, first.manifest
    if mine.tokenizer_sha256 != theirs.tokenizer_sha256:
        problems.add(
            source.key,
            where,
            f"was prepared with another tokenizer than {first.key}={str(first.path)!r} (sha256 "
            f"{mine.tokenizer_sha256[:12]}… vs {theirs.tokenizer_sha256[:12]}…): prepare it again with "
            f"tokenizer.model_path={first.path / theirs.tokenizer_file}",
        )
    if mine.seq_len != theirs.seq_len:
        problems.add(
            source.key,
            where,
            f"has seq_len {mine.seq_len}, {first.key}={str(first.path)!r} has {theirs.seq_len}: prepare every "
            "source with one seq_len",
        )
    return problems
