"""A minimal Pyramid app that mails through mailspool.

Run ``mailspool devserver`` in another terminal first, then::

    python examples/pyramid/app.py
    curl 'http://127.0.0.1:6543/welcome?to=jane@example.org'
    curl 'http://127.0.0.1:6543/broken?to=jane@example.org'   # raises: nothing is sent
"""

from __future__ import annotations

from pathlib import Path
from typing import Any
from wsgiref.simple_server import make_server

from pyramid.config import Configurator
from pyramid.response import Response

from mailspool.integrations.pyramid import Message

HERE = Path(__file__).resolve().parent

SETTINGS = {
    "mail.host": "127.0.0.1",
    "mail.port": "8025",
    "mail.tls": "false",  # the devserver has no TLS: the one explicit choice
    "mail.queue_path": str(HERE / "var" / "mailqueue"),
    "mail.queue_processor": "true",  # deliver from a thread of this app
    "mail.default_sender": "Shop <shop@example.org>",
}


def _welcome(request: Any) -> Message:
    to = request.params.get("to", "jane@example.org")
    return Message(
        subject="Welcome to the shop",
        recipients=[to],
        body="Hello!\n\nYour account is ready.\n",
        html="<p>Hello!</p><p>Your account is <b>ready</b>.</p>",
    )


def welcome(request: Any) -> Response:
    request.mailer.send_to_queue(_welcome(request))
    return Response("queued: the mail leaves when this request's transaction commits\n")


def broken(request: Any) -> Response:
    request.mailer.send_to_queue(_welcome(request))
    raise RuntimeError("the view failed after send_to_queue: pyramid_tm aborts, nothing is sent")


def make_app() -> Any:
    with Configurator(settings=SETTINGS) as config:
        config.include("pyramid_tm")
        config.include("mailspool.integrations.pyramid")
        config.add_route("welcome", "/welcome")
        config.add_view(welcome, route_name="welcome")
        config.add_route("broken", "/broken")
        config.add_view(broken, route_name="broken")
        return config.make_wsgi_app()


if __name__ == "__main__":
    with make_server("127.0.0.1", 6543, make_app()) as server:
        print("serving on http://127.0.0.1:6543 (try /welcome?to=you@example.org)")
        server.serve_forever()
