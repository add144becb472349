"""Where a spool keeps a message's priority class: in its name, and its ready
directory (no I/O).

A message's class is in its name, which never changes, so every move keeps
it without reading the file: a mark at the end, ``,P=urgent`` or
``,P=bulk``; a normal name has none (nor has any file of an earlier release,
of zope.sendmail or of repoze.sendmail: they are all normal).  Ready mail of
each class has a directory of its own, so the due listing finds urgent mail
without reading the rest: ``new/`` is the normal class's, ``urgent/`` and
``bulk/`` the others'.  The lifecycle speaks of "new" for all three;
:func:`area_dir` says which directory that is for a given message.
"""

from __future__ import annotations

from mailspool.priority import Priority

__all__ = ["MARKS", "READY_AREA", "READY_DIRS", "area_dir", "name_priority"]

#: Class -> the mark its names end with (normal mail's names have none).
MARKS = {Priority.URGENT: ",P=urgent", Priority.BULK: ",P=bulk"}
#: Class -> the directory its ready mail is in.
READY_AREA = {Priority.URGENT: "urgent", Priority.NORMAL: "new", Priority.BULK: "bulk"}
#: The directories of ready mail besides ``new/``.
READY_DIRS = ("urgent", "bulk")


def name_priority(name: str) -> Priority:
    """The class a spool name carries (normal for a name without a mark)."""
    if name.endswith(",P=urgent"):
        return Priority.URGENT
    if name.endswith(",P=bulk"):
        return Priority.BULK
    return Priority.NORMAL


def area_dir(area: str, id: str) -> str:
    """The directory (area name) that holds ``id`` in lifecycle area ``area``:
    ready mail is in its class's."""
    return READY_AREA[name_priority(id)] if area == "new" else area
