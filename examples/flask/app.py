"""A one-file Flask app whose mail goes through mailspool.

Run, from this directory, with ``pip install 'mailspool[flask]'`` done::

    mailspool devserver                      # a local SMTP sink on 127.0.0.1:8025
    flask --app app run --port 5000          # the app
    flask --app app mailspool run            # the queue processor (Ctrl-C stops it)

then ``curl 'http://127.0.0.1:5000/signup?email=jane@example.org'``; with
``&fail=1`` the view fails after sending and nothing is queued.
"""

from pathlib import Path

from flask import Flask, request

from mailspool.integrations.flask import Mailspool

app = Flask(__name__)
app.config.update(
    MAILSPOOL_QUEUE_PATH=Path(__file__).resolve().parent / "spool",
    MAILSPOOL_DEFAULT_SENDER="Shop <shop@example.org>",
    # `flask mailspool run` delivers to `mailspool devserver` (no TLS: it is local).
    MAILSPOOL_RELAY={"host": "127.0.0.1", "port": 8025, "tls": "none"},
)
mail = Mailspool(app)


@app.get("/signup")
def signup() -> str:
    email = request.args.get("email", "jane@example.org")
    mail.send_mail("Welcome", f"Hello {email}, thanks for signing up.", to=email)
    if request.args.get("fail"):
        raise RuntimeError("something broke after send_mail(): the mail is not queued")
    return f"queued a welcome mail to {email}\n"
