"""The torture run: the whole of mailspool end to end, under faults, judged.

``python -m tests.torture.run`` (from the repository root) starts writer
processes that commit mail through :class:`mailspool.QueuedMailDelivery`,
processor processes that drain the spool (``mailspool run`` and a
:class:`mailspool.QueueProcessor` in a child), and a relay that fails in
every way an SMTP relay can.  Writers and processors are SIGKILLed at random
moments and restarted; the spool sits on a small tmpfs that runs full part
of the time; a loop-mounted ext4 image is cut off like a power loss.  The
relay's journal is the judge: at the end every committed recipient must have
been delivered, or refused permanently by the relay, and every duplicate
must have a cause in its window.  docs/guarantees.md explains what this
proves; ``tests/torture/test_torture_short.py`` runs a short version in CI.

``--backend postgres`` runs the same against a PostgreSQL queue on a
private server, which is restarted during the chaos (docs/postgres.md has
the report): the writers commit in their own database transactions, four
processors share the queue.

Modules: :mod:`.relay` (the faulty relay), :mod:`.actors` (writer and
processor processes), :mod:`.judge` (the verdict, pure functions over the
journals), :mod:`.powerloss` (the ext4 power cut), :mod:`.pgserver` (the
private PostgreSQL server) and :mod:`.run` (the harness and its command
line).
"""

from __future__ import annotations

__all__: list[str] = []
