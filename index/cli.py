"""``midimatch index build|info`` and ``midimatch identify``."""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

from index.answers import (
    ANSWERS,
    IDENTIFIED,
    NOT_IN_COLLECTION,
    SILENT,
    TOO_SHORT,
    answer,
    answer_line,
    clock,
)

AUDIO_SUFFIXES = (".wav", ".flac", ".ogg", ".oga", ".opus", ".mp3", ".aif", ".aiff", ".aifc",
                  ".au", ".caf", ".w64")
EXIT_HELP = ("exit status: 0 when every file got an answer ("
             + ", ".join(f"'{words}'" for words in ANSWERS.values())
             + "); 1 when at least one file failed (missing, unreadable, --start past its end: "
             "its line "
             "says why; the others are still answered); 2 when nothing could run (bad "
             "arguments, no index, a model mismatch)")


class DefaultsHelpFormatter(argparse.HelpFormatter):
    """Every optional argument's help ends with its default, unless it already says it
    ("default ...") or the option is required."""

    def _get_help_string(self, action: argparse.Action) -> str:
        help = action.help or ""
        if (action.default is argparse.SUPPRESS or "default" in help.lower() or action.required
                or not action.option_strings or action.dest == "help"):
            return help
        default = action.default
        shown = ("off" if default is False else "on" if default is True
                 else "none" if default is None else "%(default)s")
        return f"{help} (default {shown})" if help else f"default {shown}"


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("index", help="build or inspect an index of MIDI files",
                       formatter_class=DefaultsHelpFormatter)
    isub = p.add_subparsers(dest="index_command", metavar="ACTION", required=True)

    b = isub.add_parser("build", help="index the MIDI files under PATH... into OUT",
                        formatter_class=DefaultsHelpFormatter,
                        description="Walk PATHs for .mid/.midi/.kar files, render and encode "
                        "them in parallel, and write an index to OUT. Re-running adds new files "
                        "and skips unchanged ones. A reference's title is the MIDI file's "
                        "own (its first track's name) or else its file name tidied.")
    b.add_argument("out", type=Path, help="index folder (created or updated)")
    b.add_argument("paths", nargs="+", type=Path, help="MIDI files or folders")
    b.add_argument("--workers", type=int, default=2, help="worker processes (default 2)")
    b.add_argument("--weights", help="model weights file (default: the shipped model)")
    b.add_argument("--method", choices=("fast", "synth", "sine"), default="fast",
                   help="MIDI → features: fast note render, synthesis + CQT (fluidsynth when "
                        "installed), or pretty_midi's sine synthesis + CQT (default fast)")
    b.add_argument("--timeout", type=float, default=120.0, metavar="S",
                   help="give up on one file after S seconds (default 120)")
    b.add_argument("--rebuild", action="store_true",
                   help="re-encode everything (after changing the model)")
    b.add_argument("--prune-missing", action="store_true",
                   help="drop references whose file no longer exists")
    b.add_argument("--window-hop", type=int, metavar="FRAMES",
                   help="embedding window hop in CQT frames (default: the model's, 108 ≈ 5 s); "
                        "smaller: more windows per reference, a larger index, a better prune")
    b.add_argument("--no-progress", action="store_true", help="no progress bar")
    b.add_argument("--json", action="store_true", help="print the build report as JSON")
    b.set_defaults(func=_build)

    i = isub.add_parser("info", help="describe an index", formatter_class=DefaultsHelpFormatter)
    i.add_argument("out", type=Path, help="index folder")
    i.add_argument("--json", action="store_true", help="machine-readable output")
    i.set_defaults(func=_info)

    q = sub.add_parser(
        "identify", help="which piece of an index is playing in audio files",
        formatter_class=DefaultsHelpFormatter,
        description="Search the end of each AUDIO file (the last 20 s are verified, the last "
        "10 s pruned by embedding) against an index, loaded once, and print one line per file: "
        f"'{ANSWERS[IDENTIFIED]}: TITLE at m:ss (confidence C >= threshold)', "
        f"'{ANSWERS[NOT_IN_COLLECTION]} (...)', '{ANSWERS[SILENT]}' (RMS under -60 dBFS over "
        f"the part searched), '{ANSWERS[TOO_SHORT]}' or 'error: ...'; `midimatch stream` and "
        "the page end a stream with the same words. With --json, one JSON object per line "
        "instead (its 'answer': kind and words). A progress bar goes to stderr when there are "
        "several files.",
        epilog=EXIT_HELP)
    q.add_argument("audio", type=Path, nargs="+",
                   help="audio files (wav, flac, ogg, mp3: anything libsndfile reads) or "
                   f"folders, searched for {', '.join(AUDIO_SUFFIXES)} files")
    q.add_argument("--index", required=True, type=Path, help="index folder (required)")
    q.add_argument("--top", type=int, default=5, metavar="N",
                   help="matches per file in --json and --ranking")
    q.add_argument("--ranking", action="store_true",
                   help="also print each file's top matches under its line")
    q.add_argument("--weights", help="model weights file (default: the shipped model)")
    q.add_argument("--calibration", type=Path,
                   help="calibration JSON (default: model/weights/default.calibration.json)")
    q.add_argument("--start", type=float, default=0.0, metavar="S",
                   help="ignore the audio before S seconds")
    q.add_argument("--duration", type=float, metavar="S",
                   help="use only S seconds from --start (default: to the end)")
    q.add_argument("--device", default="cpu", help="torch device")
    q.add_argument("--json", action="store_true", help="one JSON object per file, one per line")
    q.add_argument("--no-progress", action="store_true", help="no progress bar")
    q.set_defaults(func=_identify)


