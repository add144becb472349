"""The ``config`` verb: the effective settings, and where each one came from.

With four sources (flags, environment, TOML file, defaults) the question
"why does it connect to *that* host?" deserves a direct answer.
:func:`~mailspool.config.resolve_settings` keeps the origin of every value;
this verb prints them, after the same validation every other verb does (so
it also answers "is this configuration valid?").

The password is never printed, at any verbosity or in JSON: only whether
one is set and where it came from (the variable, or the file it was read
from).
"""

from __future__ import annotations

import json
from typing import Any

import click

from mailspool.cli.common import (
    EXIT_OK,
    common_options,
    processor_options,
    relay_options,
    resolve,
)
from mailspool.cli.settings import FIELDS, LoadedSettings
from mailspool.processor.outcome import human

__all__ = ["COMMANDS", "describe"]

#: Float settings that are not durations.
_PLAIN_NUMBERS = frozenset({"rate_limit", "backoff_factor"})


def _text(name: str, value: object, kind: type) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "true" if value else "false"
    if kind is float and isinstance(value, (int, float)) and name not in _PLAIN_NUMBERS:
        return human(float(value))
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def describe(loaded: LoadedSettings) -> list[dict[str, Any]]:
    """One row per setting: ``name``, ``value``, ``text``, ``origin``, ``note``.

    The password's row has ``value`` ``None`` and ``set``: whether one is
    set.  ``port`` is the port that will be used (25 or 465 by default,
    following ``tls``; ``note`` says so).
    """
    s = loaded.settings
    rows: list[dict[str, Any]] = []
    for f in FIELDS:
        origin = loaded.origin(f.name)
        value: Any = getattr(s, f.name)
        if f.name == "password":
            is_set = value is not None
            rows.append(
                {
                    "name": f.name,
                    "value": None,
                    "set": is_set,
                    "text": "set" if is_set else "not set",
                    "origin": origin if is_set else "default",
                    "note": "",
                }
            )
            continue
        text, note = _text(f.name, value, f.kind), ""
        if f.name == "port" and value is None:
            value = s.relay_port
            text, note = str(value), f"(for tls {s.tls})"
        rows.append({"name": f.name, "value": value, "text": text, "origin": origin, "note": note})
    return rows


@click.command(short_help="Show the effective settings and where each came from.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@common_options
@relay_options
@processor_options
@click.pass_context
def config(ctx: click.Context, /, as_json: bool, **kw: Any) -> int:
    """Show the effective settings and where each one came from.

    Reads flags, environment, config file and defaults exactly as `run`
    does, validates them (a bad setting is exit code 2, as everywhere), and
    prints one line per setting: its value and its origin (a flag, an
    environment variable, a place in the config file, or default). Give the
    same options as to `run` to see what it would use. The password is
    never shown: only whether one is set and where from.
    """
    loaded = resolve(ctx, kw)
    rows = describe(loaded)
    if as_json:
        out = {
            "config_file": loaded.config_file,
            "config_origin": loaded.config_origin,
            "settings": {
                r["name"]: (
                    {"set": r["set"], "origin": r["origin"]}
                    if r["name"] == "password"
                    else {"value": r["value"], "origin": r["origin"]}
                )
                for r in rows
            },
        }
        click.echo(json.dumps(out, indent=2))
        return EXIT_OK
    if loaded.config_file:
        click.echo(f"config file: {loaded.config_file} (from {loaded.config_origin})")
    else:
        click.echo("config file: none (use --config FILE or MAILSPOOL_CONFIG)")
    name_w = max(len(r["name"]) for r in rows)
    text_w = min(40, max(len(r["text"]) for r in rows))
    for r in rows:
        origin = f"{r['origin']} {r['note']}".rstrip()
        click.echo(f"  {r['name']:<{name_w}}  {r['text']:<{text_w}}  {origin}")
    return EXIT_OK


#: The verbs of this module, for :mod:`mailspool.cli.main` to register.
COMMANDS: tuple[click.Command, ...] = (config,)
