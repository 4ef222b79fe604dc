"""``midimatch serve``, ``midimatch stream`` and ``midimatch demo prepare``.

``serve`` without ``--redis`` runs the worker in this process (the embedded default: one command,
one process, an in-process bus); with ``--redis`` it is a gateway only, and any number of
gateways and ``midimatch worker`` processes share the Redis. Heavy imports (torch, via the
embedded worker's engine) happen only in the embedded path, and only inside the handlers.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import logging
import signal
import sys
from collections.abc import Callable, Coroutine, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from model.errors import MidimatchError
from server.settings import MAX_PORT, Settings

if TYPE_CHECKING:
    from worker.redis_bus import RedisBus

log = logging.getLogger(__name__)
DEMO_WORKS = 200


class ListenError(MidimatchError):
    """The gateway cannot listen where it was told to (the port is taken, the address is not
    this machine's...)."""

    reason = "cannot_listen"


def port_number(text: str) -> int:
    """``--port``: an integer 1-65535 (argparse reports anything else as a usage error)."""
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a port number: {text!r}") from None
    if not 1 <= port <= MAX_PORT:
        raise argparse.ArgumentTypeError(f"must be 1-{MAX_PORT}, got {port}")
    return port


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="run the live service: websocket gateway, web page, worker",
                       description="Serve /v1/stream, the web page, /metrics, /healthz and "
                       "/readyz. Without --redis a worker runs in this process on --index; "
                       "with --redis this is a gateway only. Every setting can also be given "
                       "as MIDIMATCH_<NAME> (e.g. MIDIMATCH_AUTH_TOKEN, "
                       "MIDIMATCH_MAX_SESSION_S).")
    p.add_argument("--index", type=Path, help="index folder (embedded worker; demo pieces)")
    p.add_argument("--redis", metavar="URL", help="redis://host:port/db: gateway only")
    p.add_argument("--host", help="listen address (default 127.0.0.1)")
    p.add_argument("--port", type=port_number, help="listen port, 1-65535 (default 8080)")
    p.add_argument("--token", help="require this bearer token (MIDIMATCH_AUTH_TOKEN)")
    p.add_argument("--max-session-s", type=float, metavar="S", help="longest session, s")
    p.add_argument("--max-sessions-per-address", type=int, metavar="N")
    p.add_argument("--idle-timeout-s", type=float, metavar="S",
                   help="close a websocket that sends no audio for this long")
    p.add_argument("--handshake-timeout-s", type=float, metavar="S",
                   help="close a connection without a complete HTTP request after this long")
    p.add_argument("--max-connections", type=int, metavar="N",
                   help="open TCP connections, all addresses together")
    p.add_argument("--resume-grace-s", type=float, metavar="S")
    p.set_defaults(func=_serve)

    s = sub.add_parser("stream", help="stream an audio file to a running service",
                       description="Send FILE (any format libsndfile reads: WAV, FLAC, Ogg, "
                       "MP3...) to /v1/stream and print the rolling results.")
    s.add_argument("file", type=Path)
    s.add_argument("--url", default="ws://127.0.0.1:8080/v1/stream",
                   help="websocket URL (default ws://127.0.0.1:8080/v1/stream)")
    s.add_argument("--speed", choices=("1", "max"), default="1",
                   help="1: real time (default); max: as fast as the service takes it")
    s.add_argument("--json", action="store_true", help="print every server message as JSON")
    s.add_argument("--token", help="bearer token, when the service requires one")
    s.add_argument("--chunk-s", type=float, default=0.25, help="seconds per message")
    s.set_defaults(func=_stream)

    d = sub.add_parser("demo", help="the demo collection for `make serve`")
    dsub = d.add_subparsers(dest="demo_command", metavar="ACTION", required=True)
    dp = dsub.add_parser("prepare", help="convert part of the music21 corpus and index it "
                         "(cached: a second run only checks)",
                         description="Convert part of the music21 corpus to MIDI and index "
                         "every converted work, leaving out music21's test fixtures (its "
                         "corpus's demos folder). Cached: a second run only checks.")
    dp.add_argument("--limit", type=int, default=DEMO_WORKS,
                    help=f"music21 works to convert (default {DEMO_WORKS})")
    dp.add_argument("--index", type=Path, help="index folder (default: the cache's demo-index)")
    dp.add_argument("--workers", type=int, default=2)
    dp.set_defaults(func=_demo_prepare)


def demo_index_dir() -> Path:
    from model.env import cache_dir

    return cache_dir() / "demo-index"


