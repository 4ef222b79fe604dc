"""``midimatch index build|info``."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("index", help="build or inspect an index of MIDI files")
    isub = p.add_subparsers(dest="index_command", metavar="ACTION", required=True)

    b = isub.add_parser("build", help="index the MIDI files under PATH... into OUT",
                        description="Walk PATHs for .mid/.midi/.kar files, render and encode "
                        "them in parallel, and write an index to OUT. Re-running adds new files "
                        "and skips unchanged ones.")
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

    i = isub.add_parser("info", help="describe an index")
    i.add_argument("out", type=Path, help="index folder")
    i.add_argument("--json", action="store_true", help="machine-readable output")
    i.set_defaults(func=_info)

    q = sub.add_parser("identify", help="which piece of an index is playing in an audio file",
                       description="Search the end of AUDIO (the last 20 s are verified, the "
                       "last 10 s pruned by embedding) against an index and print the ranking "
                       "and the decision. Exit 2 with a message for unreadable, silent or "
                       "too-short audio, a missing index or a model mismatch.")
    q.add_argument("audio", type=Path, help="wav, flac, ogg (anything libsndfile reads)")
    q.add_argument("--index", required=True, type=Path, help="index folder")
    q.add_argument("--top", type=int, default=5, metavar="N", help="matches shown (default 5)")
    q.add_argument("--weights", help="model weights file (default: the shipped model)")
    q.add_argument("--calibration", type=Path,
                   help="calibration JSON (default: model/weights/default.calibration.json)")
    q.add_argument("--start", type=float, default=0.0, metavar="S",
                   help="ignore the audio before S seconds")
    q.add_argument("--duration", type=float, metavar="S", help="use only S seconds from --start")
    q.add_argument("--device", default="cpu", help="torch device (default cpu)")
    q.add_argument("--json", action="store_true", help="print one JSON object")
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


def _identify(args: argparse.Namespace) -> int:
    from index.calibration import load_calibration
    from index.cascade_types import CascadeConfig
    from index.search import Cascade
    from model.audio import load_audio
    from model.errors import AudioError, MidimatchError

    if args.top < 1:
        raise MidimatchError("--top must be >= 1", reason="bad_argument")
    if args.start < 0 or (args.duration is not None and args.duration <= 0):
        raise MidimatchError("--start must be >= 0 and --duration > 0", reason="bad_argument")
    if not args.audio.is_file():  # before loading the model: a typo should fail fast
        raise AudioError(f"no such audio file: {args.audio}", reason="unreadable")
    audio, rate = load_audio(args.audio)
    total_s = audio.shape[0] / rate
    a0 = int(args.start * rate)
    a1 = audio.shape[0] if args.duration is None else a0 + int(args.duration * rate)
    audio = audio[a0:a1]
    if audio.shape[0] == 0:
        raise AudioError(f"--start {args.start} s is past the end of {args.audio} "
                         f"({total_s:.1f} s)", reason="too_short")
    kw = {"config": CascadeConfig(top_n=args.top)}
    cascade = Cascade.open(args.index, weights=args.weights, device=args.device, **kw)
    if args.calibration is not None:
        cascade.calibration = load_calibration(cascade.encoder.model_id, args.calibration)
    res = cascade.search_audio(audio, rate)
    cal = cascade.calibration
    best = res.matches[0] if res.matches else None
    if args.json:
        out = {
            "audio": str(args.audio),
            "query_s": round(audio.shape[0] / rate, 3),
            "index": str(cascade.index.path),
            "model_id": cascade.encoder.model_id,
            "threshold": cal.threshold if cal.threshold != float("inf") else None,
            "calibration": cal.source,
            "decision": "identified" if res.identified else "not_in_collection",
        } | res.to_dict()
        print(json.dumps(out, indent=2))
        return 0
    print(f"{'rank':>4}  {'confidence':>10}  {'score':>6}  {'position':>9}  title")
    for rank, m in enumerate(res.matches, 1):
        print(f"{rank:>4}  {m.confidence:>10.3f}  {m.score:>6.2f}  {_clock(m.position_s):>9}  "
              f"{m.title}")
    if res.identified is not None:
        m = res.identified
        print(f"identified: {m.title} at {_clock(m.position_s)} (confidence {m.confidence:.3f}"
              f" >= {cal.threshold:.3f})")
    else:
        conf = f"best confidence {best.confidence:.3f}" if best else "no references"
        print(f"not in the collection ({conf} < threshold {cal.threshold:.3f})")
    return 0


def _clock(seconds: float) -> str:
    """1:23.4 for 83.4 s."""
    return f"{int(seconds // 60)}:{seconds % 60:04.1f}"
