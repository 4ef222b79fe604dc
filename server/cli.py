"""The ``midimatch`` console script: one entry point, subcommands registered by each package.

Each package's ``cli`` module only declares its arguments here; heavy imports (torch, numba)
happen inside the handlers, so ``midimatch --help`` is instant and the gateway stays light.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys

from model.errors import MidimatchError


def build_parser() -> argparse.ArgumentParser:
    from index import cli as index_cli
    from index.evaluation import cli as eval_cli
    from model.training import cli as model_cli
    from server import client, serve_cli
    from worker import cli as worker_cli

    parser = argparse.ArgumentParser(
        prog="midimatch",
        description="Identify which MIDI file of a collection is playing in live audio.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    index_cli.register(sub)
    model_cli.register(sub)
    worker_cli.register(sub)
    serve_cli.register(sub)
    client.describe_stream_command(sub.choices["stream"])  # its markers and defaults
    eval_cli.register(sub)
    return parser


def _on_sigterm(signum: int, frame: object) -> None:  # noqa: ARG001
    """SIGTERM as Ctrl-C, but first stop this process's worker processes: a pool worker
    outlives its killed parent (those of ``index build`` and ``eval prepare`` kept working for
    minutes, re-parented to init). ``serve`` and ``worker`` put their own graceful shutdown in
    its place."""
    import multiprocessing

    for child in multiprocessing.active_children():
        child.terminate()
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    if argv is None:  # the console script, not a caller's own process (tests call main(argv))
        signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        return int(args.func(args) or 0)
    except MidimatchError as e:
        print(f"midimatch: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("midimatch: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
