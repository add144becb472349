"""The queue processor: passes over the queue, senders, connections, retries, pacing.

:mod:`~mailspool.processor.loop` holds :class:`QueueProcessor`; a pass is
counted in :mod:`~mailspool.processor.passes` and its sender threads are
:mod:`~mailspool.processor.crew`; one message's trip is
:mod:`~mailspool.processor.sender`, which opens connections and meets the
relay's trouble through :mod:`~mailspool.processor.connector` and keeps the
outcomes a full spool cannot take in :mod:`~mailspool.processor.unwritten`;
what an attempt means is
:mod:`~mailspool.processor.outcome`; when to try again is
:mod:`~mailspool.processor.policy`; connections are pooled in
:mod:`~mailspool.processor.pool`; the loop sleeps in
:mod:`~mailspool.processor.wakeup`; what it learned about the relay is left
for ``mailspool status`` by :mod:`~mailspool.processor.relayfile`.
"""
