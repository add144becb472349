"""Queues written by zope.sendmail and repoze.sendmail are drained too."""

from __future__ import annotations

import os
import time
from email.mime.text import MIMEText
from pathlib import Path

import pytest

from _helpers_spool import names
from mailspool.maildir.spool import Spool, decode_file


def zope_queue(tmp_path: Path) -> Path:
    path = tmp_path / "zope-queue"
    for area in ("tmp", "new", "cur"):
        (path / area).mkdir(parents=True)
    return path


def test_hand_written_zope_sendmail_file(tmp_path: Path) -> None:
    q = zope_queue(tmp_path)
    # What zope.sendmail writes: two LF-terminated envelope lines, then the
    # message as the application gave it (here with CRLF).
    (q / "new" / "1700000000.123.host.42").write_bytes(
        b'X-Zope-From: "Doe, J" <sender@example.org>\n'
        b'X-Zope-To: a@example.org, "Smith, Bob" <b@example.org>, j\xc3\xbcrgen@b\xc3\xbccher.de\n'
        b"Message-Id: <1.2@host>\r\nSubject: hi\r\n\r\nbody\r\n"
    )
    sp = Spool(q, create=False)
    assert list(sp.due()) == ["1700000000.123.host.42"]
    e = sp.get("1700000000.123.host.42")
    assert e.legacy and e.message_id == "1.2@host" and e.state == "ready"
    c = sp.claim("1700000000.123.host.42")
    assert c is not None and c.legacy
    assert c.envelope.sender == "sender@example.org"
    assert c.envelope.recipients == ("a@example.org", "b@example.org", "jürgen@bücher.de")
    assert c.data == b"Message-Id: <1.2@host>\r\nSubject: hi\r\n\r\nbody\r\n"
    assert b"X-Zope" not in c.data
    assert c.queued_at == pytest.approx(os.stat(q / "cur" / c.id).st_mtime)
    # Deferring converts it to mailspool's own format.
    c.settle(sent=["a@example.org"], deferred={"b@example.org": (451, "later")}, retry_at=0)
    raw = (q / "deferred" / c.id).read_bytes()
    assert raw.startswith(b"X-Mailspool: 1 ")
    record, data = decode_file(raw)
    assert not record.legacy and data == c.data
    assert [r.status for r in record.recipients] == ["sent", "pending", "pending"]


def test_hand_written_repoze_sendmail_file(tmp_path: Path) -> None:
    q = zope_queue(tmp_path)
    (q / "new" / "1700000000.9.host.7").write_bytes(
        b"Content-Type: text/plain\n"
        b"Subject: hi\n"
        b"Message-Id: <r.1@repoze>\n"
        b"X-Actually-From: =?utf-8?q?sender=40example=2Eorg?=\n"
        b"X-Actually-To: =?utf-8?b?YUBleGFtcGxlLm9yZyxqw7xyZ2VuQGLDvGNoZXIuZGU=?=\n"
        b"\n"
        b"body line\n"
    )
    sp = Spool(q, create=False)
    c = sp.claim("1700000000.9.host.7")
    assert c is not None and c.legacy and c.message_id == "r.1@repoze"
    assert c.envelope.sender == "sender@example.org"
    assert c.envelope.recipients == ("a@example.org", "jürgen@bücher.de")
    assert c.data == (
        b"Content-Type: text/plain\r\nSubject: hi\r\nMessage-Id: <r.1@repoze>\r\n\r\nbody line\r\n"
    )
    assert c.settle(sent=c.envelope.recipients) == "removed"
    assert names(q, "new") == [] and names(q, "cur") == []


def test_undecodable_repoze_header_is_quarantined(tmp_path: Path) -> None:
    q = zope_queue(tmp_path)
    (q / "new" / "1.r.host").write_bytes(
        b"Subject: x\nX-Actually-From: a@example.org\n"
        b"X-Actually-To: =?x-no-such-charset?q?b=40example.org?=\n\nbody\n"
    )
    sp = Spool(q, create=False)
    assert sp.claim("1.r.host") is None
    assert "undecodable" in (sp.get("1.r.host").last_error or "")


def test_a_zope_envelope_that_is_not_utf8_is_quarantined(tmp_path: Path) -> None:
    q = zope_queue(tmp_path)
    (q / "new" / "1.z.host").write_bytes(b"X-Zope-From: a@x.org\nX-Zope-To: b\xff@x.org\n\nbody\n")
    sp = Spool(q, create=False)
    assert sp.claim("1.z.host") is None
    assert sp.state("1.z.host") == "quarantined"
    assert "not UTF-8" in (sp.get("1.z.host").last_error or "")


def test_a_plain_message_without_any_envelope_is_quarantined(tmp_path: Path) -> None:
    q = zope_queue(tmp_path)
    (q / "new" / "1.x.host").write_bytes(b"Subject: who is this for?\n\nbody\n")
    sp = Spool(q, create=False)
    assert sp.claim("1.x.host") is None
    assert "no legacy headers" in (sp.get("1.x.host").last_error or "")


def test_queue_written_by_zope_sendmail(tmp_path: Path) -> None:
    delivery_mod = pytest.importorskip("zope.sendmail.delivery")
    transaction = pytest.importorskip("transaction")
    q = tmp_path / "zq"  # zope.sendmail creates it
    d = delivery_mod.QueuedMailDelivery(str(q))
    transaction.begin()  # zope.sendmail joins the thread's default transaction
    mid = d.send(
        '"Doe, J" <sender@example.org>',
        ["a@example.org", '"Smith, Bob" <b@example.org>', "jürgen@bücher.de"],
        b"Subject: from zope\r\n\r\nbody\r\n",
    )
    transaction.commit()
    sp = Spool(q, create=False)
    (id_,) = list(sp.due())
    assert sp.get(id_).message_id == mid
    c = sp.claim(id_)
    assert c is not None and c.legacy
    assert c.envelope.sender == "sender@example.org"
    assert c.envelope.recipients == ("a@example.org", "b@example.org", "jürgen@bücher.de")
    assert c.data.endswith(b"Subject: from zope\r\n\r\nbody\r\n") and b"X-Zope" not in c.data
    assert c.settle(sent=c.envelope.recipients) == "removed"


def test_queue_written_by_repoze_sendmail(tmp_path: Path) -> None:
    delivery_mod = pytest.importorskip("repoze.sendmail.delivery")
    transaction = pytest.importorskip("transaction")
    q = tmp_path / "rq"  # repoze.sendmail creates it
    tm = transaction.TransactionManager()
    d = delivery_mod.QueuedMailDelivery(str(q), transaction_manager=tm)
    msg = MIMEText("héllo body")
    msg["Subject"] = "from repoze"
    tm.begin()
    mid = d.send("sender@example.org", ["a@example.org", "jürgen@bücher.de"], msg)
    tm.commit()
    sp = Spool(q, create=False)
    (id_,) = list(sp.due())
    c = sp.claim(id_)
    assert c is not None and c.legacy
    assert c.message_id == mid.strip("<>")
    assert c.envelope.sender == "sender@example.org"
    assert c.envelope.recipients == ("a@example.org", "jürgen@bücher.de")
    assert b"X-Actually" not in c.data and b"Subject: from repoze\r\n" in c.data
    assert b"\n" not in c.data.replace(b"\r\n", b"")  # CRLF only
    c.defer(time.time() + 60, "relay down")
    assert sp.get(id_).state == "deferred" and not sp.get(id_).legacy
