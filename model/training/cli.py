"""``midimatch data corpus|generate`` and ``midimatch train prepare|fit``.

The data commands rebuild the MIDI collections kept outside git; the train commands turn them into
aligned training pairs and train the shipped model.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("data", help="build the MIDI data kept in the cache (not in git)")
    dsub = p.add_subparsers(dest="data_command", metavar="ACTION", required=True)

    c = dsub.add_parser("corpus", help="convert the music21 corpus to MIDI (cached, resumable)")
    c.add_argument("--out", type=Path, help="cache folder (default: $MIDIMATCH_CACHE/corpus)")
    c.add_argument("--limit", type=int, metavar="END",
                   help="the end of the range of works, exclusive (with no --start: convert at "
                   "most END works; default: all)")
    c.add_argument("--start", type=int, default=0, metavar="N",
                   help="skip the first N works: a training-only folder beside the evaluation "
                   "one, N its --limit (`--out DIR --start 400 --limit 2000`; needs --out; see "
                   "`train prepare --exclude-corpus`)")
    c.add_argument("--workers", type=int, default=2)
    c.add_argument("--timeout", type=float, default=60.0, metavar="S", help="per work")
    c.add_argument("--retry-failed", action="store_true",
                   help="attempt the works the cache records as failed again (e.g. with a "
                   "larger --timeout on a busy machine)")
    c.set_defaults(func=_corpus)

    g = dsub.add_parser("generate", help="write procedurally generated pop-like songs")
    g.add_argument("-n", type=int, default=1000, help="number of songs (default 1000)")
    g.add_argument("--out", type=Path, help="cache folder (default: $MIDIMATCH_CACHE/corpus)")
    g.add_argument("--start-seed", type=int, default=0)
    g.add_argument("--workers", type=int, default=2)
    g.set_defaults(func=_generate)

    r = dsub.add_parser("renderers", help="the ways of making sound from MIDI: which are "
                        "installed, their family, their role (training / held out)")
    r.add_argument("--json", action="store_true", help="one JSON object per renderer")
    r.set_defaults(func=_renderers)

    t = sub.add_parser("train", help="prepare training pairs and train the model")
    tsub = t.add_subparsers(dest="train_command", metavar="ACTION", required=True)
    p = tsub.add_parser("prepare", help="render + augment the cached corpus into aligned pairs")
    p.add_argument("--corpus", type=Path, help="MIDI cache (default: $MIDIMATCH_CACHE/corpus)")
    p.add_argument("--out", type=Path, help="pairs folder (default: $MIDIMATCH_CACHE/train)")
    p.add_argument("--exclude-corpus", type=Path, metavar="DIR",
                   help="leave out works whose notes equal a work of DIR (default: the "
                   "evaluation corpus $MIDIMATCH_CACHE/corpus when --corpus is another folder)")
    p.add_argument("--works", type=int, metavar="N",
                   help="only the first N music21 works (`train run` uses 400; default: all)")
    p.add_argument("--generated", type=int, default=250,
                   help="generated songs to use beside the music21 works (default 250; from "
                        "seed 0 at most 250, see --generated-start)")
    p.add_argument("--generated-start", type=int, default=0, metavar="SEED",
                   help="first generated seed (default 0; seeds 250..9999 are evaluation's, "
                        "10000 on are training-only: `midimatch data generate --start-seed "
                        "10000 -n N` makes them)")
    p.add_argument("--max-piece-s", type=float, default=60.0, help="excerpt length cap")
    p.add_argument("--renders", type=int, default=2, help="renders per piece (default 2)")
    p.add_argument("--augment", default="train", metavar="PRESET",
                   help="augmentation preset of model.training.augment (default train; "
                        "train_noisy: a room and noise three times in four; timbre: that and "
                        "timbre randomised on purpose, model/training/timbre.py)")
    p.add_argument("--renderers", default="", metavar="A,B",
                   help="training renderers (default: the registry's TRAIN_RENDERERS; see "
                        "`midimatch data renderers`); a held-out one is refused")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_prepare)
    f = tsub.add_parser("fit", help="train hash and embedding nets; write the weights file")
    f.add_argument("--data", type=Path, nargs="+", metavar="DIR",
                   help="pairs folder(s), read together (default: $MIDIMATCH_CACHE/train)")
    f.add_argument("--out", type=Path, default=Path("model/weights/default.pt"),
                   help="weights file (default model/weights/default.pt, the shipped model)")
    f.add_argument("--bits", type=int, choices=(16, 32), default=32)
    f.add_argument("--hash-minutes", type=float, default=25.0)
    f.add_argument("--embed-minutes", type=float, default=25.0)
    f.add_argument("--seed", type=int, default=0)
    f.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda")
    f.add_argument("--threads", type=int, metavar="N", help="CPU threads (default: all cores)")
    f.add_argument("--init", type=Path, metavar="WEIGHTS",
                   help="start from this model; with --hash-minutes 0 only the embedding trains")
    f.add_argument("--embed-batch", type=int, metavar="N", help="embedding batch size (default 20)")
    f.add_argument("--embed-nce", type=float, default=0.0, metavar="W",
                   help="weight of the in-batch InfoNCE term in the embedding loss (default 0)")
    f.add_argument("--embed-tau", type=float, default=1.0, metavar="T",
                   help="its temperature (default 1)")
    f.add_argument("--embed-select", default="bc", metavar="FIGURE",
                   help="keep the embedding with the best validation bc (default) or "
                        "recall@1/3/5/10 (pieces ranked as the prune ranks them)")
    f.set_defaults(func=_fit)
    s = tsub.add_parser("soup", help="the element-wise mean of fine-tunes of one model "
                        "(model/training/soup.py)")
    s.add_argument("weights", nargs="+", type=Path, help="two or more weights files")
    s.add_argument("--out", type=Path, required=True, help="the averaged model's weights file")
    s.set_defaults(func=_soup)
    r = tsub.add_parser("run", help="the shipped model in one command: data, pairs and training "
                        "within --minutes (each step cached; a rerun resumes)")
    r.add_argument("--minutes", type=float, default=60.0,
                   help="wall-clock budget of the whole run, data steps included (default 60)")
    r.add_argument("--works", type=int, default=400,
                   help="music21 works, the first of the fixed list (default 400)")
    r.add_argument("--generated", type=int, default=250,
                   help="generated songs, seeds 0.. (default 250, at most 250: later seeds are "
                        "evaluation's)")
    r.add_argument("--renders", type=int, default=2, help="renders per piece (default 2)")
    r.add_argument("--max-piece-s", type=float, default=60.0, help="excerpt length cap")
    r.add_argument("--hash-share", type=float, default=0.45,
                   help="the hash stage's share of the training time (default 0.45)")
    r.add_argument("--out", type=Path, default=Path("model/weights/default.pt"),
                   help="weights file (default model/weights/default.pt, the shipped model)")
    r.add_argument("--bits", type=int, choices=(16, 32), default=32)
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda")
    r.add_argument("--workers", type=int, default=2)
    r.set_defaults(func=_run)


def _default_out(args: argparse.Namespace) -> Path:
    from model.env import cache_dir

    return args.out or cache_dir() / "corpus"


def _renderers(args: argparse.Namespace) -> int:
    import json

    from model.training.render import RENDERERS, available, role

    for name, r in RENDERERS.items():
        row = {"name": name, "installed": available(name), "role": role(name),
               "family": r.family, "engine": r.engine,
               "packages": r.package, "description": r.description}
        if args.json:
            print(json.dumps(row))
        else:
            mark = "yes" if row["installed"] else "no "
            print(f"{name:22} {mark} {row['role']:8} {row['family']:12} {r.description}"
                  + ("" if row["installed"] or not r.package
                     else f"  (apt-get install {r.package})"))
    return 0


def _corpus(args: argparse.Namespace) -> int:
    from model.training.corpus import convert_music21_corpus

    if args.start and _default_out(args).resolve() == _cache("corpus").resolve():
        raise SystemExit("midimatch data corpus: --start writes a training-only folder; name it "
                         "with --out (the cache's corpus is the evaluation's, which indexes "
                         "every work it holds)")

    report = convert_music21_corpus(_default_out(args), limit=args.limit, start=args.start,
                                    workers=args.workers,
                                    timeout_s=args.timeout, retry_failed=args.retry_failed)
    print(json.dumps(report, indent=2, default=str))
    return 0


def _generate(args: argparse.Namespace) -> int:
    from model.training.songgen_files import generate_songs

    paths = generate_songs(_default_out(args), args.n, start_seed=args.start_seed,
                           workers=args.workers)
    print(f"{len(paths)} songs under {_default_out(args) / 'generated'}")
    return 0


def _cache(sub: str) -> Path:
    from model.env import cache_dir

    return cache_dir() / sub


def _prepare(args: argparse.Namespace) -> int:
    from model.training.corpus import MANIFEST_NAME, SUBDIR
    from model.training.data import prepare
    from model.training.data_pieces import count_generated, drop_pieces_of, training_files
    from model.training.render import role

    renderers = [x for x in args.renderers.split(",") if x] or None
    held = sorted(r for r in set(renderers or ()) if role(r) == "held-out")
    if held:  # the held-out families are what the model is judged on: never in training
        raise SystemExit(f"midimatch train prepare: {held} are held out of training "
                         "(model/training/render.py HELD_OUT_RENDERERS)")
    corpus = args.corpus or _cache("corpus")
    files = training_files(corpus, works=args.works, generated=args.generated,
                           generated_start=args.generated_start)
    other = args.exclude_corpus
    default_corpus = _cache("corpus")
    if other is None and Path(corpus).resolve() != default_corpus.resolve():
        # the evaluation corpus, when there is one (a wrong explicit folder is refused instead)
        if (default_corpus / SUBDIR / MANIFEST_NAME).is_file():
            other = default_corpus
    if other is not None:
        files, dropped = drop_pieces_of(files, corpus, other)
        print(f"{dropped} work{'' if dropped == 1 else 's'} of {corpus} left out: the same "
              f"notes as a work of {other}", file=sys.stderr)
    found = count_generated(files, corpus)
    if found < args.generated:  # a run would silently train on fewer pieces
        raise SystemExit(
            f"midimatch train prepare: {found} of the {args.generated} generated songs from seed "
            f"{args.generated_start} are under {corpus}: run `midimatch data generate "
            f"--start-seed {args.generated_start} -n {args.generated}` first")
    if not files:
        raise SystemExit(f"no MIDI under {corpus}: run `midimatch data corpus` and "
                         "`midimatch data generate` first")
    report = prepare(args.out or _cache("train"), files, renders_per_piece=args.renders,
                     max_piece_s=args.max_piece_s, workers=args.workers, seed=args.seed,
                     augment_preset=args.augment, renderers=renderers)
    print(json.dumps(report, indent=2, default=str))
    return 0


def _soup(args: argparse.Namespace) -> int:
    from model.training.soup import average_weights

    model_id = average_weights(args.weights).save(args.out)
    print(f"{args.out}: {model_id}, the mean of {', '.join(map(str, args.weights))}")
    return 0


def _run(args: argparse.Namespace) -> int:
    from model.training.train_run import train_run

    ckpt = _cache("train") / f"{args.out.stem}.ckpt"
    train_run(_cache("corpus"), _cache("train"), args.out, ckpt, minutes=args.minutes,
              works=args.works, generated=args.generated,
              renders=args.renders, max_piece_s=args.max_piece_s, hash_share=args.hash_share,
              bits=args.bits, seed=args.seed, device=args.device, workers=args.workers)
    return 0


def _fit(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from model.nets import NetConfig
    from model.training.train import embed_params, train

    ep = replace(embed_params(), nce=args.embed_nce, tau=args.embed_tau,
                 select=args.embed_select)
    if args.embed_batch is not None:
        ep = replace(ep, batch_size=args.embed_batch)
    # a fine-tune keeps the init's network sizes (train takes them from it; --bits is for a
    # model trained from scratch)
    config = None if args.init else NetConfig(n_bits=args.bits)
    report = train(args.data or _cache("train"), args.out, config=config,
                   hash_minutes=args.hash_minutes, embed_minutes=args.embed_minutes,
                   seed=args.seed, device=args.device, embed_stage=ep, init=args.init,
                   num_threads=args.threads,
                   # the resumable checkpoint is big and is not shipped: keep it in the cache;
                   # a fine-tune has its own, so that it never meets `train run`'s checkpoint of
                   # the same weights file (a different setup, which refuses to resume)
                   checkpoint_path=_cache("train") / (f"{args.out.stem}.finetune.ckpt"
                                                      if args.init else f"{args.out.stem}.ckpt"))
    print(json.dumps({k: v for k, v in report.items() if k not in ("hash", "embed")}, indent=2,
                     default=str))
    return 0
