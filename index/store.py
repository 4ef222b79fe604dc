"""The on-disk index: per-reference hash sequences, window embeddings and metadata.

Layout (format ``midimatch-index``, version 1)::

    OUT/
      CURRENT                 one line: the name of the live generation folder
      gen-000002/
        meta.json             format, version, model_id, n_bits, window spec, counts, created
        refs.jsonl            one JSON object per reference (row order = reference number)
        hashes.npy            (H,) uint16|uint32   all hash sequences, concatenated
        hash_offsets.npy      (K+1,) int64         reference k = hashes[off[k]:off[k+1]]
        embeddings.npy        (E, D) float16       window embeddings of all references
        embed_ref.npy         (E,) int32           which reference each window belongs to
        embed_start.npy       (E,) int32           window start, in CQT frames
        build_report.json     what the build that wrote this generation did

Arrays are plain ``.npy`` files opened with ``mmap_mode="r"``, so loading 100k references costs
reading ``refs.jsonl`` and mapping the arrays, not copying them. A build writes a whole new
generation folder and only then replaces ``CURRENT`` (write a temp file, ``os.replace``): a crash
at any point leaves the previous generation as the one that loads. A write that fails (a full
disk: ENOSPC) removes what it wrote of the new generation and raises :class:`IndexWriteError`
(reason ``disk_full``), the previous generation still live.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import shutil
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from model.errors import IndexFormatError, MidimatchError, ModelMismatchError

logger = logging.getLogger(__name__)

FORMAT = "midimatch-index"
VERSION = 1
_ARRAYS = ("hashes", "hash_offsets", "embeddings", "embed_ref", "embed_start")


@dataclass
class IndexData:
    """An index in memory (arrays may be memory-mapped, read-only).

    Attributes
    ----------
    meta : dict
        ``model_id``, ``n_bits``, ``embed_dim``, ``frame_rate_hz``, ``hash_downsample``,
        ``window`` ({"length", "hop"} in frames), ``render_method``...
    refs : list of dict
        Per reference: ``path``, ``title``, ``duration_s``, ``sha256``, ``size_bytes``,
        ``mtime``, ``n_frames``.
    hashes, hash_offsets, embeddings, embed_ref, embed_start : np.ndarray
        See the module docstring.
    """

    meta: dict
    refs: list[dict]
    hashes: np.ndarray
    hash_offsets: np.ndarray
    embeddings: np.ndarray
    embed_ref: np.ndarray
    embed_start: np.ndarray
    path: Path | None = None
    report: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.refs)

    @property
    def model_id(self) -> str:
        return str(self.meta["model_id"])

    def hash_sequence(self, k: int) -> np.ndarray:
        """Hash frames of reference ``k``, shape (n,)."""
        return self.hashes[self.hash_offsets[k] : self.hash_offsets[k + 1]]

    def windows(self, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Window embeddings (W, D) and their start frames (W,) of reference ``k``."""
        sel = np.flatnonzero(self.embed_ref == k)
        return self.embeddings[sel], self.embed_start[sel]

    def check_model(self, model_id: str) -> None:
        """Raise :class:`ModelMismatchError` unless this index was built by ``model_id``."""
        if model_id != self.model_id:
            raise ModelMismatchError(
                f"index {self.path} was built with model {self.model_id!r} but the loaded model "
                f"is {model_id!r}; rebuild the index with this model "
                "(midimatch index build --rebuild) or load the model that built it"
            )

    def nbytes(self) -> int:
        """Bytes this index takes on disk: the arrays plus the reference metadata."""
        arrays = sum(int(getattr(self, n).nbytes) for n in _ARRAYS)
        return arrays + len(_refs_jsonl(self.refs).encode())


def empty_index(meta: dict, hash_dtype: np.dtype) -> IndexData:
    """An index with no references, for a first build."""
    d = int(meta["embed_dim"])
    return IndexData(
        meta=dict(meta),
        refs=[],
        hashes=np.zeros(0, hash_dtype),
        hash_offsets=np.zeros(1, np.int64),
        embeddings=np.zeros((0, d), np.float16),
        embed_ref=np.zeros(0, np.int32),
        embed_start=np.zeros(0, np.int32),
    )


