"""The benchmark scenarios and what they share (:class:`Env`).

Each scenario module has ``NAME``, ``TITLE`` and ``run(env)``; it records its
figures in ``env.results`` and never raises for a failed trial (the trial's
row shows the error instead).
"""

from __future__ import annotations

import itertools
import os
import shutil
from dataclasses import dataclass, field
from typing import Any

from harness import Options, Results, TrialError
from relays import AiosmtpdRelay, SmtpSink, make_tls_files

__all__ = ["Env", "check_relay", "note_bare_lf"]


@dataclass
class Env:
    opts: Options
    results: Results
    tmp: str
    sink_path: str | None
    _tls: dict[str, str] | None = None
    _seq: Any = field(default_factory=itertools.count)
    #: The PostgreSQL server for the pg-* scenarios (a libpq URL), and
    #: django-mailer's version (None: not installed, its rows are left out).
    pg_server: str = ""
    django_mailer: str | None = None
    _pg: Any = None
    _pg_failed: bool = False

    def postgres(self) -> Any:
        """The scratch database (a :class:`pgsystems.Scratch`), made at the first call.

        None, with a note, when the server cannot be reached.
        """
        if self._pg is None and not self._pg_failed:
            from harness import run_child
            from pgsystems import Scratch, migrate_django_mailer

            scratch = Scratch(self.pg_server)
            try:
                scratch.create()
                if self.django_mailer:
                    run_child(migrate_django_mailer, 300, db=scratch.params)
            except Exception as exc:  # psycopg's, or the migration's
                self._pg_failed = True
                scratch.drop()
                why = " ".join(str(exc).split())[:200]
                self.results.notes.append(f"PostgreSQL scenarios not run: {why}")
                print(f"  PostgreSQL not usable at {self.pg_server}: {why}")
                return None
            self._pg = scratch
        return self._pg

    def close(self) -> None:
        """Drop what the run made outside its temporary directory."""
        if self._pg is not None:
            self._pg.drop()
            self._pg = None

    def fast_relay(self) -> Any:
        """smtp-sink when installed, else an aiosmtpd sink (slower)."""
        if self.sink_path:
            return SmtpSink(self.sink_path)
        return AiosmtpdRelay()

    def tls_files(self) -> dict[str, str]:
        if self._tls is None:
            d = os.path.join(self.tmp, "tls")
            os.makedirs(d, exist_ok=True)
            self._tls = make_tls_files(d)
        return self._tls

    def spool(self, label: str) -> str:
        """A fresh spool path (not created) under the temporary directory."""
        return os.path.join(self.tmp, f"{label}-{next(self._seq)}")

    def tag(self) -> str:
        return f"t{next(self._seq)}"

    def cleanup(self, path: str) -> None:
        """Set a trial's spool aside; everything is deleted after the last trial.

        Deleting thousands of fsynced files right away would slow the next
        trial, whichever system it measures: on a file system mounted with
        online ``discard`` each deletion makes the disk discard blocks, and
        the trials after a cleanup ran up to twice as slow (even
        zope.sendmail's, which never fsyncs).  A rename costs nothing.
        """
        if not os.path.lexists(path):
            return
        graveyard = os.path.join(self.tmp, "graveyard")
        os.makedirs(graveyard, exist_ok=True)
        try:
            os.rename(path, os.path.join(graveyard, os.path.basename(path)))
        except OSError:
            shutil.rmtree(path, ignore_errors=True)


def check_relay(relay: Any, expected: int, timeout: float = 10.0) -> None:
    """Raise TrialError unless the relay counted exactly ``expected`` messages."""
    got = relay.wait_for(expected, timeout)
    if got != expected:
        raise TrialError(f"relay counted {got} messages, {expected} were sent")
    distinct = relay.distinct()
    if distinct is not None and distinct != expected:
        raise TrialError(f"relay got {expected} messages but only {distinct} distinct Message-Ids")


def note_bare_lf(env: Env, relay: Any, scenario: str, label: str, sent: int) -> None:
    """Record (once per row) that a system put bare LF line endings on the wire."""
    bare = relay.bare_lf() if hasattr(relay, "bare_lf") else None
    if not bare:
        return
    note = (
        f"{scenario} / {label}: {bare} of {sent} messages arrived with bare LF line "
        "endings (RFC 5321 requires CRLF; the relay was set to accept them, as "
        "smtp-sink and Postfix do; aiosmtpd's default refuses them with 500)"
    )
    prefix = note.split(":", 1)[0]
    if not any(n.startswith(prefix + ":") for n in env.results.notes):
        env.results.notes.append(note)
