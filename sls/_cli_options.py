"""Command-line options derived from :class:`sls.config.RunConfig`'s fields.

Each field's flag, type, choices and help come from the field itself (its annotation
and metadata), so the CLI, ``--config`` files and sweeps share one schema. Every
option defaults to None ("not given"), so a ``--config`` file and a ``--recipe`` fill
in only what the command line leaves out; the help shows the schema's default.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import types
import typing

from sls.config import config_fields, field_types, read_config_file
from sls.errors import ConfigError

_WORDS = ("all", "auto")


def _key_values(pairs: list[str], flag: str) -> dict:
    """KEY=VALUE options; values are read as JSON when they parse (numbers, lists), else kept as text."""
    options = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ConfigError(f"{flag} wants KEY=VALUE, got {pair!r}")
        try:
            options[key] = json.loads(value)
        except json.JSONDecodeError:
            options[key] = value
    return options


def count_or(word: str):
    """An argparse type: a whole number, or ``word`` (standing for None)."""

    def parse(text: str):
        if text == word:
            return word
        try:
            return int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number or {word!r}, got {text!r}") from None

    return parse


def _choices(spec) -> list[str] | None:
    if spec is None or isinstance(spec, tuple):
        return list(spec) if spec else None
    if spec == "petl":
        from sls.petl import list_petl

        return list_petl()
    if spec == "strategies":
        from sls.retrain import list_strategies

        return list_strategies()
    if spec == "criteria":
        from sls.criteria import list_criteria

        return list_criteria()
    if spec == "tasks":
        from sls.tasks import list_tasks

        return list_tasks()
    if spec == "recipes":
        from sls.recipes import list_recipes

        return list_recipes()
    raise ValueError(spec)


def _base_type(kind):
    if typing.get_origin(kind) in (typing.Union, types.UnionType):
        return next(arg for arg in typing.get_args(kind) if arg is not type(None))
    return kind


def flag_of(name: str) -> str:
    return config_fields()[name].metadata.get("flag", "--" + name.replace("_", "-"))


def add_config_options(parser: argparse.ArgumentParser, names: typing.Iterable[str], *,
                       default_note: str | None = None) -> None:  # fmt: skip
    """Add the options of the fields ``names`` to ``parser`` (dest = the field's name).

    Args:
        default_note: shown instead of each field's default (a stage: "the task's").
    """
    fields, hints = config_fields(), field_types()
    for name in names:
        f = fields[name]
        meta = f.metadata
        if meta.get("cli", True) is False:
            continue
        default = f.default_factory() if f.default is dataclasses.MISSING else f.default
        kind = _base_type(hints[name])
        shown = default_note or (meta.get("none") if default is None else default)
        names_note = f": {', '.join(_choices(meta['names']))}" if "names" in meta else ""
        show_default = bool(default_note) or (shown not in (None, "", [], {}) and kind is not bool
                                              and "default:" not in meta["help"])
        help_text = meta["help"] + names_note + (f" (default: {shown})" if show_default else "")
        kwargs: dict = {"dest": name, "default": None, "help": help_text}
        if kind is bool and "flag" in meta:  # an inverted switch (--quiet)
            kwargs.update(action="store_const", const=not default)
        elif kind is bool:  # --amp / --no-amp: either wins over a --config file
            kwargs.update(action=argparse.BooleanOptionalAction)
        elif kind is dict:
            kwargs.update(action="append", metavar="KEY=VALUE")
        else:
            if "none" in meta:
                kwargs["type"] = count_or(meta["none"])
            elif kind in (int, float):
                kwargs["type"] = kind
            choices = _choices(meta.get("choices"))
            if choices:
                kwargs["choices"] = choices
            for key in ("nargs", "metavar"):
                if key in meta:
                    kwargs[key] = meta[key]
            if kwargs.get("nargs") == "+" and "type" not in kwargs:
                kwargs["type"] = float
        parser.add_argument(flag_of(name), **kwargs)


def given_settings(args: argparse.Namespace, names: typing.Iterable[str]) -> dict:
    """The settings of ``names`` given on the command line, as RunConfig values."""
    fields = config_fields()
    settings = {}
    for name in names:
        value = getattr(args, name, None)
        if value is None:
            continue
        meta = fields[name].metadata
        if isinstance(value, list) and meta.get("nargs") != "+":  # KEY=VALUE pairs
            value = _key_values(value, flag_of(name))
        elif isinstance(value, str) and value in _WORDS and meta.get("none") == value:
            value = None
        if "rest" in meta:  # --alpha A B C: the first prunes, the rest are reported
            settings[meta["rest"]] = list(value[1:])
            value = value[0]
        settings[name] = value
    return settings


def settings_from(args: argparse.Namespace, names: typing.Iterable[str]) -> dict:
    """``--config FILE``'s settings, overridden by those given on the command line
    (``--petl-option`` and the like merged key by key into the file's)."""
    names = list(names)
    from_file = read_config_file(args.config) if getattr(args, "config", None) else {}
    given = given_settings(args, names)
    for key, value in given.items():  # KEY=VALUE options add to the file's, key by key
        if isinstance(value, dict) and isinstance(from_file.get(key), dict):
            given[key] = {**from_file[key], **value}
    return {**from_file, **given}
