"""``python manage.py mailspool_run``: deliver the spool the email backend writes to.

The same processor as ``mailspool run``, with the Django settings on top of
the command's other sources: ``MAILSPOOL_QUEUE_PATH`` is the spool,
``MAILSPOOL_RELAY`` a dict of relay and processor settings by their TOML
names, ``MAILSPOOL_CONFIG`` a TOML file; ``MAILSPOOL_*`` environment
variables fill in what those leave unset.
"""

from __future__ import annotations

import logging
from typing import Any

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError, CommandParser

from mailspool.integrations._processor import ConfigError, load_processor_settings, run_processor


class Command(BaseCommand):  # type: ignore[misc]
    help = (
        "Deliver the mail queued by mailspool's email backend: keep running until "
        "SIGTERM/SIGINT, or with --once make one pass and exit (1 if anything "
        "failed or stayed deferred)."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument(
            "--once", action="store_true", help="Deliver what is due now, then exit."
        )
        parser.add_argument(
            "--queue",
            metavar="PATH",
            help="The spool to deliver (default: MAILSPOOL_QUEUE_PATH), e.g. a MAILERS one.",
        )

    def handle(self, *args: Any, **options: Any) -> None:
        queue = options["queue"] or getattr(settings, "MAILSPOOL_QUEUE_PATH", None)
        if not queue:
            raise CommandError(
                "MAILSPOOL_QUEUE_PATH is not set: name the spool directory (or use --queue)"
            )
        relay = getattr(settings, "MAILSPOOL_RELAY", None) or {}
        if not isinstance(relay, dict):
            raise CommandError(f"MAILSPOOL_RELAY: expected a dict, got {relay!r}")
        if options["verbosity"] > 1 and not logging.getLogger("mailspool").handlers:
            logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
        try:
            loaded = load_processor_settings(
                queue, relay, config_file=getattr(settings, "MAILSPOOL_CONFIG", None)
            )
            summary = run_processor(loaded, once=options["once"])
        except ConfigError as exc:
            raise CommandError(str(exc)) from None
        if summary is None:
            return
        from mailspool.cli.common import summary_code, summary_line

        self.stdout.write(summary_line(summary))
        code = summary_code(summary)
        if code:
            raise CommandError("some mail was not delivered", returncode=code)
