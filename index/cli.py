"""``midimatch index build|info`` and ``midimatch identify``."""

from __future__ import annotations

import argparse
import json
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

    if args.workers < 1:
        raise SystemExit("midimatch index build: --workers must be ≥ 1")
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
    if args.start < 0 or (args.duration is not None and args.duration <= 0):
        raise MidimatchError("--start must be >= 0 and --duration > 0", reason="bad_argument")
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


def _open_cascade(args: argparse.Namespace):
    from index.calibration import load_calibration
    from index.cascade_types import CascadeConfig
    from index.search import Cascade

    cascade = Cascade.open(args.index, weights=args.weights, device=args.device,
                           config=CascadeConfig(top_n=args.top))
    if args.calibration is not None:
        cascade.calibration = load_calibration(cascade.encoder.model_id, args.calibration)
    return cascade


def _search_file(cascade, path: Path, args: argparse.Namespace):
    """``(SearchResult, or the answer kind SILENT / TOO_SHORT when nothing was searched, query
    seconds)``; AudioError for unusable audio."""
    from model.audio import load_audio
    from model.errors import AudioError

    audio, rate = load_audio(path)
    total_s = audio.shape[0] / rate
    a0 = int(args.start * rate)
    a1 = audio.shape[0] if args.duration is None else a0 + int(args.duration * rate)
    audio = audio[a0:a1]
    if audio.shape[0] == 0:
        raise AudioError(f"--start {args.start:g} s is past the end of {path} "
                         f"({total_s:.1f} s)", reason="too_short")
    query_s = audio.shape[0] / rate
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

