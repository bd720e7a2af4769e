"""One controller per study: a lease kept in the study, renewed by a heartbeat, taken over once it expires.

Two controllers on one study fail each other's RUNNING trials as orphans, discard each other's results
and overspend the budget. So `search` and `resume` take the study's lease before they write, and hold
it while they run:

    study user attribute "evomerge.lease" = {host, pid, since, renewed, ttl_s, token}   (null: released)

Another controller is refused while the lease is live, with its holder named. A lease is live until
`ttl_s` after its last heartbeat (`renewed`), or, on the holder's own host, until its process is gone
(a pid on another host cannot be checked, so there only the expiry counts). The holder renews it every
ttl_s / 6 from a background thread, and before each study write it checks that it still holds it:
a controller that was paused (SIGSTOP, a frozen VM) past the expiry finds the lease taken over and stops
without writing another thing (`LeaseLostError`). Wall clocks of the hosts should agree to within
ttl_s / 2. Every change of the lease is a compare-and-set on the stored value (`LeaseCell`), so of
two controllers that race for it, or a heartbeat that races a takeover, exactly one wins.
"""

from __future__ import annotations

import dataclasses
import math
import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import optuna

from evomerge.errors import StudyError
from evomerge.study.lease_cell import LeaseCell

LEASE_ATTR = "evomerge.lease"
TTL_S = 60.0  # a killed controller on another host blocks its study this long after its last heartbeat


class LeaseHeldError(StudyError):
    """Another controller holds the study's lease."""


class LeaseLostError(StudyError):
    """This controller's lease was taken over (it was unresponsive past the expiry): it must stop writing."""


@dataclass(frozen=True)
class Holder:
    """Who holds a study's lease, and since when (unix seconds)."""

    host: str
    pid: int
    since: float
    renewed: float
    ttl_s: float
    token: str

    @classmethod
    def new(cls, ttl_s: float) -> Holder:
        now = time.time()
        return cls(socket.gethostname(), os.getpid(), now, now, ttl_s, uuid.uuid4().hex)

    @classmethod
    def from_attr(cls, value: object) -> Holder | None:
        """The holder a stored attribute names; None for a released (or unreadable) lease."""
        if not isinstance(value, dict):
            return None
        try:
            return cls(**{f.name: value[f.name] for f in dataclasses.fields(cls)})
        except (KeyError, TypeError):
            return None

    def live(self, now: float) -> bool:
        """Renewed within its ttl, and (on this host) its process still runs."""
        if now - self.renewed > self.ttl_s:
            return False
        if self.host == socket.gethostname():
            return self.pid != os.getpid() and _process_runs(self.pid)  # our own pid: a dead predecessor's
        return True

    def describe(self) -> str:
        since = datetime.fromtimestamp(self.since).astimezone().isoformat(timespec="seconds")
        return f"host {self.host}, pid {self.pid}, since {since}"


def live_holder(study: optuna.Study) -> Holder | None:
    """The controller that holds the study's lease now, or None."""
    found = Holder.from_attr(study.user_attrs.get(LEASE_ATTR))
    return found if found is not None and found.live(time.time()) else None


def refuse_if_held(study: optuna.Study) -> None:
    """A LeaseHeldError naming the holder when another controller runs the study (reads only)."""
    holder = live_holder(study)
    if holder is not None:
        raise LeaseHeldError(_held_message(study.study_name, holder))


class ControllerLease:
    """This process's lease on one study: `acquire`, `check` before every write, `release` at the end."""

    def __init__(self, study: optuna.Study, ttl_s: float | None = None) -> None:
        self.study = study
        self.cell = LeaseCell(study, LEASE_ATTR)
        self.mine = Holder.new(TTL_S if ttl_s is None else ttl_s)
        self._written: dict | None = None  # the value this lease last stored
        self.took_over: Holder | None = None  # an unreleased lease of a stopped controller, taken over
        self._lock = threading.Lock()
        self._renewed_at = -math.inf  # time.monotonic() of the last renewal
        self._lost: LeaseLostError | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.heartbeat_error: Exception | None = None  # the last failed renewal of the heartbeat thread

    @property
    def lost(self) -> bool:
        return self._lost is not None

    def acquire(self) -> None:
        """Take the lease (a LeaseHeldError while another controller holds it) and start the heartbeat."""
        while True:  # again only when another writer changed the lease between the read and the write
            stored = self.cell.read()
            previous = Holder.from_attr(stored)
            if previous is not None and previous.live(time.time()):
                raise LeaseHeldError(_held_message(self.study.study_name, previous))
            if self._write(stored, self.mine):
                break
        self.took_over = previous
        self._thread = threading.Thread(target=self._beat, name="evomerge-lease", daemon=True)
        self._thread.start()

    def check(self) -> None:
        """Before a write: raise LeaseLostError once the lease is someone else's. Renews synchronously
        when the heartbeat is overdue (this process was paused, or the storage was slow), so a write never
        follows a pause long enough for another controller to take over."""
        if self._lost is not None:
            raise self._lost
        if time.monotonic() - self._renewed_at > self.mine.ttl_s / 3:
            self.renew()

    def renew(self) -> None:
        """Write a new heartbeat, after checking the lease is still ours."""
        with self._lock:
            if self._lost is not None:
                raise self._lost
            if not self._write(self._written, dataclasses.replace(self.mine, renewed=time.time())):
                current = Holder.from_attr(self.cell.read())
                self._lost = LeaseLostError(_lost_message(self.study.study_name, current, self.mine.ttl_s))
                raise self._lost

    def release(self) -> None:
        """Stop the heartbeat and clear the lease, if it is still ours."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        with self._lock:
            if self._lost is not None:
                return
            self.cell.replace(self._written, None)  # a no-op when another controller holds it now

    def _write(self, expected: object, holder: Holder) -> bool:
        """Store `holder` if the lease still holds `expected`; False when someone else wrote it since."""
        value = dataclasses.asdict(holder)
        if not self.cell.replace(expected, value):
            return False
        self._written = value
        self._renewed_at = time.monotonic()
        return True

    def _beat(self) -> None:
        """Renew every ttl / 6 until released or lost. A failed renewal (storage unreachable) is retried at
        the next beat; `check` renews synchronously, and so raises that error, once renewal is overdue."""
        while not self._stop.wait(self.mine.ttl_s / 6):
            try:
                self.renew()
            except LeaseLostError:
                return
            except Exception as exc:  # noqa: BLE001 -- kept, and retried next beat; `check` raises it once overdue
                self.heartbeat_error = exc


def _held_message(name: str, holder: Holder) -> str:
    ago = max(time.time() - holder.renewed, 0.0)
    return (f"study {name!r} is being run by another controller ({holder.describe()}; last heartbeat {ago:.0f}s ago); "
            f"wait for it to finish or stop it (Ctrl-C or SIGTERM), then resume; a killed controller's lease expires "
            f"{holder.ttl_s:.0f}s after its last heartbeat")


def _lost_message(name: str, holder: Holder | None, ttl_s: float) -> str:
    by = f"by another controller ({holder.describe()})" if holder is not None else "(its lease was cleared)"
    return (f"study {name!r} was taken over {by} while this controller was unresponsive for more than {ttl_s:.0f}s; "
            "this one stopped without writing further; see `evomerge status` for the study")


def _process_runs(pid: int) -> bool:
    """Whether process `pid` exists on this host and is not a zombie."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: it exists
        return True
    stat = Path(f"/proc/{pid}/stat")
    try:
        state = stat.read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return True  # no /proc (macOS): kill(0) said it exists
    return state not in ("Z", "X")
