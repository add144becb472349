"""Load site.zcml, send a message in a transaction, wait until it has left.

Run ``mailspool devserver`` in another terminal first, then::

    python examples/zope/send.py jane@example.org
"""

from __future__ import annotations

import sys
import time
from email.message import EmailMessage
from pathlib import Path

import transaction
from zope.component import getUtility
from zope.configuration import xmlconfig

from mailspool import Spool
from mailspool.integrations.zope import stop_processor_threads
from mailspool.interfaces import IMailDelivery

HERE = Path(__file__).resolve().parent


def main(argv: list[str]) -> int:
    recipient = argv[1] if len(argv) > 1 else "jane@example.org"
    xmlconfig.file(str(HERE / "site.zcml"))
    delivery = getUtility(IMailDelivery, "Mail")

    message = EmailMessage()
    message["From"] = "Zope site <site@example.org>"
    message["To"] = recipient
    message["Subject"] = "Hello from a Zope site"
    message.set_content("Queued at commit, delivered by the processor thread.\n")
    with transaction.manager:  # the mail is written to the queue when this block commits
        message_id = delivery.send("site@example.org", [recipient], message)
    print(f"queued <{message_id}> in {delivery.queuePath}")

    spool = Spool(delivery.queuePath)
    deadline = time.monotonic() + 30
    while any(True for _ in spool.due()) and time.monotonic() < deadline:
        time.sleep(0.05)  # the thread has been woken by the commit
    stop_processor_threads()  # lets a message being sent finish
    print("done: see the devserver's terminal")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
