"""Message templates: `{{first_name}}` placeholders with optional fallbacks.

`{{ name }}` is replaced by the lead's value; `{{ name | fallback text }}` uses the fallback
when the lead has no value. A lead that lacks a variable with no fallback is never sent an
empty or raw placeholder: rendering raises `MissingVariableError`.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

_PLACEHOLDER = re.compile(r"\{\{\s*([A-Za-z_][A-Za-z0-9_]*)\s*(?:\|([^{}]*))?\}\}")
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


class TemplateSyntaxError(ValueError):
    """A template with unbalanced braces or an invalid placeholder."""


class MissingVariableError(KeyError):
    """A placeholder without fallback whose variable the lead lacks."""

    def __init__(self, names: list[str]) -> None:
        super().__init__(names)
        self.names = names

    def __str__(self) -> str:
        return "missing template variable " + ", ".join(self.names)


@dataclass(frozen=True)
class Placeholder:
    name: str
    fallback: str | None


def parse_placeholders(template: str) -> list[Placeholder]:
    """Return the placeholders of a template, raising TemplateSyntaxError on bad braces."""
    placeholders = []
    position = 0
    for match in _PLACEHOLDER.finditer(template):
        _check_no_stray_braces(template, position, match.start())
        before = template[match.start() - 1 : match.start()]
        after = template[match.end() : match.end() + 1]
        if before == "{" or after == "}":
            raise TemplateSyntaxError(
                f"unbalanced braces around {match.group(0)!r}: write placeholders as "
                "{{first_name}}, with two braces on each side"
            )
        fallback = match.group(2)
        placeholders.append(
            Placeholder(match.group(1), fallback.strip() if fallback is not None else None)
        )
        position = match.end()
    _check_no_stray_braces(template, position, len(template))
    return placeholders


def _check_no_stray_braces(template: str, start: int, end: int) -> None:
    segment = template[start:end]
    for token in ("{{", "}}"):
        index = segment.find(token)
        if index >= 0:
            column = start + index
            snippet = template[max(0, column - 10) : column + 20]
            if token == "{{":
                inner = template[column + 2 :].split("}}", 1)[0].strip()
                if "}}" in template[column:] and not _NAME.fullmatch(inner.split("|")[0].strip()):
                    raise TemplateSyntaxError(
                        f"invalid placeholder near {snippet!r}: a variable name has letters, "
                        "digits and underscores, as in {{first_name}}"
                    )
            raise TemplateSyntaxError(
                f"unbalanced braces near {snippet!r}: write placeholders as {{{{first_name}}}}"
            )


def _by_lower_name(variables: Mapping[str, str | None]) -> dict[str, str | None]:
    # CSV headers become lower-case variable names, so `{{Department}}` must find the value of
    # a "Department" column.
    return {name.lower(): value for name, value in variables.items()}


def missing_variables(template: str, variables: Mapping[str, str | None]) -> list[str]:
    """Return the names a lead lacks, for placeholders that have no fallback."""
    variables = _by_lower_name(variables)
    missing = []
    for placeholder in parse_placeholders(template):
        value = variables.get(placeholder.name.lower())
        if (value is None or not str(value).strip()) and placeholder.fallback is None:
            if placeholder.name not in missing:
                missing.append(placeholder.name)
    return missing


def render(template: str, variables: Mapping[str, str | None]) -> str:
    """Fill a template from a lead's variables, raising MissingVariableError instead of a gap."""
    missing = missing_variables(template, variables)
    if missing:
        raise MissingVariableError(missing)

    lookup = _by_lower_name(variables)

    def substitute(match: re.Match[str]) -> str:
        value = lookup.get(match.group(1).lower())
        if value is None or not str(value).strip():
            return (match.group(2) or "").strip()
        return str(value).strip()

    return _PLACEHOLDER.sub(substitute, template)


def render_without_variables(template: str) -> str:
    """Return the template's fixed text: each placeholder, with its fallback, becomes empty."""
    return _PLACEHOLDER.sub("", template)
