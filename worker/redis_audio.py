"""Reading a session's audio stream after a sequence number (``RedisBus.read_audio``).

Audio entry ids are ``{t_ms}-{seq + 1}`` (:mod:`worker.redis_keys`), so a chunk is found by its
``seq`` without a scan. :class:`AudioReader` remembers, per session, the entry id of the last
chunk it returned: a worker's next read continues from there with one ``XRANGE (id``. A reader
without that cursor (a gateway resuming, another process) pages back from the newest entry
(chunks are contiguous, so the ones after ``seq`` are the newest ``last seq - seq``).

Chunks trimmed before they were read (the reader fell more than the retained window behind)
are not silently skipped: the batch counts them in ``missing``.
"""

from __future__ import annotations

import redis.asyncio as aioredis

from worker.bus import AudioBatch, AudioChunk, BusError, missing_after

MAX_BACKWARD = 4096  # entries fetched newest-first to find a chunk without a cursor
MAX_CURSORS = 4096  # sessions whose read position one reader remembers


def seq_of(entry_id: bytes | str) -> int:
    """The chunk ``seq`` of an audio entry id (the end marker's is one past the last chunk)."""
    s = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
    return int(s.split("-")[1]) - 1


class AudioReader:
    """Reads audio streams; raises the raw ``RedisError`` (the bus maps it)."""

    def __init__(self, r: aioredis.Redis) -> None:
        self.r = r
        self._cursor: dict[str, tuple[int, bytes]] = {}  # session → (last seq read, entry id)

    def forget(self, session_id: str) -> None:
        """Drop the session's cursor (claimed anew, lost, released or finished)."""
        self._cursor.pop(session_id, None)

    async def read(self, session_id: str, meta_key: str, key: str, after_seq: int,
                   max_chunks: int) -> AudioBatch:
        """Chunks with ``seq > after_seq`` still retained (see ``Bus.read_audio``).

        Raises
        ------
        BusError
            ``unknown_session`` when ``meta_key`` is gone.
        """
        cur = self._cursor.get(session_id)
        hit = cur is not None and cur[0] == after_seq
        chunks: list[AudioChunk] = []
        ended, last_eid = False, b""
        async with self.r.pipeline(transaction=False) as p:  # one round trip when idle
            p.exists(meta_key)
            if hit:
                p.xrange(key, min=b"(" + cur[1], count=max_chunks + 1)
            elif after_seq < 0:
                p.xrange(key, min="-", count=max_chunks + 1)
            else:
                p.xrevrange(key, count=1)
            exists, page = await p.execute()
        if not exists:
            raise BusError(f"unknown session {session_id!r}", reason="unknown_session")
        if not hit and after_seq >= 0:
            page = await self._page_after(key, after_seq, page, max_chunks)
        while True:
            for eid, f in page:
                if b"e" in f:
                    ended = True
                    break
                seq = seq_of(eid)
                if seq > after_seq:
                    if len(chunks) == max_chunks:
                        break
                    chunks.append(AudioChunk(seq, float(f[b"t"]), bytes(f[b"p"])))
                    last_eid = eid
            if ended or len(chunks) >= max_chunks or len(page) <= max_chunks:
                break
            page = await self.r.xrange(key, min=b"(" + page[-1][0], count=max_chunks + 1)
        if chunks:
            self._remember(session_id, chunks[-1].seq, last_eid)
        return AudioBatch(chunks, ended, missing_after(after_seq, chunks))

    async def _page_after(self, key: str, after_seq: int, newest: list, max_chunks: int) -> list:
        """Entries from the first chunk after ``after_seq`` on, found from the newest entry."""
        if not newest:
            return []
        has_end = int(b"e" in newest[0][1])
        last_chunk = seq_of(newest[0][0]) - has_end  # the end marker takes the next seq
        n = last_chunk - after_seq + has_end  # entries after chunk ``after_seq``
        if last_chunk <= after_seq:
            return newest if has_end else []
        if n <= MAX_BACKWARD:
            return list(reversed(await self.r.xrevrange(key, count=n)))
        return await self.r.xrange(key, min="-", count=max(max_chunks + 1, MAX_BACKWARD))

    def _remember(self, session_id: str, seq: int, eid: bytes) -> None:
        self._cursor.pop(session_id, None)
        self._cursor[session_id] = (seq, eid)
        if len(self._cursor) > MAX_CURSORS:  # a gateway reads many sessions once: bound it
            del self._cursor[next(iter(self._cursor))]
