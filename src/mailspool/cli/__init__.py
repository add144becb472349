"""The ``mailspool`` command: one module per group of verbs, and its settings.

:mod:`~mailspool.cli.main` builds the command and runs it; the verbs live in
:mod:`~mailspool.cli.queue_verbs`, :mod:`~mailspool.cli.delivery_verbs`,
:mod:`~mailspool.cli.check_verb`, :mod:`~mailspool.cli.config_verb` and
:mod:`~mailspool.cli.dev_verbs`; the settings in
:mod:`~mailspool.cli.settings`. Nothing outside this package imports it.
"""

from __future__ import annotations

from collections.abc import Sequence


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``mailspool`` command; see :func:`mailspool.cli.main.main`."""
    from mailspool.cli.main import main as run

    return run(argv)