# ---------------------------------------------------------------------------------------- serve
def _serve(args: argparse.Namespace) -> int:
    settings = Settings.from_env(
        index_dir=args.index, redis_url=args.redis, host=args.host, port=args.port,
        auth_token=args.token, max_session_s=args.max_session_s,
        max_sessions_per_address=args.max_sessions_per_address,
        idle_timeout_s=args.idle_timeout_s, resume_grace_s=args.resume_grace_s,
        handshake_timeout_s=args.handshake_timeout_s, max_connections=args.max_connections)
    if settings.redis_url is None and settings.index_dir is None:
        raise SystemExit("midimatch serve: give --index DIR (the worker runs in this process) "
                         "or --redis URL (gateway only); `make serve` prepares a demo index")
    asyncio.run(serve(settings))
    return 0


def gateway_bus(settings: Settings, env: Mapping[str, str] | None = None) -> RedisBus:
    """The gateway's RedisBus, with the retention and expiry the workers use: the bus settings
    (:class:`worker.settings.BusSettings`: ``MIDIMATCH_RETAIN_S``, ``MIDIMATCH_SESSION_TTL_S``,
    ``MIDIMATCH_RESULT_TTL_S``, ``MIDIMATCH_MAX_RESULTS``, ``MIDIMATCH_LEASE_MS``) read from the
    same environment as the workers'. The gateway trims the audio it appends and sets the
    session keys' expiry, so these govern there, not only in the worker. Only the bus's
    variables are read: a worker-only one (``MIDIMATCH_DEVICE``...) never stops a gateway."""
    from worker.redis_bus import RedisBus
    from worker.settings import BusSettings

    assert settings.redis_url is not None
    return RedisBus.from_settings(BusSettings.from_env(
        env, redis_url=settings.redis_url, redis_prefix=settings.redis_prefix))


def embedded_bus(env: Mapping[str, str] | None = None):
    """``midimatch serve`` without Redis: the embedded worker's settings and its in-process bus,
    built from the same bus settings (``MIDIMATCH_LEASE_MS``, ``MIDIMATCH_RETAIN_S``, the
    TTLs...). The bus's defaults were used before, so a longer ``MIDIMATCH_LEASE_MS`` made the
    embedded worker's heartbeat lapse between beats: every start was answered busy."""
    from worker.local_bus import InProcessBus
    from worker.settings import WorkerSettings

    wsettings = WorkerSettings.from_env(env, worker_id="embedded", metrics_port=0)
    return InProcessBus.from_settings(wsettings.bus), wsettings


async def serve(settings: Settings, *, stop: asyncio.Event | None = None) -> None:
    """Run the service until SIGINT/SIGTERM (or ``stop``); raises if the embedded worker dies.

    It listens first and starts the embedded worker (index and model loading) only then, so a
    port it cannot have stops it before anything else runs.

    Raises
    ------
    ListenError
        It cannot listen on ``settings.host``:``settings.port`` (in use, not an address here).
    """
    from server.app import create_app
    from server.demo import DemoCollection, DemoError
    from server.listen import make_runner, start_site

    demo = None
    if settings.index_dir is not None:
        try:
            demo = DemoCollection.from_index(settings.index_dir)
        except DemoError as e:
            if settings.redis_url is None:
                raise
            log.warning("no demo collection: %s", e)
    worker_task: asyncio.Task | None = None
    embedded: Callable[[], Coroutine[Any, Any, None]] | None = None  # started once listening
    if settings.redis_url is not None:
        bus = gateway_bus(settings)
        app = create_app(settings, bus, demo=demo)
        from worker.settings import url_for_log

        mode = f"gateway only, workers via {url_for_log(settings.redis_url)}"
    else:
        from worker.metrics import WorkerMetrics
        from worker.runner import run_embedded  # torch is imported later, by its engine factory

        bus, wsettings = embedded_bus()
        loaded = asyncio.Event()
        wmetrics = WorkerMetrics()
        app = create_app(settings, bus, local_ready=loaded.is_set, registries=[wmetrics.registry],
                         demo=demo)
        embedded = functools.partial(run_embedded, bus, settings.index_dir, settings=wsettings,
                                     metrics=wmetrics, ready=loaded)
        mode = f"embedded worker on {settings.index_dir}"
    runner = make_runner(app, settings)
    await runner.setup()
    try:
        await start_site(runner, settings)
    except (OSError, OverflowError) as e:
        await runner.cleanup()  # closes the bus too
        raise ListenError(cannot_listen(settings, e)) from e
    if embedded is not None:
        worker_task = asyncio.create_task(embedded())
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    print(f"midimatch: serving on http://{settings.host}:{settings.port}/ ({mode}); "
          "Ctrl-C stops", file=sys.stderr, flush=True)
    waits = {asyncio.create_task(stop.wait())} | ({worker_task} if worker_task else set())
    try:
        done, _ = await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
        if worker_task is not None and not worker_task.done():
            worker_task.cancel()
            await asyncio.gather(worker_task, return_exceptions=True)
        await runner.cleanup()
    if worker_task is not None and worker_task in done and worker_task.exception():
        raise worker_task.exception()  # type: ignore[misc]