def _build(args: argparse.Namespace) -> int:
    from index.build import BuildOptions, build_index
    from model.errors import MidimatchError

    if args.workers < 1:
        raise MidimatchError(f"--workers must be >= 1, got {args.workers}", reason="bad_argument")
    _check_weights_and_device(args.weights)
    opts = BuildOptions(weights=args.weights, method=args.method, workers=args.workers,
                        file_timeout_s=args.timeout, rebuild=args.rebuild,
                        prune_missing=args.prune_missing, progress=not args.no_progress,
                        window_hop=args.window_hop)
    report = build_index(args.out, args.paths, opts)
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    print(f"index {args.out}: {report['n_refs']} references "
          f"({report['encoded']} encoded, {report['reused']} unchanged, "
          f"{len(report['skipped'])} skipped) in {report['seconds']:.1f} s"
          + (f", {report['files_per_s']:.1f} files/s" if report["files_per_s"] else "")
          + (f", {report['bytes_per_ref'] / 1024:.1f} KB/reference"
             if report["bytes_per_ref"] else ""))
    if report.get("worker_deaths"):
        print(f"{report['worker_deaths']} worker process(es) died during the build and were "
              "replaced; the files they were encoding were retried alone (reason worker_died "
              "for a file that killed its worker twice)")
    reasons: dict[str, int] = {}
    for s in report["skipped"]:
        reasons[s["reason"]] = reasons.get(s["reason"], 0) + 1
    if reasons:
        print("skipped by reason: " + ", ".join(f"{k} {v}" for k, v in sorted(reasons.items()))
              + f" (details: {args.out}/CURRENT → build_report.json)")
    return 0


def _info(args: argparse.Namespace) -> int:
    from index.store import load_index

    d = load_index(args.out)
    rep = d.report
    info = {
        "path": str(d.path),
        "references": len(d),
        "model_id": d.model_id,
        "n_bits": d.meta["n_bits"],
        "render_method": d.meta.get("render_method"),
        "hash_frames": int(d.hashes.shape[0]),
        "windows": int(d.embeddings.shape[0]),
        "bytes": d.nbytes(),
        "bytes_per_ref": round(d.nbytes() / len(d)) if len(d) else None,
        "total_duration_s": round(sum(r["duration_s"] for r in d.refs), 1),
        "written_utc": d.meta.get("written_utc"),
        "last_build": {k: rep.get(k) for k in ("encoded", "reused", "seconds", "files_per_s")}
        | {"skipped": len(rep.get("skipped", []))},
    }
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        for k, v in info.items():
            print(f"{k:>17}: {v}")
    return 0


def audio_files(paths: list[Path]) -> tuple[list[Path], list[tuple[Path, str, str]]]:
    """Files and folders → the audio files to identify, in the order given (a folder's files
    sorted), and ``(path, reason, message)`` for arguments that give none."""
    files: list[Path] = []
    problems: list[tuple[Path, str, str]] = []
    for p in paths:
        if p.is_dir():
            found = sorted(f for f in p.rglob("*")
                           if f.is_file() and f.suffix.lower() in AUDIO_SUFFIXES)
            files += found
            if not found:
                problems.append((p, "no_audio", f"no audio files ({', '.join(AUDIO_SUFFIXES)}) "
                                 f"in the folder {p}"))
        elif p.exists():
            files.append(p)
        else:
            problems.append((p, "missing", f"{p} does not exist"))
    return files, problems


