"""How one version load runs, and when a failed one is tried again.

The registry decides *what* to load; this module runs each load on a daemon thread of its
own, awaits it for at most `timeout_s`, and turns whatever it raised into a failure with a
reason from the fixed set (`service.model.REASONS`):

- permanent (the files are wrong): not tried again until the files' signature changes;
- transient (EIO, ESTALE, files that changed while being read, a read still blocked after
  `timeout_s`, MemoryError): tried again at the first scan after an exponential backoff
  (`retry_initial_s` doubling up to `retry_max_s`, never given up), as TF Serving retries
  loads.

A load that outlives its timeout keeps its thread ("in flight"): later scans neither wait
for it again nor start a second read of the same version, and take its result when it
finally arrives. A thread per load rather than the default executor: a read stuck in the
kernel (a hung network mount) must neither hold a pool worker nor block interpreter exit.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from service.model import (
    REASONS,
    TRANSIENT_REASONS,
    Model,
    ModelFormatError,
    TransientLoadError,
)
from service.registry.events import RegistryEvent, VersionFailed
from service.storage import repository
from service.storage.repository import Signature

log = logging.getLogger("service.registry")

Key = tuple[str, int]
# loader(repository root, version directory) -> a validated Model, or raises.
Loader = Callable[[Path, Path], Model]


@dataclass(frozen=True, slots=True)
class Failure:
    """A failed load. A permanent one waits for new files; a transient one for `retry_at`."""

    signature: Signature
    reason: str
    detail: str
    attempts: int = 1
    retry_at: float = 0.0

    @property
    def transient(self) -> bool:
        return self.reason in TRANSIENT_REASONS


@dataclass(slots=True)
class _Flight:
    signature: Signature
    future: asyncio.Future[Model]


@dataclass(frozen=True, slots=True)
class LoadPolicy:
    """How long one read may take before the scan stops waiting for it, and how failed
    transient loads back off (`retry_initial_s` doubling up to `retry_max_s`)."""

    timeout_s: float = 60.0
    retry_initial_s: float = 1.0
    retry_max_s: float = 60.0


DEFAULT_LOAD_POLICY = LoadPolicy()


class Loads:
    """Load attempts and their failures, keyed by (model, version). Event-loop owned.

    A failure is published as a `VersionFailed` event (metrics count it from there).
    """

    def __init__(
        self,
        root: Path,
        publish: Callable[[RegistryEvent], None],
        loader: Loader = repository.load_inside,
        *,
        policy: LoadPolicy = DEFAULT_LOAD_POLICY,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._root = root
        self._publish = publish
        self._loader = loader
        self._policy = policy
        self._clock = clock
        self.failed: dict[Key, Failure] = {}
        self.loading: set[Key] = set()
        self._flights: dict[Key, _Flight] = {}

    def due(self, key: Key, sig: Signature) -> bool:
        """Whether a load of these files should be tried now (False: wait for new files, or
        for the backoff of a transient failure to pass)."""
        failed = self.failed.get(key)
        return (
            failed is None
            or failed.signature != sig
            or (failed.transient and self._clock() >= failed.retry_at)
        )

    def forget(self, present: Callable[[Key], bool]) -> None:
        """Drop failures (and finished flights) of versions no longer on disk: a directory
        published again under that number is new."""
        for key in [k for k in self.failed if not present(k)]:
            del self.failed[key]
        for key in [k for k, f in self._flights.items() if f.future.done() and not present(k)]:
            del self._flights[key]

    async def load(self, key: Key, path: Path, sig: Signature) -> Model | None:
        """Load one version; None when it failed (recorded, logged and counted here)."""
        flight = self._flights.get(key)
        if flight is not None and not flight.future.done():
            # Still blocked since an earlier scan: neither wait again nor start a second
            # read of the same version; the failure recorded then stands (restored if an
            # admin retry cleared it).
            self.failed.setdefault(key, Failure(
                flight.signature, "load_timeout",
                f"an earlier read of {path} has not finished; still waiting for it",
            ))
            return None
        self.loading.add(key)
        start = time.perf_counter()
        try:
            if flight is None or flight.signature != sig:
                flight = self._flights[key] = _Flight(sig, self._start(key, path))
            done, _ = await asyncio.wait({flight.future}, timeout=self._policy.timeout_s)
            if not done:
                raise TimeoutError(
                    f"reading {path} has not finished after {self._policy.timeout_s:g} s; "
                    "still waiting for it"
                )
            del self._flights[key]
            model = flight.future.result()
        except Exception as e:
            elapsed = time.perf_counter() - start
            after = await asyncio.to_thread(repository.signature, path)
            self._fail(key, sig, e, changed=after != sig, elapsed=elapsed)
            return None
        finally:
            self.loading.discard(key)
        self.failed.pop(key, None)
        return model

    def _start(self, key: Key, path: Path) -> asyncio.Future[Model]:
        """Run the loader on a daemon thread; its outcome settles the returned future."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Model] = loop.create_future()
        # Retrieve the outcome of a flight nobody awaits any more (its directory vanished).
        future.add_done_callback(lambda f: f.cancelled() or f.exception())

        def settle(model: Model | None, error: BaseException | None) -> None:
            if future.done():
                return
            if error is not None:
                future.set_exception(error)
            else:
                future.set_result(model)  # type: ignore[arg-type]

        def run() -> None:
            try:
                model, error = self._loader(self._root, path), None
            except Exception as e:  # every failure is the version's, never the thread's
                model, error = None, e
            with contextlib.suppress(RuntimeError):  # the loop closed while we were stuck
                loop.call_soon_threadsafe(settle, model, error)

        name, version = key
        threading.Thread(target=run, name=f"load-{name}-{version}", daemon=True).start()
        return future

    def _fail(
        self, key: Key, sig: Signature, e: BaseException, *, changed: bool, elapsed: float
    ) -> None:
        """Record a failed load: classify it, schedule a retry if transient, log, publish."""
        name, version = key
        reason, detail = classify(e)
        if changed and reason not in TRANSIENT_REASONS:
            reason, detail = "transient_io", f"files changed while being read ({detail})"
        previous = self.failed.get(key)
        attempts = 1
        retry_at = 0.0
        if reason in TRANSIENT_REASONS:
            if previous is not None and previous.transient and previous.signature == sig:
                attempts = previous.attempts + 1
            delay = min(self._policy.retry_initial_s * 2 ** (attempts - 1),
                        self._policy.retry_max_s)
            retry_at = self._clock() + delay
            detail = f"{detail}; attempt {attempts}, retrying in {delay:.3g} s"
        self.failed[key] = Failure(sig, reason, detail, attempts, retry_at)
        self._publish(VersionFailed(name, version, reason, detail, elapsed))
        log.error(
            "model %s version %d rejected (%s): %s", name, version, reason, detail,
            exc_info=e if reason == "internal" else None,
        )


def classify(e: BaseException) -> tuple[str, str]:
    """(reason, detail) for any exception a load raised: every one fails only its version."""
    if isinstance(e, ModelFormatError):
        return (e.reason if e.reason in REASONS else "internal"), str(e)
    if isinstance(e, TimeoutError):
        return "load_timeout", str(e)
    if isinstance(e, TransientLoadError | OSError):
        return "transient_io", str(e)
    if isinstance(e, MemoryError):
        return "out_of_memory", "not enough memory to load it"
    return "internal", f"{type(e).__name__}: {str(e)[:200]}"