def cannot_listen(settings: Settings, e: OSError | OverflowError) -> str:
    """One line saying why the gateway cannot listen, and what to do about it."""
    from model.errors import why_cannot_bind

    kind, why = why_cannot_bind(e)
    hint = {"in_use": "; is another midimatch serve running? Stop it, or give another --port",
            "denied": "; give another --port"}.get(kind, " (check --host and --port)")
    return f"cannot listen on {settings.host}:{settings.port}: {why}{hint}"


# --------------------------------------------------------------------------------------- stream
def _stream(args: argparse.Namespace) -> int:
    from server.client import StreamClient, print_message

    client = StreamClient(args.url, token=args.token, chunk_s=args.chunk_s,
                          realtime=args.speed == "1")
    final = asyncio.run(client.stream_file(args.file, lambda m: print_message(m, args.json)))
    return 0 if final is not None and not final.get("error") else 2


# ----------------------------------------------------------------------------------------- demo
def _indexed_model(index_dir: Path) -> str | None:
    """The model id an index was built with (its current generation's meta.json), or None."""
    import json

    try:
        gen = (index_dir / "CURRENT").read_text().strip()
        meta = json.loads((index_dir / gen / "meta.json").read_text())
    except (OSError, ValueError):
        return None
    return meta.get("model_id") if isinstance(meta, dict) else None


def _demo_prepare(args: argparse.Namespace) -> int:
    from index.build import BuildOptions, build_index
    from model.env import cache_dir
    from model.training.corpus import convert_music21_corpus, corpus_midi_files, read_manifest
    from server.demo import FIXTURE_FOLDERS, is_fixture, read_pieces, without_fixtures

    corpus = cache_dir() / "corpus"
    out = args.index or demo_index_dir()
    print(f"demo: converting up to {args.limit} music21 works to MIDI (cached in {corpus})",
          file=sys.stderr)
    convert_music21_corpus(corpus, limit=args.limit, workers=args.workers)
    manifest = read_manifest(corpus)
    failed = sorted((k, f"{r.get('reason', '?')}: {r.get('error', '')}".rstrip(": "))
                    for k, r in manifest.items() if r.get("status") == "failed")
    print(f"demo: {len(manifest) - len(failed)} of {len(manifest)} music21 works converted"
          + (f"; {len(failed)} failed: " + ", ".join(f"{k} ({why})" for k, why in failed)
             if failed else ""), file=sys.stderr)
    files, fixtures = without_fixtures(corpus_midi_files(corpus, unique=True,
                                                         max_duration_s=600.0))
    if fixtures:
        names = ", ".join(f.name.removesuffix(".mid") for f in fixtures[:3])
        print(f"demo: leaving out {len(fixtures)} music21 test fixtures (the corpus's "
              f"{'/'.join(sorted(FIXTURE_FOLDERS))} folder: {names}"
              f"{', ...' if len(fixtures) > 3 else ''}): they are not music", file=sys.stderr)
    if not files:
        raise SystemExit(f"demo: no MIDI under {corpus / 'music21'}; see the messages above")
    rebuild = False
    if (out / "CURRENT").is_file():
        stale = [p for p in read_pieces(out) if is_fixture(p.path)]
        if stale:  # a build keeps the references it already has: only a rebuild drops them
            rebuild = True
            print(f"demo: {out} holds {len(stale)} test fixtures from an earlier prepare; "
                  "rebuilding it without them (every piece is encoded again)", file=sys.stderr)
        if not rebuild:  # the demo index is a cache: a new shipped model makes it stale
            from model.encoder import Encoder

            was, shipped = _indexed_model(out), Encoder.load().model_id
            if was != shipped:
                rebuild = True
                print(f"demo: {out} was indexed with the model {was or '(unknown)'}, the shipped "
                      f"model is {shipped}: rebuilding it (every piece is encoded again)",
                      file=sys.stderr)
    print(f"demo: indexing {len(files)} pieces into {out}", file=sys.stderr)
    report = build_index(out, files, BuildOptions(workers=args.workers, progress=True,
                                                  rebuild=rebuild))
    print(f"demo: {report['n_refs']} pieces in {out} ({report['encoded']} encoded now, "
          f"{report['reused']} unchanged; {len(fixtures)} test fixtures left out). "
          f"Next: midimatch serve --index {out}")
    return 0
