"""A run's data sources on real prepared datasets: the mixture's order, its run state across a resume and a
reweight, and every bad configuration refused in one message (by `python -m pretrain` and `python -m launch`)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from common.errors import UserError
from data_prep.manifest import load_manifest
from pretrain.core.config import RunConfig
from pretrain.core.mixture import DataSources
from pretrain.core.sample_order import GlobalOrder
from tests.support import TINY_PREP, run_module, tiny_run_args

SEED = 1234


def mixture(books: Path, poems: Path, weights: tuple[float, float], **settings) -> DataSources:
    config = RunConfig(data_dirs=[str(books), str(poems)], data_weights=list(weights), **settings)
    return DataSources.from_config(config)


def as_saved(sources: DataSources) -> dict:
    """What a checkpoint's trainer_state.json holds of the sources (through JSON, as on disk)."""
    return json.loads(json.dumps(sources.checkpoint_fields()))


def by_source(ids: list[int], books_samples: int) -> tuple[list[int], list[int]]:
    """Sample ids of the concatenated training set -> (books' sample numbers, poems' sample numbers)."""
    return [i for i in ids if i < books_samples], [i - books_samples for i in ids if i >= books_samples]


def test_a_reweight_continues_every_source_where_it_was(mixture_sources: tuple[Path, Path]) -> None:
    books, poems = mixture_sources
    n_books, n_poems = (load_manifest(d).splits["train"].samples for d in (books, poems))
    before = mixture(books, poems, (0.7, 0.3))
    entry = before.begin(SEED)
    assert entry is not None and entry["data_weight/books"] == 0.7 and entry["step"] == 0
    first = [before.order()(p) for p in range(400)]
    after = mixture(books, poems, (0.2, 0.8), data_reweight=True)
    change = after.resume(as_saved(before), step=50, cursor=400, reweight=True, seed=SEED, where="test")
    assert change is not None and change["step"] == 50 and change["consumed_samples"] == 400
    assert change["data_weight/poems"] == 0.8 and change["previous"] == {"books": 0.7, "poems": 0.3}
    second = [after.order()(p) for p in range(400, 1200)]

    books_seen, poems_seen = by_source(first + second, n_books)
    # Each source's samples are its own order, position after position, across the change: nothing consumed
    # before is repeated, nothing skipped. Poems (a few hundred samples) go round several epochs, each a new
    # permutation; books (thousands) are read once.
    records = {record.name: record for record in after.state.sources.values()}
    for name, seen, count in (("books", books_seen, n_books), ("poems", poems_seen, n_poems)):
        own = GlobalOrder(count, records[name].seed)
        assert seen == [own(j) for j in range(len(seen))], name
    assert len(poems_seen) > 2 * n_poems and len(books_seen) < n_books
    assert len(set(books_seen)) == len(books_seen)
    # The shares: 0.3 of the first 400 positions, 0.8 of the next 800, as close as whole samples allow.
    assert abs(len(by_source(first, n_books)[1]) - 120) < 1
    assert abs(len(by_source(second, n_books)[1]) - 640) < 1
    # The per-source counts metrics report are this recount.
    assert after.consumed_tokens(1200) == {"tokens/books": len(books_seen) * 64, "tokens/poems": len(poems_seen) * 64}
    assert [s.start for s in after.state.segments] == [0, 400]


def test_the_same_weights_resume_unchanged_with_or_without_data_reweight(mixture_sources: tuple[Path, Path]) -> None:
    books, poems = mixture_sources
    run = mixture(books, poems, (0.7, 0.3))
    run.begin(SEED)
    # Weights are compared as the mixture they make: 7:3 is 0.7:0.3; the data_dirs' order does not matter.
    for weights, reweight in (((0.7, 0.3), False), ((7.0, 3.0), False), ((0.7, 0.3), True)):
        again = mixture(books, poems, weights)
        assert again.resume(as_saved(run), 10, 80, reweight=reweight, seed=SEED, where="test") is None
        assert len(again.state.segments) == 1
    swapped = DataSources.from_config(RunConfig(data_dirs=[str(poems), str(books)], data_weights=[0.3, 0.7]))
    assert swapped.resume(as_saved(run), 10, 80, reweight=False, seed=SEED, where="test") is None
    assert [swapped.order()(p) for p in range(80, 120)] != []  # the same mixture, other dataset offsets


def test_other_weights_are_refused_without_data_reweight(mixture_sources: tuple[Path, Path]) -> None:
    books, poems = mixture_sources
    run = mixture(books, poems, (0.7, 0.3))
    run.begin(SEED)
    with pytest.raises(UserError) as refused:
        mixture(books, poems, (0.5, 0.5)).resume(as_saved(run), 10, 80, reweight=False, seed=SEED, where="step-10")
    assert str(refused.value) == (
        "cannot resume this run: data_weights=[0.5, 0.5]: the run trained on books 0.7, poems 0.3 (since step 0, "
        "step-10), this config gives books 0.5, poems 0.5: resume with the run's data, or add data_reweight=true "
        "to switch to the new mixture from the resumed step on"
    )