def _identify(args: argparse.Namespace) -> int:
    from model.errors import MidimatchError

    if args.top < 1:
        raise MidimatchError("--top must be >= 1", reason="bad_argument")
    if not (math.isfinite(args.start) and args.start >= 0):
        raise MidimatchError(f"--start must be a finite number of seconds >= 0, got "
                             f"{args.start:g}", reason="bad_argument")
    if args.duration is not None and not (math.isfinite(args.duration) and args.duration > 0):
        raise MidimatchError(f"--duration must be a finite number of seconds > 0, got "
                             f"{args.duration:g}", reason="bad_argument")
    _check_weights_and_device(args.weights, args.device)
    files, problems = audio_files(args.audio)
    out = _Output(args, n_files=len(files) + len(problems))
    for path, reason, message in problems:  # before loading the model: a typo fails fast
        out.error(path, reason, message)
    if files:
        cascade = _open_cascade(args)
        cal = cascade.calibration
        out.cascade_info = {
            "index": str(cascade.index.path),
            "model_id": cascade.encoder.model_id,
            "threshold": cal.threshold if cal.threshold != float("inf") else None,
            "calibration": cal.source,
        }
        for path in files:
            try:
                out.answer(path, *_search_file(cascade, path, args))
            except MidimatchError as e:
                out.error(path, e.reason, e.message)
            except Exception as e:  # one file's bug must not lose the other files' answers
                out.error(path, "internal", f"{type(e).__name__}: {e}")
    return out.close()


def _check_weights_and_device(weights: str | None, device: str | None = None) -> None:
    """``--weights`` names a file, ``--device`` a device this machine has: else
    ``MidimatchError`` (exit 2) before the index, the model or any file is read."""
    from model.errors import MidimatchError

    if weights is not None and not Path(weights).is_file():
        raise MidimatchError(f"--weights {weights}: " + ("is a folder, not a model file"
                             if Path(weights).is_dir() else "no such file"),
                             reason="no_model")
    if device is not None:
        from model.encoder import check_device

        check_device(device)


def _open_cascade(args: argparse.Namespace):
    from index.calibration import load_calibration
    from index.cascade_types import CascadeConfig
    from index.search import Cascade

    cascade = Cascade.open(args.index, weights=args.weights, device=args.device,
                           config=CascadeConfig(top_n=args.top))
    if args.calibration is not None:
        cascade.calibration = load_calibration(cascade.encoder.model_id, args.calibration)
    return cascade


# Frame-grid alignment of the excerpt identify reads (see _search_file): an excerpt must start a
# whole number of CQT hops (HOP samples at 22,050 Hz) after the part's start for its frames to be
# the part's frames. At most rates that is a whole number of input samples every few hops
# (44.1 kHz: every hop, 48 kHz: every 6.8 s, 8/16/32 kHz: every 20.5 s); at rates where it is
# more than this, the excerpt starts at the input sample nearest to a hop instead (frames within
# a fraction of a sample of the part's).
MAX_ALIGN_S = 30.0


def grid_step(sample_rate: int) -> int:
    """Input samples between two starts whose CQT frames lie on the same grid exactly: the
    smallest ``s`` with ``s * 22050 / sample_rate`` a multiple of the hop."""
    from model.features import HOP, SAMPLE_RATE

    return HOP * sample_rate // math.gcd(SAMPLE_RATE, HOP * sample_rate)


