"""The TLS arguments of zope.sendmail, repoze.sendmail and pyramid_mailer, read safely.

:class:`~mailspool.SMTPMailer` accepts the constructor arguments that code
written for those packages passes (``hostname=``, ``no_tls=``,
``force_tls=``, ``implicit_tls=``, ``ssl=``, ``tls=True``/``False``), so that
moving over is a change of imports.  They all come down to one of the three
TLS modes, and this module says which, in one place
(:func:`tls_mode`); anything contradictory is refused with a message that
names the arguments, never silently resolved.

What differs, and why (docs/migrating.md has the table):

* With none of them given the mode is ``"starttls"``: the relay must offer
  STARTTLS and its certificate must verify.  The older packages used
  STARTTLS *if offered*, with an unverified certificate, and sent in clear
  text otherwise -- which a man in the middle chooses for you by removing
  STARTTLS from the relay's EHLO reply.  A local relay without TLS needs
  the one explicit choice ``no_tls=True`` (or ``tls="none"``).
* ``force_tls=True`` is therefore the default's meaning, not an extra.
* ``implicit_tls=True`` and ``ssl=True`` both mean TLS from the first byte
  (SMTPS, usually port 465); ``no_tls`` is about STARTTLS only and is
  ignored next to them, as it was.
"""

from __future__ import annotations

from typing import Literal

__all__ = ["TLS_MODES", "TLSMode", "tls_mode"]

#: How TLS is used: required STARTTLS, implicit TLS (SMTPS), or none at all.
TLSMode = Literal["starttls", "implicit", "none"]
TLS_MODES: tuple[TLSMode, ...] = ("starttls", "implicit", "none")


def tls_mode(
    tls: TLSMode | bool | None,
    *,
    no_tls: bool = False,
    force_tls: bool = False,
    implicit_tls: bool = False,
    ssl: bool = False,
) -> TLSMode:
    """The TLS mode that ``tls`` and the older packages' flags ask for together.

    Args:
        tls: ``"starttls"``, ``"implicit"``, ``"none"``, ``True`` (STARTTLS,
            as pyramid_mailer's ``tls=True``), ``False`` (no TLS, as its
            ``tls=False``) or ``None`` (not given).
        no_tls: zope.sendmail / repoze.sendmail: do not use STARTTLS.
        force_tls: the same: require STARTTLS (what ``"starttls"`` does).
        implicit_tls: zope.sendmail: TLS from the first byte.
        ssl: repoze.sendmail / pyramid_mailer: TLS from the first byte.

    Returns:
        ``"starttls"`` when nothing says otherwise.

    Raises:
        ValueError: an unknown ``tls``, ``no_tls`` together with
            ``force_tls``, or ``tls`` given as well as a flag that asks for
            another mode.
    """
    if isinstance(tls, bool):
        tls = "starttls" if tls else "none"
    if tls is not None and tls not in TLS_MODES:
        raise ValueError(f"tls must be one of {', '.join(TLS_MODES)}; got {tls!r}")
    if no_tls and force_tls:
        raise ValueError("no_tls and force_tls contradict each other: give one of them")
    flag: str | None = None
    legacy: TLSMode | None = None
    if implicit_tls or ssl:
        flag, legacy = ("implicit_tls" if implicit_tls else "ssl"), "implicit"
    elif no_tls:
        flag, legacy = "no_tls", "none"
    elif force_tls:
        flag, legacy = "force_tls", "starttls"
    if legacy is None:
        return tls if tls is not None else "starttls"
    if tls is not None and tls != legacy:
        raise ValueError(f"tls={tls!r} contradicts {flag}=True (which means tls={legacy!r})")
    return legacy
