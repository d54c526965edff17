"""Live model swap: the served model is one reference, replaced whole.

A :class:`ModelSlot` holds the :class:`Served` snapshot (a loaded :class:`Ranker` and its
version). A request reads ``slot.current`` once and uses only that snapshot, so it is
scored by one model from start to end, whatever happens meanwhile. A swap loads the new
run in a thread (the event loop keeps answering with the old model), checks that it
accepts the same requests, then replaces the reference in one assignment; the old model
is freed when its last request is done. Nothing fails during a swap: requests are never
refused or queued because of it.

**Several worker processes**: a swap requested from one worker is published to the
others through a small state file (``state.json``: the run, checkpoint and version,
written atomically under an ``flock``). Every worker polls it (a ``stat`` every
``poll_s``) and swaps itself the same way when the version moves; a worker that starts
(or is restarted by uvicorn) loads the run named there. Each worker switches atomically;
for up to ``poll_s`` plus a load time two workers may serve different versions, and
every response says which version answered it.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from dinrec.errors import DinrecError

log = logging.getLogger(__name__)

STATE_FILE = "state.json"


@dataclass(frozen=True)
class ModelSpec:
    """What to serve: a run folder, its checkpoint and optionally an ONNX export of it."""

    run: str
    which: str = "best"
    onnx: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Served:
    """One loaded model and its version; never modified, only replaced."""

    ranker: Any  # dinrec.serve.ranker.Ranker (or anything with the same methods)
    spec: ModelSpec
    version: int
    loaded_at: float  # time.time()

    def describe(self) -> dict[str, Any]:
        return {"version": self.version, "model": self.ranker.model_name,
                "backend": self.ranker.backend.name, **self.spec.to_dict(),
                "loaded_at": round(self.loaded_at, 3)}


class SwapError(DinrecError):
    """A swap that was refused; ``status`` is the HTTP status to answer with."""

    def __init__(self, message: str, status: int = 422) -> None:
        super().__init__(message)
        self.status = status


def request_signature(ranker: Any) -> Any:
    """What decides the shape of requests a ranker accepts (its request schema)."""
    sig = getattr(ranker, "request_signature", None)
    return sig() if callable(sig) else sig


class SharedState:
    """The served model's spec and version in ``folder/state.json``, shared by the workers."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        self.path = self.folder / STATE_FILE
        self._seen_mtime: int | None = None

    @contextlib.contextmanager
    def _locked(self):
        self.folder.mkdir(parents=True, exist_ok=True)
        with open(self.folder / "state.lock", "a+") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    def read(self) -> tuple[ModelSpec, int] | None:
        try:
            d = json.loads(self.path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, json.JSONDecodeError) as exc:
            raise DinrecError(f"{self.path}: unreadable swap state: {exc}") from None
        return ModelSpec(d["run"], d.get("which", "best"), d.get("onnx")), int(d["version"])

    def changed(self) -> bool:
        """Whether the file changed since the last call (one ``stat``)."""
        try:
            mtime = self.path.stat().st_mtime_ns
        except FileNotFoundError:
            return False
        seen, self._seen_mtime = self._seen_mtime, mtime
        return mtime != seen

    def publish(self, spec: ModelSpec, version: int | None = None, after: int = 0) -> int:
        """Write ``spec`` with the next version, above the file's and ``after`` (or with
        ``version``); returns the version written."""
        with self._locked():
            now = self.read()
            if version is None:
                version = max(now[1] if now else 0, after) + 1
            tmp = self.path.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps({**spec.to_dict(), "version": version}))
            tmp.replace(self.path)
        return version


Loader = Callable[[ModelSpec], Any]


class ModelSlot:
    """The served model (``current``), swapped whole; see the module docstring."""

    def __init__(self, served: Served, loader: Loader, state: SharedState | None = None,
                 on_swap: Callable[[Served], None] | None = None,
                 on_refused: Callable[[SwapError], None] | None = None) -> None:
        self.current = served
        self.loader = loader
        self.state = state
        self.on_swap = on_swap
        self.on_refused = on_refused
        self._lock = asyncio.Lock()
        self._failed_version: int | None = None

    async def _load(self, spec: ModelSpec) -> Any:
        try:
            try:
                ranker = await asyncio.to_thread(self.loader, spec)
            except DinrecError as exc:
                raise SwapError(f"{spec.run}: cannot serve it: {exc}") from None
            want, got = request_signature(self.current.ranker), request_signature(ranker)
            if want != got:
                raise SwapError(f"{spec.run}: its requests differ from the served model's "
                                "(another schema); start a new service for it", status=409)
        except SwapError as exc:
            if self.on_refused is not None:
                self.on_refused(exc)
            raise
        return ranker

    def _install(self, ranker: Any, spec: ModelSpec, version: int) -> Served:
        served = Served(ranker, spec, version, time.time())
        previous, self.current = self.current, served  # the swap: one reference assignment
        log.info("model swap: version %d (%s) -> %d (%s)", previous.version, previous.spec.run,
                 version, spec.run)
        if self.on_swap is not None:
            self.on_swap(served)
        return served

    async def swap(self, spec: ModelSpec) -> Served:
        """Load ``spec`` and serve it (and publish it to the other workers)."""
        async with self._lock:
            ranker = await self._load(spec)
            if self.state is not None:
                version = self.state.publish(spec, after=self.current.version)
            else:
                version = self.current.version + 1
            return self._install(ranker, spec, version)

    async def follow(self) -> bool:
        """Swap to the shared state's model if its version moved; True when it swapped."""
        if self.state is None or not self.state.changed():
            return False
        async with self._lock:
            now = self.state.read()
            if now is None:
                return False
            spec, version = now
            if version <= self.current.version or version == self._failed_version:
                return False
            try:
                ranker = await self._load(spec)
            except SwapError as exc:
                self._failed_version = version
                log.error("model swap to version %d refused in worker %d: %s", version, os.getpid(), exc)
                return False
            self._install(ranker, spec, version)
            return True

    async def watch(self, poll_s: float = 0.5) -> None:
        """Follow the shared state until cancelled."""
        while True:
            try:
                await self.follow()
            except Exception:  # keep watching whatever one check did
                log.exception("model swap: following the shared state failed")
            await asyncio.sleep(poll_s)