def exists(root: str | Path) -> bool:
    """True when ``root`` holds a loadable index pointer."""
    return (Path(root) / "CURRENT").is_file()


def load_index(
    root: str | Path, *, mmap: bool = True, expected_model_id: str | None = None
) -> IndexData:
    """Open the live generation of the index at ``root``.

    Raises
    ------
    IndexFormatError
        Missing folder, no ``CURRENT``, unknown format/version, or arrays that disagree.
    ModelMismatchError
        When ``expected_model_id`` is given and differs from the index's model.
    """
    root = Path(root)
    pointer = root / "CURRENT"
    if not pointer.is_file():
        raise IndexFormatError(f"{root} is not a midimatch index (no CURRENT file); "
                               "build one with `midimatch index build`")
    gen = root / pointer.read_text().strip()
    try:
        meta = json.loads((gen / "meta.json").read_text())
    except (OSError, ValueError) as e:
        raise IndexFormatError(f"{gen}: unreadable meta.json: {e}") from e
    if not isinstance(meta, dict):
        raise IndexFormatError(f"{gen}: damaged index: meta.json is not a JSON object")
    if meta.get("format") != FORMAT:
        raise IndexFormatError(f"{gen}: not a {FORMAT} folder")
    if meta.get("version") != VERSION:
        raise IndexFormatError(
            f"{gen}: index format version {meta.get('version')} is not supported "
            f"(this midimatch reads version {VERSION}); rebuild the index"
        )
    try:
        with open(gen / "refs.jsonl", encoding="utf-8") as f:
            refs = [json.loads(line) for line in f if line.strip()]
        arrays = {n: np.load(gen / f"{n}.npy", mmap_mode="r" if mmap else None,
                             allow_pickle=False) for n in _ARRAYS}
    except (OSError, ValueError) as e:
        raise IndexFormatError(f"{gen}: damaged index: {e}") from e
    data = IndexData(meta=meta, refs=refs, path=gen, report=_read_report(gen), **arrays)
    _validate(data)
    if expected_model_id is not None:
        data.check_model(expected_model_id)
    return data


def _read_report(gen: Path) -> dict:
    """The generation's build report; ``{}`` when there is none or it is damaged (with a
    warning): it only says what the build did, the index loads without it."""
    path = gen / "build_report.json"
    try:
        report = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as e:
        logger.warning("%s: ignored, unreadable: %s", path, e)
        return {}
    if not isinstance(report, dict):
        logger.warning("%s: ignored, not a JSON object", path)
        return {}
    return report


