"""Caches of per-weight layouts the CPU paths derive from packed indices, keyed by the packed
tensor's identity and valid while it lives unmodified: IndexCache (general, thread-safe, counts
hits) and PlanCache (the decode selector's one-dict-lookup cache)."""
from __future__ import annotations

import threading
import weakref

import torch


class IndexCache:
    """Unpacked index layouts per packed tensor, reused across calls (CPU path).

    Unpacking a bit stream costs far more than the LUT GEMV it feeds, so the CPU path keeps the
    int64 layouts it needs, keyed by the packed tensor's identity. An entry is valid only while
    that very tensor is alive (weak reference) and its version counter is unchanged (an in-place
    write invalidates it). Memory: 8 bytes per stored index (1 byte/weight at d = 8), released
    with the packed tensor. `clear()` drops everything; `enabled = False` turns caching off.
    """

    def __init__(self, max_entries: int = 4096):
        self.enabled = True
        self.max_entries = max_entries
        self.hits = 0
        self.misses = 0
        self._entries: dict = {}
        self._lock = threading.Lock()

    @staticmethod
    def _version(t: torch.Tensor):
        try:
            return t._version
        except RuntimeError:  # inference tensors carry no version counter
            return None

    def get(self, packed: torch.Tensor, key: tuple, build):
        """Return build() for (packed, key), cached while packed is alive and unmodified."""
        if not self.enabled or packed.device.type != "cpu":
            return build()
        full_key = (id(packed), key)
        version = self._version(packed)
        with self._lock:
            entry = self._entries.get(full_key)
            if entry is not None and entry[0]() is packed and entry[1] == version:
                self.hits += 1
                return entry[2]
        value = build()
        self.misses += 1
        pid = id(packed)

        def _drop(_ref, pid=pid, cache_ref=weakref.ref(self)):
            cache = cache_ref()
            if cache is not None:
                with cache._lock:
                    for k in [k for k in cache._entries if k[0] == pid]:
                        if cache._entries[k][0] is _ref:
                            del cache._entries[k]

        with self._lock:
            if len(self._entries) >= self.max_entries:
                self._entries.pop(next(iter(self._entries)))
            self._entries[full_key] = (weakref.ref(packed, _drop), version, value)
        return value

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()


class PlanCache:
    """Per packed tensor, the small-M path's decision (and LUT layout): one dict lookup per call.

    IndexCache's general get() costs several microseconds a call (lock, key tuple, callbacks),
    which the decode loop pays 211 times a token; this keeps only what the hot path needs. An
    entry is valid while that very tensor lives (weak reference, removed with it), its version
    counter is unchanged and the format key matches."""

    def __init__(self):
        self._entries: dict = {}

    def get(self, packed: torch.Tensor, key: tuple, build):
        pid = id(packed)
        e = self._entries.get(pid)
        try:
            version = packed._version
        except RuntimeError:  # inference tensors carry no version counter
            version = None
        if e is not None and e[0]() is packed and e[1] == version and e[2] == key:
            return e[3]
        value = build()

        def _drop(ref, pid=pid, entries=self._entries):
            cur = entries.get(pid)
            if cur is not None and cur[0] is ref:
                del entries[pid]

        self._entries[pid] = (weakref.ref(packed, _drop), version, key, value)
        return value

    def clear(self) -> None:
        self._entries.clear()