def test_one_data_dir_keeps_its_order_and_can_become_a_mixture(
    mixture_sources: tuple[Path, Path], tmp_path: Path
) -> None:
    books, poems = mixture_sources
    n_books = load_manifest(books).splits["train"].samples
    single = DataSources.from_config(RunConfig(data_dir=str(books)))
    assert single.begin(SEED) is None  # one dataset: no mixture to announce, no per-source metrics
    assert [single.order()(p) for p in range(100)] == [GlobalOrder(n_books, SEED)(p) for p in range(100)]
    assert single.consumed_tokens(100) == {}
    # A checkpoint of an earlier version (no "mixture" key) resumes the same order.
    legacy = DataSources.from_config(RunConfig(data_dir=str(books)))
    assert legacy.resume({"trainer": {}}, 5, 40, reweight=False, seed=SEED, where="old") is None
    assert legacy.order()(40) == GlobalOrder(n_books, SEED)(40)
    # ... but not as a mixture: which data did it read?
    with pytest.raises(UserError, match="predates data mixtures"):
        mixture(books, poems, (0.5, 0.5)).resume({}, 5, 40, reweight=True, seed=SEED, where="old")
    # The run goes on with a second source added (data_reweight): books continues its run-seeded order.
    grown = mixture(books, poems, (0.5, 0.5))
    grown.resume(as_saved(single), 5, 40, reweight=True, seed=SEED, where="test")
    ids = [grown.order()(p) for p in range(40, 140)]
    books_seen, poems_seen = by_source(ids, n_books)
    assert books_seen == [GlobalOrder(n_books, SEED)(j) for j in range(40, 40 + len(books_seen))]
    assert len(books_seen) == len(poems_seen) == 50

    # A renamed (or moved) directory is the same source; other data under a name the run knows is refused.
    renamed = tmp_path / "library"
    renamed.symlink_to(books.resolve(), target_is_directory=True)
    moved = DataSources.from_config(RunConfig(data_dir=str(renamed)))
    assert moved.resume(as_saved(single), 5, 40, reweight=False, seed=SEED, where="test") is None
    impostor = tmp_path / "elsewhere" / "books"
    impostor.parent.mkdir()
    impostor.symlink_to(poems.resolve(), target_is_directory=True)
    replaced = DataSources.from_config(RunConfig(data_dir=str(impostor)))
    with pytest.raises(UserError, match="holds other training shards than the source 'books' the run read"):
        replaced.resume(as_saved(single), 5, 40, reweight=True, seed=SEED, where="test")


@pytest.fixture(scope="module")
def foreign_dataset(small_corpus: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A dataset with its own tokenizer and another seq_len than tiny_dataset's."""
    out = tmp_path_factory.mktemp("foreign")
    corpus = tmp_path_factory.mktemp("foreign_corpus")
    book = min(small_corpus.iterdir(), key=lambda p: p.stat().st_size)
    shutil.copy(book, corpus / book.name)
    settings = [*TINY_PREP, "seq_len=32", "tokenizer.vocab_size=400", "val_fraction=0.0"]
    run_module("data_prep", f"input=[{corpus}]", f"output_dir={out}", *settings, check=True)
    return out


def test_every_bad_mixture_is_refused_in_one_message(
    mixture_sources: tuple[Path, Path], foreign_dataset: Path, tmp_path: Path
) -> None:
    books, poems = mixture_sources
    # A source without training samples (data_prep never writes one; an edited or truncated manifest does).
    empty = tmp_path / "empty"
    shutil.copytree(poems.resolve(), empty)
    manifest = json.loads((empty / "manifest.json").read_text())
    manifest["splits"]["train"].update(shards=[], samples=0, tokens=0)
    (empty / "manifest.json").write_text(json.dumps(manifest))
    twin = tmp_path / "twin"
    twin.symlink_to(poems.resolve(), target_is_directory=True)
    dirs = [books, poems, foreign_dataset, empty, tmp_path / "missing", books, twin]
    args = [
        f"run_dir={tmp_path / 'run'}",
        f"data_dirs=[{','.join(map(str, dirs))}]",
        "data_weights=[0.5,0,-1,1,1,1]",
        "model=tiny",
    ]
    expected = [
        "data_weights=[0.5, 0.0, -1.0, 1.0, 1.0, 1.0]: has 6 weights for 7 data_dirs: give one weight per directory",
        "data_weights=[0.5, 0.0, -1.0, 1.0, 1.0, 1.0]: every weight must be > 0 (got 0.0, -1.0)",
        f"data_dirs[2]={str(foreign_dataset)!r}: was prepared with another tokenizer than data_dirs[0]={str(books)!r}",
        f"tokenizer.model_path={books / 'tokenizer.model'}",
        f"data_dirs[2]={str(foreign_dataset)!r}: has seq_len 32, data_dirs[0]={str(books)!r} has 64",
        f"data_dirs[3]={str(empty)!r}: has no training samples",
        f"data_dirs[4]={str(tmp_path / 'missing')!r}: holds no manifest.json: run python -m data_prep first",
        f"data_dirs[5]={str(books)!r}: has the same directory name as data_dirs[0]={str(books)!r} ('books')",
        f"data_dirs[6]={str(twin)!r}: holds the same training shards as data_dirs[1]={str(poems)!r}",
    ]
    for module, extra in (("pretrain", []), ("launch", ["launcher.nproc_per_node=2", "launch.dry_run=true"])):
        done = run_module(module, *args, *extra)
        assert done.returncode == 2, done.stderr
        lines = done.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: invalid config:"), done.stderr
        for fragment in expected:
            assert fragment in lines[0], (module, fragment, lines[0])
    assert not (tmp_path / "run").exists()

    # data_dir and data_dirs together, and weights without a mixture: one message each way.
    done = run_module("pretrain", *tiny_run_args(books, tmp_path / "run", f"data_dirs=[{poems}]", "data_weights=[1]"))
    assert f"data_dir={str(books)!r}: and data_dirs are both given" in done.stderr
    done = run_module("pretrain", *tiny_run_args(books, tmp_path / "run", "data_weights=[1]"))
    assert "data_weights=[1.0]: weighs the sources of data_dirs=[...], which is not given" in done.stderr
