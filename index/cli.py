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
    b.add_argument("--method", choices=("fast", "synth"), default="fast",
                   help="MIDI → features: fast note render or synthesis + CQT (default fast)")
    b.add_argument("--timeout", type=float, default=120.0, metavar="S",
                   help="give up on one file after S seconds (default 120)")
    b.add_argument("--rebuild", action="store_true",
                   help="re-encode everything (after changing the model)")
    b.add_argument("--prune-missing", action="store_true",
                   help="drop references whose file no longer exists")
    b.add_argument("--no-progress", action="store_true", help="no progress bar")
    b.add_argument("--json", action="store_true", help="print the build report as JSON")
    b.set_defaults(func=_build)

    i = isub.add_parser("info", help="describe an index")
    i.add_argument("out", type=Path, help="index folder")
    i.add_argument("--json", action="store_true", help="machine-readable output")
    i.set_defaults(func=_info)


def _build(args: argparse.Namespace) -> int:
    from index.build import BuildOptions, build_index

    if args.workers < 1:
        raise SystemExit("midimatch index build: --workers must be ≥ 1")
    opts = BuildOptions(weights=args.weights, method=args.method, workers=args.workers,
                        file_timeout_s=args.timeout, rebuild=args.rebuild,
                        prune_missing=args.prune_missing, progress=not args.no_progress)
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
