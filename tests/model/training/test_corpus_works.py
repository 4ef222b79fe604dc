from __future__ import annotations

import re

from model.training.corpus_works import list_corpus_works


def test_listing_is_deterministic_balanced_and_split_into_tunes() -> None:
    works = list_corpus_works()
    assert len(works) > 10_000  # ABC books split into their tunes (~15,000 works)
    assert works == list_corpus_works()
    assert [w.key for w in works[:50]] != [w.key for w in list_corpus_works(seed=1)[:50]]
    keys, names = [w.key for w in works], [w.name for w in works]
    assert len(set(keys)) == len(keys) and len(set(names)) == len(names)
    assert all(re.fullmatch(r"[A-Za-z0-9._-]+", n) for n in names)
    assert not any(w.path.suffix == ".rntxt" for w in works)
    han1 = [w for w in works if w.key.startswith("essenFolksong/han1.abc#")]
    assert len(han1) > 100 and all(w.number is not None for w in han1)
    # Round robin: the first works come from as many collections as there are.
    collections = {w.collection for w in works}
    assert len({w.collection for w in works[: len(collections)]}) == len(collections)
