"""Runs a MIDI synthesis *library* (libWildMidi, libsonivox) in a process of its own.

Run as a script (``python render_libs_host.py ENGINE ...``, by
:mod:`model.training.render_libs` through :func:`model.synth.run_bounded_render`), never
imported for its work: a C library called through ctypes cannot be interrupted, and one that
crashes takes its process with it. In a child process the parent's time and size bounds hold
(it is killed), and a segfault is a failed render, not a dead worker. Standard library only, so
that it starts fast.

Output: headerless interleaved int16 little-endian at the library's rate and channel count,
written as it is rendered (readable when killed mid-write), to the path given.

    render_libs_host.py wildmidi CONFIG RATE IN.mid OUT.raw   # stereo, RATE Hz
    render_libs_host.py sonivox IN.mid OUT.raw                # the library's own rate, channels
"""

from __future__ import annotations

import ctypes
import sys
from pathlib import Path

WILDMIDI_SONAME = "libWildMidi.so.2"
SONIVOX_SONAME = "libsonivox.so.3"
_CHUNK = 16384  # bytes per WildMidi_GetOutput call (4096 stereo frames)


class SonivoxConfig(ctypes.Structure):
    """``S_EAS_LIB_CONFIG`` of <sonivox/eas.h> (EAS_I32 and EAS_U32 are C ``long``)."""

    _fields_ = [("libVersion", ctypes.c_ulong), ("checkedVersion", ctypes.c_uint),
                ("maxVoices", ctypes.c_long), ("numChannels", ctypes.c_long),
                ("sampleRate", ctypes.c_long), ("mixBufferSize", ctypes.c_long),
                ("filterEnabled", ctypes.c_uint), ("buildTimeStamp", ctypes.c_ulong),
                ("buildGUID", ctypes.c_char_p)]


_READ_AT = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int,
                            ctypes.c_int)
_SIZE = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p)


class _EasFile(ctypes.Structure):
    """``EAS_FILE`` of <sonivox/eas_types.h> (sonivox ≥ 3.6: reads through callbacks)."""

    _fields_ = [("handle", ctypes.c_void_p), ("readAt", _READ_AT), ("size", _SIZE)]


def sonivox_config(lib: ctypes.CDLL | None = None) -> SonivoxConfig:
    """The library's build configuration: rate, channels, mix buffer (a static struct)."""
    lib = lib or ctypes.CDLL(SONIVOX_SONAME)
    lib.EAS_Config.restype = ctypes.POINTER(SonivoxConfig)
    return lib.EAS_Config().contents


def wildmidi(config: str, rate: int, midi: str, out: str) -> None:
    lib = ctypes.CDLL(WILDMIDI_SONAME)
    lib.WildMidi_Init.argtypes = [ctypes.c_char_p, ctypes.c_uint16, ctypes.c_uint16]
    lib.WildMidi_Open.restype = ctypes.c_void_p
    lib.WildMidi_Open.argtypes = [ctypes.c_char_p]
    lib.WildMidi_GetOutput.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_uint32]
    lib.WildMidi_Close.argtypes = [ctypes.c_void_p]
    lib.WildMidi_GetError.restype = ctypes.c_char_p
    # mixer options 0: linear volume, no reverb, no loop, the silence before the first note kept
    if lib.WildMidi_Init(config.encode(), rate, 0) != 0:
        raise SystemExit(f"WildMidi_Init({config}, {rate}): {lib.WildMidi_GetError()!r}")
    handle = lib.WildMidi_Open(midi.encode())
    if not handle:
        raise SystemExit(f"WildMidi_Open({midi}): {lib.WildMidi_GetError()!r}")
    buf = ctypes.create_string_buffer(_CHUNK)
    with open(out, "wb", buffering=0) as f:
        while (got := lib.WildMidi_GetOutput(handle, buf, _CHUNK)) > 0:
            f.write(buf.raw[:got])
    if got < 0:
        raise SystemExit(f"WildMidi_GetOutput: {lib.WildMidi_GetError()!r}")
    lib.WildMidi_Close(handle)
    lib.WildMidi_Shutdown()


def sonivox(midi: str, out: str) -> None:
    lib = ctypes.CDLL(SONIVOX_SONAME)
    cfg = sonivox_config(lib)
    for fn in ("EAS_Init", "EAS_OpenFile", "EAS_Prepare", "EAS_Render", "EAS_State",
               "EAS_CloseFile", "EAS_Shutdown"):
        getattr(lib, fn).restype = ctypes.c_long
    ptr, long_p = ctypes.c_void_p, ctypes.POINTER(ctypes.c_long)
    lib.EAS_Init.argtypes = [ctypes.POINTER(ptr)]
    lib.EAS_OpenFile.argtypes = [ptr, ctypes.POINTER(_EasFile), ctypes.POINTER(ptr)]
    lib.EAS_Prepare.argtypes = [ptr, ptr]
    lib.EAS_Render.argtypes = [ptr, ptr, ctypes.c_long, long_p]
    lib.EAS_State.argtypes = [ptr, ptr, long_p]
    lib.EAS_CloseFile.argtypes = [ptr, ptr]
    lib.EAS_Shutdown.argtypes = [ptr]
    data = Path(midi).read_bytes()

    @_READ_AT
    def read_at(_handle: int, dst: int, offset: int, size: int) -> int:
        chunk = data[offset: offset + size]
        ctypes.memmove(dst, chunk, len(chunk))
        return len(chunk)

    @_SIZE
    def size(_handle: int) -> int:
        return len(data)

    # the handle is only passed back to the callbacks, but EAS refuses a NULL one
    locator = _EasFile(ctypes.c_void_p(1), read_at, size)
    eas, stream = ptr(), ptr()
    if (err := lib.EAS_Init(ctypes.byref(eas))) != 0:
        raise SystemExit(f"EAS_Init: error {err}")
    try:
        if (err := lib.EAS_OpenFile(eas, ctypes.byref(locator), ctypes.byref(stream))) != 0:
            raise SystemExit(f"EAS_OpenFile({midi}): error {err} (not a MIDI file?)")
        if (err := lib.EAS_Prepare(eas, stream)) != 0:
            raise SystemExit(f"EAS_Prepare: error {err}")
        frame_bytes = 2 * cfg.numChannels
        buf = (ctypes.c_short * (cfg.mixBufferSize * cfg.numChannels))()
        got, state = ctypes.c_long(0), ctypes.c_long(0)
        with open(out, "wb", buffering=0) as f:
            while state.value not in (4, 7):  # EAS_STATE_STOPPED, EAS_STATE_ERROR
                if (err := lib.EAS_Render(eas, buf, cfg.mixBufferSize, ctypes.byref(got))) != 0:
                    raise SystemExit(f"EAS_Render: error {err}")
                f.write(ctypes.string_at(buf, got.value * frame_bytes))
                lib.EAS_State(eas, stream, ctypes.byref(state))
        if state.value == 7:
            raise SystemExit("EAS stream ended in its error state")
        lib.EAS_CloseFile(eas, stream)
    finally:
        lib.EAS_Shutdown(eas)


def main(argv: list[str]) -> None:
    if argv[:1] == ["wildmidi"] and len(argv) == 5:
        wildmidi(argv[1], int(argv[2]), argv[3], argv[4])
    elif argv[:1] == ["sonivox"] and len(argv) == 3:
        sonivox(argv[1], argv[2])
    else:
        raise SystemExit(__doc__)


if __name__ == "__main__":
    main(sys.argv[1:])