def aligned_start(first: int, part_start: int, sample_rate: int) -> int:
    """The earliest sample ``>= first`` at which an excerpt of the part that starts at
    ``part_start`` has the part's CQT frames (``MAX_ALIGN_S``)."""
    from model.features import HOP, SAMPLE_RATE

    skip = first - part_start
    if skip <= 0:
        return part_start
    step = grid_step(sample_rate)
    if step <= MAX_ALIGN_S * sample_rate:
        return part_start + -(-skip // step) * step
    hop = HOP * sample_rate / SAMPLE_RATE  # one hop in input samples, fractional
    return part_start + max(skip, round(math.ceil(skip / hop) * hop))


def align_slack_s(sample_rate: int) -> float:
    """How far past the earliest sample :func:`aligned_start` may start, seconds."""
    from model.features import HOP, SAMPLE_RATE

    step = grid_step(sample_rate)
    if step <= MAX_ALIGN_S * sample_rate:
        return step / sample_rate
    return (math.ceil(HOP * sample_rate / SAMPLE_RATE) + 1) / sample_rate


def search_seconds(cascade) -> float:
    """Seconds of a query's end that a search reads: the query window hashed and verified (and
    the embedded window, when longer), plus 1 s for the CQT's edge; the silence check's part
    (:meth:`index.search.Cascade.search_audio`) lies inside it."""
    from index.cascade_types import FRAME_RATE_HZ

    frames = max(cascade.config.query_window_frames, cascade.embed_frames)
    return max(cascade.config.query_window_s, frames / FRAME_RATE_HZ) + 1.0


def _search_file(cascade, path: Path, args: argparse.Namespace):
    """``(SearchResult, or the answer kind SILENT / TOO_SHORT when nothing was searched, query
    seconds)``; AudioError for unusable audio.

    Only the end of the part searched is read and analysed (:func:`search_seconds`, started on
    the part's frame grid: :func:`aligned_start`), so a long recording costs what 21 s do and
    gets the answer the whole part would. The part is the file (or ``--start``/``--duration``'s
    excerpt), its length from the header: a file without samples is silent, as a stream of it is.
    """
    from model.audio import load_audio_end
    from model.errors import AudioError

    need_s = search_seconds(cascade)
    end = load_audio_end(path, lambda rate: need_s + align_slack_s(rate), start_s=args.start,
                         duration_s=args.duration)
    rate = end.sample_rate
    if end.file_frames == 0:
        return SILENT, 0.0  # nothing to identify: what a stream of it ends with
    if end.part_frames == 0:
        raise AudioError(f"--start {args.start:g} s is past the end of {path} "
                         f"({end.file_frames / rate:.1f} s)", reason="too_short")
    query_s = end.part_frames / rate
    audio = end.audio[aligned_start(end.offset, end.part_start, rate) - end.offset:]
    try:
        return cascade.search_audio(audio, rate), query_s
    except AudioError as e:
        # answers, not failures: there is nothing to identify, or too little to search
        if e.reason in (SILENT, TOO_SHORT):
            return e.reason, query_s
        raise


class _Output:
    """One line (or JSON object) per file, in order; the progress bar; the exit status."""

    def __init__(self, args: argparse.Namespace, n_files: int) -> None:
        self.args = args
        self.counts = {kind: 0 for kind in ANSWERS} | {"error": 0}
        self.cascade_info: dict = {}  # index, model_id, threshold, calibration
        self.bar = None
        if n_files > 1 and not args.no_progress:
            from tqdm import tqdm

            # mininterval 0: a file takes tens of ms or more, so every one may redraw the bar
            # (tqdm's default 0.1 s throttle skipped the last "2/2" of a quick run)
            self.bar = tqdm(total=n_files, unit="file", desc="identify", file=sys.stderr,
                            leave=False, disable=None, mininterval=0)

    def _emit(self, text: str) -> None:
        if self.bar is not None and not self.bar.disable:
            self.bar.write(text, file=sys.stdout)
            self.bar.update()
        else:
            print(text, flush=True)
            if self.bar is not None:
                self.bar.update()

    def error(self, path: Path, reason: str, message: str) -> None:
        self.counts["error"] += 1
        if self.args.json:
            self._emit(json.dumps({"audio": str(path), "status": "error",
                                   "error": {"reason": reason, "message": message}}))
        else:
            self._emit(f"{path}: error: {message}")

    def answer(self, path: Path, res, query_s: float) -> None:
        cal = self.cascade_info
        kind = (res if isinstance(res, str) else IDENTIFIED if res.identified is not None
                else NOT_IN_COLLECTION)
        self.counts[kind] += 1
        if isinstance(res, str):
            res = None  # nothing was searched
        if self.args.json:
            body = ({"matches": [], "identified": None, "timings_s": {}, "n_candidates": 0}
                    if res is None else res.to_dict())
            self._emit(json.dumps({"audio": str(path), "status": "ok",
                                   "query_s": round(query_s, 3)} | cal
                                  | {"decision": kind, "answer": answer(kind)} | body))
            return
        threshold = cal["threshold"] if cal["threshold"] is not None else float("inf")
        if res is None:
            line = answer_line(kind)
        elif res.identified is not None:
            m = res.identified
            line = (f"{answer_line(IDENTIFIED, m.title, m.position_s)} (confidence "
                    f"{m.confidence:.3f} >= {threshold:.3f})")
        elif res.matches:
            best = res.matches[0]
            line = (f"{answer_line(NOT_IN_COLLECTION)} (best: {best.title}, confidence "
                    f"{best.confidence:.3f} < threshold {threshold:.3f})")
        else:
            line = f"{answer_line(NOT_IN_COLLECTION)} (no references)"
        lines = [f"{path}: {line}"]
        if self.args.ranking and res is not None and res.matches:
            lines.append(f"  {'rank':>4}  {'confidence':>10}  {'score':>6}  {'position':>8}  "
                         "title")
            lines += [f"  {k:>4}  {m.confidence:>10.3f}  {m.score:>6.2f}  "
                      f"{clock(m.position_s):>8}  {m.title}"
                      for k, m in enumerate(res.matches, 1)]
        self._emit("\n".join(lines))

    def close(self) -> int:
        if self.bar is not None:
            self.bar.close()
        c = self.counts
        n = sum(c.values())
        if n > 1 and not self.args.json:
            print(f"{n} files: {c[IDENTIFIED]} identified, {c[NOT_IN_COLLECTION]} not in "
                  f"the collection, {c[SILENT]} silent, {c[TOO_SHORT]} too short, "
                  f"{c['error']} failed",
                  file=sys.stderr)
        return 1 if c["error"] else 0

