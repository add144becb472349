"""A Django project for these tests only: settings, an SQLite test database, the test environment.

Django's settings are configured once per process; nothing outside this
directory imports Django.  ``setup_test_environment()`` switches
``EMAIL_BACKEND`` to locmem, as for any Django project's tests; the tests of
the backend set it back with ``override_settings`` (the ``spool`` fixture),
which is what an application's own tests do too.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import django
import pytest
from django.conf import settings
from django.test.utils import override_settings, setup_test_environment, teardown_test_environment

from mailspool import Spool

BACKEND = "mailspool.integrations.django.EmailBackend"


def pytest_configure(config: pytest.Config) -> None:
    # Called when pytest loads this file, before the test modules (which
    # import the models) are collected.
    if settings.configured:
        return
    settings.configure(
        SECRET_KEY="only-for-tests",
        DEBUG=False,
        DATABASES={
            "default": {
                "ENGINE": "django.db.backends.sqlite3",
                "NAME": "mailspool-tests.sqlite3",  # never created: the test database is in memory
                "ATOMIC_REQUESTS": True,
            }
        },
        INSTALLED_APPS=["mailspool.integrations.django", "django_tests.shop"],
        ROOT_URLCONF="django_tests.urls",
        MIDDLEWARE=[],
        TEMPLATES=[],
        USE_TZ=True,
        EMAIL_BACKEND=BACKEND,
        DEFAULT_FROM_EMAIL="Shop <shop@example.org>",
        SERVER_EMAIL="server@example.org",
        ADMINS=[("Ops", "ops@example.org")],
    )
    django.setup()


@pytest.fixture(scope="session", autouse=True)
def django_test_database(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Django's test environment (locmem email) and its SQLite test database."""
    from django.db import connection

    setup_test_environment()
    old_name = connection.creation.create_test_db(verbosity=0, autoclobber=True)
    spool = tmp_path_factory.mktemp("django") / "spool"
    try:
        with override_settings(MAILSPOOL_QUEUE_PATH=str(spool)):
            yield
    finally:
        connection.creation.destroy_test_db(old_name, verbosity=0)
        teardown_test_environment()


@pytest.fixture
def spool(tmp_path: Path) -> Iterator[Path]:
    """mailspool's backend, writing into a spool of this test's own; the orders table emptied."""
    from django_tests.shop.models import Order

    path = tmp_path / "spool"
    Spool(path)  # as the first send would create it
    with override_settings(EMAIL_BACKEND=BACKEND, MAILSPOOL_QUEUE_PATH=str(path)):
        yield path
    Order.objects.all().delete()
