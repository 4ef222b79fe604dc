"""What a music21 "work" is, and the fixed order in which works are converted.

music21 ships ~3,100 public-domain scores (Humdrum, ABC, MusicXML). An ABC "book" holds many
tunes, so the unit of work is a *work*: one file, or one ``X:`` tune of a multi-tune ABC file
(music21 parses a single tune of a book without parsing the rest, via ``number=``). That gives
about 15,000 works, each with a stable key (its manifest identity) and a shell-safe file name.

The order matters beyond this module: caches, training sets and evaluation sets are defined as
"the first N works", so the order for a seed never changes and interleaves the collections (a
prefix mixes Bach chorales, Palestrina and folk tunes instead of being 90 % Essen folk songs).
"""

from __future__ import annotations

import hashlib
import random
import re
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

# Formats music21 can render as notes; .rntxt (roman-numeral analyses) has no voicing.
SOURCE_SUFFIXES = frozenset({".krn", ".abc", ".mxl", ".xml", ".musicxml"})
_X_FIELD = re.compile(r"^\s*X:\s*(\d+)", re.MULTILINE)
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


@dataclass(frozen=True)
class CorpusWork:
    """One unit of conversion.

    Attributes
    ----------
    key : str
        Identity in the manifest: the corpus-relative path, ``#<X number>`` appended for one tune
        of a multi-tune ABC file. Sources outside the corpus use their absolute path.
    path : Path
        The score file.
    number : int or None
        The ABC ``X:`` number to parse, or None for the whole file.
    name : str
        Output file stem, safe for shells (``[A-Za-z0-9._-]``).
    collection : str
        The corpus folder (composer or collection) the work belongs to.
    """

    key: str
    path: Path
    number: int | None
    name: str
    collection: str


def list_corpus_works(sources: Sequence[Path] | None = None, *, seed: int = 0) -> list[CorpusWork]:
    """List the works to convert, in a deterministic, collection-balanced order.

    Parameters
    ----------
    sources : sequence of Path, optional
        Score files; default: every music21 core-corpus path with a suffix in
        ``SOURCE_SUFFIXES``.
    seed : int
        Shuffles works within each collection; collections are then interleaved round-robin, so a
        prefix (``limit``) mixes Bach chorales, Palestrina, folk tunes... rather than being 90 %
        Essen folk songs. The order for one seed never changes, so a larger ``limit`` extends a
        smaller one.

    Returns
    -------
    list of CorpusWork
    """
    if sources is None:
        from music21 import corpus

        sources = corpus.getPaths()
    root = _corpus_root()
    by_collection: dict[str, list[CorpusWork]] = {}
    names: set[str] = set()
    for path in sorted({Path(p).resolve() for p in sources}):
        if path.suffix.lower() not in SOURCE_SUFFIXES:
            continue
        try:
            rel = path.relative_to(root).as_posix()
            collection, stem = rel.split("/", 1)[0], rel
        except ValueError:  # outside the corpus: the absolute path is the identity
            rel, collection = str(path), path.parent.name
            stem = f"{path.parent.name}/{path.name}-{_short_hash(rel)}"
        for number in _abc_tune_numbers(path) if path.suffix.lower() == ".abc" else [None]:
            key = rel if number is None else f"{rel}#{number}"
            name = _UNSAFE.sub("_", stem.replace("/", "__"))
            name = name if number is None else f"{name}__x{number}"
            if name in names:  # two keys that sanitise alike: keep both, deterministically
                name = f"{name}-{_short_hash(key)}"
            names.add(name)
            work = CorpusWork(key, path, number, name, collection)
            by_collection.setdefault(collection, []).append(work)
    rng = random.Random(seed)
    queues = []
    for collection in sorted(by_collection):
        works = by_collection[collection]
        rng.shuffle(works)
        queues.append(deque(works))
    ordered: list[CorpusWork] = []
    while queues:
        ordered.extend(q.popleft() for q in queues)
        queues = [q for q in queues if q]
    return ordered


def _short_hash(text: str) -> str:
    return hashlib.sha1(text.encode()).hexdigest()[:8]


def _corpus_root() -> Path:
    from music21 import common

    return Path(common.getCorpusFilePath()).resolve()


def _abc_tune_numbers(path: Path) -> list[int | None]:
    """X: numbers of a multi-tune ABC file, in file order; [None] for a single tune."""
    found = _X_FIELD.findall(path.read_text(errors="replace"))
    numbers: list[int | None] = list(dict.fromkeys(int(x) for x in found))
    return numbers if len(numbers) > 1 else [None]
