"""The song generator's musical vocabulary: scales, progressions, rhythm cells, drum patterns and
the seven styles that pick among them.

Kept apart from the code that uses them so that a new style or pattern is a table edit, read in
one place. The composer (:mod:`model.training.songgen_composer`) draws from these tables with
the song's seed, so any change here changes the music of existing seeds: bump
:data:`model.training.songgen.GENERATOR_VERSION` with it, or caches of generated songs would
hold other music under the same names.
"""

from __future__ import annotations

from dataclasses import dataclass

SCALES = {
    "major": (0, 2, 4, 5, 7, 9, 11),
    "minor": (0, 2, 3, 5, 7, 8, 10),
    "dorian": (0, 2, 3, 5, 7, 9, 10),
    "mixolydian": (0, 2, 4, 5, 7, 9, 10),
}
# Scale degrees, 0-based: (0, 4, 5, 3) is I–V–vi–IV in major.
MAJOR_PROGRESSIONS = (
    (0, 4, 5, 3), (5, 3, 0, 4), (0, 5, 3, 4), (0, 3, 4, 3), (0, 3, 0, 4),
    (1, 4, 0, 0), (0, 2, 3, 4), (3, 4, 2, 5), (0, 4, 3, 3), (0, 1, 3, 4),
)  # fmt: skip
MINOR_PROGRESSIONS = (
    (0, 5, 2, 6), (0, 3, 4, 0), (0, 6, 5, 6), (0, 3, 6, 2), (0, 5, 3, 4),
    (5, 6, 0, 0), (0, 2, 5, 4), (0, 3, 0, 6),
)  # fmt: skip
# Melody rhythm cells, (onset, duration) in beats, per beats-per-bar.
CELLS = {
    4: (
        ((0, 1), (1, 1), (2, 1), (3, 1)),
        ((0, 1.5), (1.5, 0.5), (2, 2)),
        ((0, 0.5), (0.5, 0.5), (1, 1), (2, 0.5), (2.5, 0.5), (3, 1)),
        ((0, 2), (2, 1), (3, 1)),
        ((0.5, 0.5), (1, 0.5), (1.5, 1), (2.5, 0.5), (3, 1)),
        ((0, 0.75), (0.75, 0.75), (1.5, 1), (2.5, 1.5)),
        ((0, 1), (1, 0.5), (1.5, 0.5), (2, 1.5)),
        ((0, 3),),
    ),
    3: (
        ((0, 1), (1, 1), (2, 1)),
        ((0, 2), (2, 1)),
        ((0, 1.5), (1.5, 0.5), (2, 1)),
        ((0, 0.5), (0.5, 0.5), (1, 1), (2, 1)),
        ((0, 2.5),),
    ),
}
CHORD_RHYTHMS = {  # (onset, duration) in beats within a bar; "arp*" are generated
    "block_whole": ((0, 4),),
    "block_half": ((0, 2), (2, 2)),
    "quarters": ((0, 0.9), (1, 0.9), (2, 0.9), (3, 0.9)),
    "eighths": tuple((i / 2, 0.45) for i in range(8)),
    "pop_sync": ((0, 1.5), (1.5, 1.5), (3, 1)),
    "stabs": ((0.5, 0.25), (1.75, 0.25), (2.5, 0.25), (3.5, 0.25)),
    "waltz": ((1, 0.9), (2, 0.9)),
}
BASS_RHYTHMS = {  # (onset, duration, tone): R root, 5 fifth, O octave, W walking step
    "root_whole": ((0, 4, "R"),),
    "root_fifth": ((0, 2, "R"), (2, 2, "5")),
    "root_8ths": tuple((i / 2, 0.45, "R") for i in range(8)),
    "octaves": tuple((i / 2, 0.4, "RO"[i % 2]) for i in range(8)),
    "syncop": ((0, 0.75, "R"), (0.75, 0.5, "R"), (1.5, 0.5, "5"), (2.5, 0.5, "R"), (3, 1, "O")),
    "walking": ((0, 0.9, "R"), (1, 0.9, "W"), (2, 0.9, "5"), (3, 0.9, "W")),
}
# GM percussion keys.
KICK, RIM, SNARE, CLAP, HAT, PEDAL_HAT, OPEN_HAT, CRASH, RIDE = 36, 37, 38, 39, 42, 44, 46, 49, 51
TOMS = (50, 48, 47, 45, 43, 41)
DRUMS = {  # (onset, key, velocity) per 4/4 bar; 3/4 bars use "waltz"
    "rock": ((0, KICK, 100), (1, SNARE, 95), (2, KICK, 95), (2.5, KICK, 70), (3, SNARE, 95))
    + tuple((i / 2, HAT, 70 if i % 2 else 80) for i in range(8)),
    "pop4": tuple((b, KICK, 100) for b in range(4))
    + ((1, CLAP, 90), (3, CLAP, 90))
    + tuple((b + 0.5, OPEN_HAT, 70) for b in range(4)),
    "halftime": ((0, KICK, 100), (1.5, KICK, 80), (2, SNARE, 100))
    + tuple((i / 2, HAT, 65) for i in range(8)),
    "hiphop": ((0, KICK, 105), (0.75, KICK, 80), (2.5, KICK, 90), (1, SNARE, 100), (3, SNARE, 100))
    + tuple((i / 4, HAT, 75 if i % 2 == 0 else 50) for i in range(16)),
    "ballad": ((0, KICK, 80), (2.5, KICK, 70), (1, RIM, 70), (3, RIM, 70))
    + tuple((i / 2, HAT, 50) for i in range(8)),
    "swing": ((0, RIDE, 75), (1, RIDE, 80), (1.5, RIDE, 60), (2, RIDE, 75), (3, RIDE, 80))
    + ((3.5, RIDE, 60), (1, PEDAL_HAT, 60), (3, PEDAL_HAT, 60), (0, KICK, 55)),
    "film": ((0, KICK, 85), (2, 41, 70), (3, 43, 75), (3.5, 43, 65)),
    "waltz": (
        (0, KICK, 95),
        (1, SNARE, 70),
        (2, SNARE, 70),
        (0, HAT, 70),
        (1, HAT, 55),
        (2, HAT, 55),
    ),
}


