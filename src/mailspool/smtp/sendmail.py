"""A mailer that hands each message to the local MTA's ``sendmail`` program.

Postfix, Exim and the other MTAs ship a ``sendmail`` binary that takes the
envelope on its command line and the message on its standard input; the
local MTA then owns the message (its queue, its retries, its bounces).  This
is the simplest setup on a host that already runs one, and needs no
network settings, TLS or credentials in the application.

The program's exit status (``sysexits.h``) says whether trying again can
help; it is classified like an SMTP reply (:mod:`mailspool.errors`).
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterable, Sequence

from zope.interface import implementer

from mailspool.errors import PermanentError, RelayUnavailable, SMTPTimeout, TransientError
from mailspool.interfaces import ISendmailMailer
from mailspool.message import Envelope, make_envelope, to_wire
from mailspool.smtp.result import MessageInput, SendResult

__all__ = ["SendmailMailer"]

# sysexits.h: what a sendmail binary's exit status says about retrying.
_PERMANENT = {
    64: "command line usage error",
    65: "data format error",
    66: "cannot open input",
    67: "addressee unknown",
    68: "host name unknown",
    77: "permission denied",
}
_CONFIG = {69: "service unavailable", 78: "configuration error"}


@implementer(ISendmailMailer)
class SendmailMailer:
    """Pipes each message to a local ``sendmail -i -f SENDER -- RECIPIENT...``.

    The local MTA (Postfix, Exim...) then owns the message.  Lines are
    given to it with LF endings, as local programs expect.

    Args:
        path: the sendmail binary.
        args: extra arguments, put before ``-f``.
        timeout: seconds the binary may take before it is killed.
    """

    def __init__(
        self,
        path: str | os.PathLike[str] = "/usr/sbin/sendmail",
        *,
        args: Sequence[str] = (),
        timeout: float = 600.0,
    ) -> None:
        self.path = os.fspath(path)
        self.args = tuple(args)
        self.timeout = float(timeout)

    def __repr__(self) -> str:
        return f"SendmailMailer(path={self.path!r})"

    def send(
        self, fromaddr: str, toaddrs: Iterable[str] | str, message: MessageInput
    ) -> SendResult:
        """Hand the message to sendmail.

        Args:
            fromaddr: the envelope sender (a display name is allowed).
            toaddrs: the recipients, or one recipient as a string.
            message: ``bytes``, ``str`` or an ``email.message.Message``.

        Returns:
            A :class:`~mailspool.result.SendResult` with every recipient
            accepted (sendmail reports refusals later, by bounce).

        Raises:
            InvalidAddress, InvalidMessage: bad input.
            RelayUnavailable: the binary cannot be run, or exited with
                EX_UNAVAILABLE/EX_CONFIG.
            SMTPTimeout: it did not finish in time (it was killed).
            PermanentError: it exited with a status meaning "do not retry"
                (EX_USAGE, EX_DATAERR, EX_NOINPUT, EX_NOUSER, EX_NOHOST, EX_NOPERM).
            TransientError: any other non-zero exit status.
        """
        return self._pipe(make_envelope(fromaddr, toaddrs), to_wire(message))

    def send_envelope(self, envelope: Envelope, data: bytes) -> SendResult:
        """Like :meth:`send` for an already validated envelope and wire bytes.

        ``data`` is checked like :func:`mailspool.message.to_wire` checks a
        message (a spawned process costs far more than that).
        """
        return self._pipe(envelope, to_wire(data))

    def _pipe(self, envelope: Envelope, data: bytes) -> SendResult:
        argv = [self.path, "-i", *self.args, "-f", envelope.sender, "--", *envelope.recipients]
        payload = data.replace(b"\r\n", b"\n")
        try:
            proc = subprocess.run(
                argv, input=payload, capture_output=True, timeout=self.timeout, check=False
            )
        except subprocess.TimeoutExpired as exc:
            raise SMTPTimeout(f"{self.path} did not finish within {self.timeout:g} s") from exc
        except OSError as exc:
            raise RelayUnavailable(f"cannot run {self.path}: {exc.strerror or exc}") from exc
        status = proc.returncode
        if status == 0:
            return SendResult(envelope.recipients)
        said = proc.stderr.decode("utf-8", "replace").strip()[-500:]
        if status < 0:
            what = f"killed by signal {-status}"
        else:
            meaning = _PERMANENT.get(status) or _CONFIG.get(status)
            what = f"exit status {status}" + (f" ({meaning})" if meaning else "")
        text = f"{self.path} failed: {what}" + (f": {said}" if said else "")
        if status in _PERMANENT:
            raise PermanentError(text)
        if status in _CONFIG:
            raise RelayUnavailable(text)
        raise TransientError(text)

    def vote(self, fromaddr: str, toaddrs: Iterable[str] | str, message: MessageInput) -> None:
        """Validate the input and check that the binary can be run.

        Raises:
            InvalidAddress, InvalidMessage: bad input.
            RelayUnavailable: the binary is missing or not executable.
        """
        make_envelope(fromaddr, toaddrs)
        to_wire(message)
        if not (os.path.isfile(self.path) and os.access(self.path, os.X_OK)):
            raise RelayUnavailable(f"{self.path} is not an executable file")

    def abort(self) -> None:
        """Nothing to undo: :meth:`vote` opens nothing."""
