"""Settings of the example: SQLite, mailspool's email backend, the local devserver as relay."""

from pathlib import Path

HERE = Path(__file__).resolve().parent.parent

SECRET_KEY = "example-only-not-secret"
DEBUG = True
ALLOWED_HOSTS = ["127.0.0.1", "localhost"]
ROOT_URLCONF = "shop.urls"
INSTALLED_APPS = ["mailspool.integrations.django"]  # for `manage.py mailspool_run`
MIDDLEWARE: list[str] = []
DATABASES = {
    "default": {
        "ENGINE": "django.db.backends.sqlite3",
        "NAME": HERE / "db.sqlite3",
        "ATOMIC_REQUESTS": True,  # a view's mail is queued only if the view succeeds
    }
}

EMAIL_BACKEND = "mailspool.integrations.django.EmailBackend"
DEFAULT_FROM_EMAIL = "Shop <shop@example.org>"
MAILSPOOL_QUEUE_PATH = HERE / "spool"
# `manage.py mailspool_run` delivers to `mailspool devserver` (no TLS: it is local).
MAILSPOOL_RELAY = {"host": "127.0.0.1", "port": 8025, "tls": "none"}