def _validate(d: IndexData) -> None:
    """What the readers of an index take for granted, checked once here: damage is an
    :class:`IndexFormatError`, not a traceback later."""
    k = len(d.refs)
    meta = d.meta
    problems = []
    if meta.get("n_refs") != k:
        problems.append(f"meta says {meta.get('n_refs')} references, refs.jsonl has {k}")
    if not (isinstance(meta.get("model_id"), str) and isinstance(meta.get("n_bits"), int)
            and isinstance(meta.get("window", {}), dict)):
        problems.append("meta.json lacks a model_id or n_bits, or has a bad window")
    bad = [i for i, r in enumerate(d.refs) if not (
        isinstance(r, dict) and isinstance(r.get("path"), str)
        and isinstance(r.get("duration_s"), int | float))]
    if bad:
        problems.append(f"{len(bad)} line(s) of refs.jsonl (the first: line {bad[0] + 1}) not "
                        "an object with a path and a duration_s")
    hash_types = [meta["hash_dtype"]] if "hash_dtype" in meta else ["uint16", "uint32"]
    if d.hashes.ndim != 1 or d.hashes.dtype.name not in hash_types:
        problems.append(f"hashes are {d.hashes.dtype} of shape {d.hashes.shape}, not a "
                        f"sequence of {' or '.join(map(str, hash_types))}")
    off = d.hash_offsets
    if (off.shape != (k + 1,) or off.dtype.kind != "i" or off[0] != 0
            or d.hashes.shape[:1] != (off[-1],) or np.any(np.diff(off) < 0)):
        problems.append("hash offsets do not match the hashes")
    if (d.embed_ref.ndim != 1 or d.embed_ref.shape != d.embed_start.shape
            or d.embeddings.shape[:1] != d.embed_ref.shape):
        problems.append("embedding arrays disagree in length")
    if (d.embeddings.ndim != 2 or d.embeddings.shape[1] != meta.get("embed_dim")
            or d.embeddings.dtype != np.float16):
        problems.append("embeddings are not float16 of meta.embed_dim columns")
    if d.embed_ref.dtype.kind not in "iu" or d.embed_start.dtype.kind not in "iu":
        problems.append("embedding reference numbers or starts are not integers")
    elif d.embed_ref.size and (d.embed_ref.min() < 0 or d.embed_ref.max() >= k):
        problems.append(f"embedding reference numbers outside 0..{k - 1}")
    if problems:
        raise IndexFormatError(f"{d.path}: inconsistent index: " + "; ".join(problems))


def write_index(root: str | Path, data: IndexData, report: dict | None = None) -> Path:
    """Write ``data`` as a new generation of the index at ``root`` and make it live atomically.

    Returns the new generation folder. Older generations and abandoned temp folders are removed
    after the switch.

    Raises
    ------
    IndexWriteError
        The new generation could not be written (``disk_full``: no space left or over quota;
        ``write_failed``: any other OS error). What was written of it is removed, and the
        previous generation stays the live one, untouched.
    """
    root = Path(root)
    with _open_lock(root) as lock:  # held (flock) for the whole write
        # One writer at a time: two builds of one index numbered their generations alike,
        # and one's clean-up deleted the other's live generation. Readers take no lock.
        fcntl.flock(lock, fcntl.LOCK_EX)
        return _write_locked(root, data, report)


def check_writable(root: str | Path) -> None:
    """Raise :class:`IndexWriteError` now unless ``root`` is (or can be made) a folder that an
    index can be written to: before a build spends minutes encoding."""
    _open_lock(Path(root)).close()


def _open_lock(root: Path):
    """``root/.write.lock`` opened for the writers' lock, ``root`` made if need be."""
    try:
        root.mkdir(parents=True, exist_ok=True)
        return open(root / ".write.lock", "a")
    except FileExistsError as e:  # what mkdir(exist_ok=True) says of a file
        raise IndexWriteError(f"cannot write the index at {root}: it is a file, not a folder",
                              reason="write_failed") from e
    except OSError as e:
        raise IndexWriteError.of(root, e) from e


def _write_locked(root: Path, data: IndexData, report: dict | None) -> Path:
    existing = sorted(p.name for p in root.glob("gen-*") if p.is_dir())
    number = 1 + max((int(n.split("-")[1]) for n in existing), default=0)
    name = f"gen-{number:06d}"
    tmp, final = root / f".tmp-{name}-{os.getpid()}", root / name
    renamed = False
    try:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
        _write_generation(tmp, data, report)
        tmp.rename(final)
        renamed = True
        _write_file(root / "CURRENT.tmp", name + "\n")
        os.replace(root / "CURRENT.tmp", root / "CURRENT")  # the commit point
    except OSError as e:
        # Before the commit point: give the space back (a full disk stays full otherwise)
        # and leave CURRENT as it was. Only what this call made is removed.
        shutil.rmtree(tmp, ignore_errors=True)
        if renamed:
            shutil.rmtree(final, ignore_errors=True)
        (root / "CURRENT.tmp").unlink(missing_ok=True)
        raise IndexWriteError.of(root, e) from e
    _fsync_dir(root)
    for old in root.iterdir():
        if old.is_dir() and old.name != name and (
            old.name.startswith("gen-") or old.name.startswith(".tmp-gen-")
        ):
            shutil.rmtree(old, ignore_errors=True)
    return final