@dataclass(frozen=True)
class Style:
    tempo: tuple[float, float]
    meters: tuple[int, ...]
    modes: tuple[str, ...]
    chords: tuple[int, ...]  # GM programs, 0-based
    leads: tuple[int, ...]
    basses: tuple[int, ...]
    pads: tuple[int, ...]
    chord_rhythms: tuple[str, ...]
    bass_rhythms: tuple[str, ...]
    drums: tuple[str, ...]
    swing_p: float
    weight: int


STYLES = {
    "pop": Style((90, 130), (4,), ("major", "major", "minor"), (0, 1, 4, 5, 24, 25),
                 (73, 65, 56, 80, 11, 54), (33, 34, 38), (48, 49, 50, 89, 88),
                 ("block_half", "pop_sync", "arp8", "quarters"), ("root_8ths", "root_fifth",
                 "syncop"), ("pop4", "rock", "halftime"), 0.1, 4),
    "rock": Style((100, 160), (4,), ("major", "mixolydian", "minor"), (29, 30, 27, 25),
                  (29, 30, 81, 65), (33, 34), (48, 16, 17, 18), ("block_whole", "quarters",
                  "eighths"), ("root_8ths", "root_fifth"), ("rock",), 0.05, 3),
    "ballad": Style((70, 95), (4, 4, 3), ("major", "minor"), (0, 4, 24, 46), (73, 40, 71, 68, 52),
                    (32, 33, 35), (48, 49, 89, 91), ("arp8", "block_whole", "arp16"),
                    ("root_whole", "root_fifth"), ("ballad",), 0.1, 3),
    "funk": Style((95, 120), (4,), ("dorian", "minor", "mixolydian"), (7, 27, 4, 16),
                  (61, 65, 66, 56, 81), (36, 37, 33, 38), (61, 62, 50), ("stabs", "pop_sync"),
                  ("syncop", "octaves"), ("hiphop", "pop4"), 0.4, 2),
    "game": Style((120, 160), (4,), ("major", "minor", "dorian"), (80, 81, 4, 16),
                  (80, 81, 83, 87), (38, 39, 80), (88, 89, 90, 94), ("arp16", "arp8", "quarters"),
                  ("octaves", "root_8ths"), ("rock", "pop4"), 0.05, 3),
    "film": Style((70, 110), (4, 3), ("minor", "minor", "major"), (48, 49, 46, 0),
                  (60, 56, 40, 73, 71), (42, 43, 32), (48, 49, 52, 89), ("block_whole", "arp8",
                  "block_half"), ("root_whole", "root_fifth"), ("film",), 0.0, 2),
    "jazz": Style((80, 150), (4,), ("major", "dorian"), (0, 4, 26), (65, 66, 56, 11), (32,),
                  (48, 89), ("pop_sync", "stabs"), ("walking",), ("swing",), 0.9, 1),
}  # fmt: skip