class IndexWriteError(MidimatchError, OSError):
    """A new index generation could not be written; the previous one is still live.

    Also an ``OSError`` (with the cause's ``errno``), so that code catching the OS error the
    write raised before still catches it.
    """

    reason = "write_failed"

    @classmethod
    def of(cls, root: Path, e: OSError) -> IndexWriteError:
        full = e.errno in (errno.ENOSPC, errno.EDQUOT)
        what = "no space left on the device" if full else (e.strerror or str(e))
        where = f" ({e.filename})" if e.filename else ""
        err = cls(f"cannot write the index at {root}: {what}{where}; the previous index, if "
                  "any, is unchanged and still the live one",
                  reason="disk_full" if full else "write_failed")
        err.errno = e.errno
        return err


def _write_generation(folder: Path, data: IndexData, report: dict | None) -> None:
    meta = dict(data.meta, format=FORMAT, version=VERSION, n_refs=len(data.refs),
                written_utc=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    _write_file(folder / "meta.json", json.dumps(meta, indent=2, sort_keys=True))
    _write_file(folder / "refs.jsonl", _refs_jsonl(data.refs))
    for n in _ARRAYS:
        arr = np.ascontiguousarray(getattr(data, n))
        with open(folder / f"{n}.npy", "wb") as f:
            np.save(f, arr, allow_pickle=False)
            f.flush()
            os.fsync(f.fileno())
    if report is not None:
        _write_file(folder / "build_report.json", json.dumps(report, indent=2, sort_keys=True))
    _fsync_dir(folder)


def concat(
    meta: dict, parts: Sequence[tuple[dict, np.ndarray, np.ndarray, np.ndarray]],
    hash_dtype: np.dtype,
) -> IndexData:
    """Assemble an index from per-reference parts ``(ref, hashes, embeddings, starts)``."""
    refs = [p[0] for p in parts]
    lengths = np.array([len(p[1]) for p in parts], np.int64)
    offsets = np.zeros(len(parts) + 1, np.int64)
    np.cumsum(lengths, out=offsets[1:])
    d = int(meta["embed_dim"])
    if parts:
        hashes = np.concatenate([np.asarray(p[1], hash_dtype) for p in parts])
        emb = np.concatenate([np.asarray(p[2], np.float16).reshape(-1, d) for p in parts])
        ref_of = np.concatenate([np.full(len(p[2]), k, np.int32) for k, p in enumerate(parts)])
        starts = np.concatenate([np.asarray(p[3], np.int32) for p in parts])
    else:
        hashes, emb = np.zeros(0, hash_dtype), np.zeros((0, d), np.float16)
        ref_of, starts = np.zeros(0, np.int32), np.zeros(0, np.int32)
    return IndexData(meta=dict(meta), refs=refs, hashes=hashes, hash_offsets=offsets,
                     embeddings=emb, embed_ref=ref_of, embed_start=starts)


def iter_parts(d: IndexData) -> Iterator[tuple[dict, np.ndarray, np.ndarray, np.ndarray]]:
    """The inverse of :func:`concat`: ``(ref, hashes, embeddings, starts)`` per reference."""
    order = np.argsort(d.embed_ref, kind="stable")
    bounds = np.searchsorted(d.embed_ref[order], np.arange(len(d.refs) + 1))
    for k, ref in enumerate(d.refs):
        sel = order[bounds[k] : bounds[k + 1]]
        yield ref, np.asarray(d.hash_sequence(k)), np.asarray(d.embeddings[sel]), np.asarray(
            d.embed_start[sel])


def _refs_jsonl(refs: list[dict]) -> str:
    return "".join(json.dumps(r, sort_keys=True, ensure_ascii=False) + "\n" for r in refs)


def _write_file(path: Path, text: str) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
