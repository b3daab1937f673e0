"""Import leads from a CSV export such as Apollo's, a CRM's or a spreadsheet's.

One bad row never aborts an import: it is rejected with its row and line number, and every
other row is read. Only a file that cannot be read as a lead list at all raises
`LeadFileError`. Rows count data records from 1 (the first record after the header is row 1,
and a record with a quoted line break is one row). Lines count the file's physical lines
from 1.

Duplicates within the file share a normalised email address or, for rows without one, a
canonical LinkedIn URL. The first row wins: a later duplicate only fills the fields that the
first row left blank, and is reported with the row it duplicates.
"""

from __future__ import annotations

import csv
import io
import re
import unicodedata
import zoneinfo
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

import phonenumbers

from sequencer.addresses import INVISIBLE, InvalidEmailError, clean_text, normalize_email
from sequencer.campaign import Campaign
from sequencer.channels import Channel
from sequencer.linkedin_urls import NEEDS_RESOLUTION, parse_linkedin_url
from sequencer.models import Lead

LEAD_FIELDS = ("email", "first_name", "last_name", "company", "linkedin_url", "phone", "timezone")

# Accepted header spellings per Lead field, compared after `_header_key` removes case, spaces,
# underscores and punctuation. A field with several columns takes the first non-empty value,
# except phone, which takes the first valid number.
FIELD_ALIASES: dict[str, tuple[str, ...]] = {
    "email": ("email", "e-mail", "email address", "e-mail address", "work email"),
    "first_name": ("first name", "firstname", "given name", "first"),
    "last_name": ("last name", "lastname", "surname", "family name", "last"),
    "company": ("company", "company name", "organization", "organisation", "account name"),
    "linkedin_url": (
        "linkedin",
        "linkedin url",
        "person linkedin url",
        "linkedin profile",
        "linkedin profile url",
    ),
    "phone": (
        "phone",
        "mobile phone",
        "phone number",
        "work direct phone",
        "corporate phone",
        "mobile",
        "home phone",
        "other phone",
    ),
    "timezone": ("timezone", "time zone", "tz"),
}
# Columns that are kept as template variables but also steer the import.
COUNTRY_ALIASES = ("country", "country code")
EMAIL_STATUS_ALIASES = ("email status", "email verification status")

# Email Status values, as enrichment tools write them, that mean the address was guessed or
# could not be verified. They are compared after `_header_key`, so "Catch-all" matches too.
UNVERIFIED_STATUSES = frozenset(
    {"extrapolated", "unverified", "guessed", "catchall", "acceptall", "risky", "unknown"}
)
# Some exports write a dash for "no value".
EMPTY_MARKERS = frozenset({"-", "--", "—"})
# A number that a spreadsheet turned into scientific notation has lost its last digits.
SCIENTIFIC_NOTATION = re.compile(r"[+-]?\d+(?:[.,]\d+)?[eE][+-]?\d+")
EXAMPLE_PHONE = "+49 30 1234567"
# The maximum length of a value, in characters: the csv module's default field_size_limit.
MAX_VALUE_LENGTH = 131072
# Example fallbacks offered in the missing-variable warning.
EXAMPLE_FALLBACKS = {"first_name": "there", "company": "your team"}
UNREACHABLE = {
    Channel.EMAIL: ("email", "no email address"),
    Channel.LINKEDIN: ("linkedin_url", "no LinkedIn URL"),
    Channel.PHONE: ("phone", "no phone number"),
}


class LeadFileError(ValueError):
    """A lead file that cannot be imported at all: unreadable, not UTF-8, empty or headerless."""


@dataclass
class ImportedLead:
    """One imported lead with the row it came from and the problems found in it."""

    row: int
    line: int
    lead: Lead
    warnings: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class RejectedRow:
    """A row that was not imported, with a sentence saying why and what to fix."""

    row: int
    line: int
    reason: str


@dataclass(frozen=True)
class DuplicateRow:
    """A row merged into an earlier row with the same key (email address or LinkedIn URL).

    `filled` names the fields and variables of the earlier row that this row filled in.
    """

    row: int
    line: int
    of_row: int
    key: str
    filled: tuple[str, ...] = ()


@dataclass
class ImportReport:
    """The outcome of one import: imported leads, rejected rows and merged duplicates.

    `columns` pairs each header name, in file order, with the Lead field or template variable
    it fills, such as ("Mobile Phone", "phone") or ("City", "variable city").
    """

    source: str
    columns: list[tuple[str, str]] = field(default_factory=list)
    leads: list[ImportedLead] = field(default_factory=list)
    rejected: list[RejectedRow] = field(default_factory=list)
    duplicates: list[DuplicateRow] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        """Return the warnings, rejected rows and duplicates, as the JSON outputs show them."""
        return {
            "warnings": [
                {"row": lead.row, "lead": lead.lead.key, "warnings": lead.warnings}
                for lead in self.leads
                if lead.warnings
            ],
            "rejected": [{"row": r.row, "line": r.line, "reason": r.reason} for r in self.rejected],
            "duplicates": [
                {"row": d.row, "line": d.line, "duplicate_of_row": d.of_row}
                for d in self.duplicates
            ],
        }

    @property
    def warning_count(self) -> int:
        return sum(len(imported.warnings) for imported in self.leads)

    def summary(self, limit: int = 20) -> str:
        """Render the counts, then up to `limit` rejections, duplicates and warnings each."""
        lines = [
            f"{self.source}: {_count(len(self.leads), 'lead')} imported, "
            f"{_count(len(self.rejected), 'row')} rejected, "
            f"{_count(len(self.duplicates), 'duplicate')} merged, "
            f"{_count(self.warning_count, 'warning')}"
        ]
        rejected = [
            f"row {rejection.row} (line {rejection.line}): {rejection.reason}"
            for rejection in self.rejected
        ]
        duplicates = [
            f"row {duplicate.row} (line {duplicate.line}): duplicate of row "
            f"{duplicate.of_row} ({duplicate.key})"
            for duplicate in self.duplicates
        ]
        warnings = [
            f"row {imported.row} (line {imported.line}): {warning}"
            for imported in self.leads
            for warning in imported.warnings
        ]
        for title, entries in (
            ("Rejected", rejected),
            ("Duplicates", duplicates),
            ("Warnings", warnings),
        ):
            if entries:
                lines.append(f"{title}:")
                lines.extend(f"  {entry}" for entry in entries[:limit])
                if len(entries) > limit:
                    lines.append(f"  ... and {len(entries) - limit} more")
        return "\n".join(lines)


def _count(number: int, noun: str) -> str:
    return f"{number} {noun}" if number == 1 else f"{number} {noun}s"


def read_leads(
    source: Path | str | bytes,
    campaign: Campaign | None = None,
    *,
    source_name: str | None = None,
) -> ImportReport:
    """Read a lead CSV file and return the leads, rejected rows and duplicates it contains.

    `source` is a path (a str is taken as a path too) or the file's bytes. `source_name`
    names bytes in messages, such as the name of an uploaded file. With `campaign`, each lead
    gets warnings for the steps it lacks an address or a template variable for.
    Raises LeadFileError when the file cannot be read, is not UTF-8, is empty, or has neither
    an email nor a LinkedIn column.
    """
    data, name = _load(source, source_name)
    text = _decode(data, name)
    first_line, _, rest = text.partition("\n")
    # Excel writes and reads a first line such as "sep=;" that names the delimiter.
    separator_hint = re.fullmatch(r"sep=(.)\r?", first_line)
    if separator_hint:
        delimiter, body, header_number = separator_hint.group(1), rest, 2
    else:
        delimiter, body, header_number = _sniff_delimiter(first_line), text, 1
    if not body.partition("\n")[0].strip():
        raise LeadFileError(
            f"{name} has an empty line {header_number}: that line must be the header, such as "
            "email,first_name,last_name,company,linkedin_url"
        )

    records = _read_records(body, delimiter, header_number)
    _, header, header_error = next(records)
    if header is None:
        raise LeadFileError(f"{name} has an invalid header line: {header_error}")
    columns = _map_columns(header, name)
    report = ImportReport(source=name, columns=[(c.header, c.target) for c in columns.all])

    pending: list[_Pending] = []
    for row, (line, cells, csv_error) in enumerate(records, start=1):
        if cells is None:
            report.rejected.append(RejectedRow(row, line, csv_error or "invalid CSV record"))
            continue
        if not any(cell.strip() for cell in cells):
            continue  # a blank line or a row of empty cells
        result = _read_row(cells, columns, row, line, delimiter)
        if isinstance(result, RejectedRow):
            report.rejected.append(result)
        else:
            pending.append(result)

    accepted = _merge_duplicates(pending, report)
    variables = campaign.variables_by_step() if campaign is not None else {}
    for entry in accepted:
        lead = entry.build_lead()
        if campaign is not None:
            warnings = _campaign_warnings(lead, campaign, variables)
            entry.warnings.extend((None, warning) for warning in warnings)
        report.leads.append(
            ImportedLead(entry.row, entry.line, lead, [message for _, message in entry.warnings])
        )
    return report


# --- reading the file -------------------------------------------------------------------


def _load(source: Path | str | bytes, source_name: str | None) -> tuple[bytes, str]:
    if isinstance(source, bytes | bytearray):
        return bytes(source), source_name or "<lead file>"
    path = Path(source)
    name = source_name or str(path)
    try:
        return path.read_bytes(), name
    except FileNotFoundError:
        raise LeadFileError(f"lead file {name} not found: check the path") from None
    except IsADirectoryError:
        raise LeadFileError(f"{name} is a directory, not a lead file: give a CSV file") from None
    except OSError as error:
        raise LeadFileError(f"cannot read lead file {name}: {error.strerror}") from None


def _decode(data: bytes, name: str) -> str:
    save_as_utf8 = "save it as 'CSV UTF-8' in Excel or LibreOffice and import that file"
    if data.startswith(b"PK\x03\x04"):
        raise LeadFileError(
            f"{name} is a spreadsheet workbook or ZIP archive, not CSV: {save_as_utf8}"
        )
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        raise LeadFileError(f"{name} is UTF-16 text, not UTF-8: {save_as_utf8}")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        line = data.count(b"\n", 0, error.start) + 1
        raise LeadFileError(
            f"{name} is not UTF-8 text (byte 0x{data[error.start]:02X} on line {line} is "
            f"invalid): {save_as_utf8}, or convert it with iconv -f WINDOWS-1252 -t UTF-8"
        ) from None
    if not text.strip():
        raise LeadFileError(
            f"{name} is empty: a lead file needs a header line with an email or LinkedIn "
            "column, such as email,first_name,last_name,company,linkedin_url"
        )
    if "\x00" in text:
        raise LeadFileError(
            f"{name} contains NUL bytes, so it is probably UTF-16 text without a byte order "
            f"mark: {save_as_utf8}"
        )
    return text


def _sniff_delimiter(header_line: str) -> str:
    """Return the delimiter used most often outside quotes in the header: ',', ';' or tab."""
    counts = {",": 0, ";": 0, "\t": 0}
    quoted = False
    for char in header_line:
        if char == '"':
            quoted = not quoted
        elif not quoted and char in counts:
            counts[char] += 1
    best = max(counts, key=lambda delimiter: counts[delimiter])
    return best if counts[best] else ","


def _read_records(
    text: str, delimiter: str, first_line_number: int
) -> Iterator[tuple[int, list[str] | None, str | None]]:
    """Yield (start line, cells, None) per CSV record, or (start line, None, error message).

    `first_line_number` is the file's line number of the first line of `text`.
    """
    # At a field longer than field_size_limit, the csv module raises and goes on at the next
    # physical line, which may lie inside a quoted value, so the rest of that record would be
    # read as new rows. No field is longer than the text, so the limit is raised to the text's
    # length (it is process-wide and only ever raised) and MAX_VALUE_LENGTH is checked below.
    if csv.field_size_limit() < len(text):
        csv.field_size_limit(len(text))
    # newline="" keeps quoted line breaks inside fields, as the csv module requires.
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter, strict=True)
    while True:
        line = reader.line_num + first_line_number
        try:
            cells = next(reader)
        except StopIteration:
            return
        except csv.Error as error:
            if str(error).startswith("field larger than field limit"):
                # Only when other code lowered the limit after the check above.
                message = _too_long_message(csv.field_size_limit())
            elif str(error) == "unexpected end of data":
                last_line = reader.line_num + first_line_number - 1
                message = (
                    f"a quote opened on line {line} is never closed, so lines {line} to "
                    f"{last_line} were read as one value: close the quote"
                )
            else:
                message = (
                    f"invalid CSV quoting ({error}): put quotes around a value that contains "
                    'quotes, and double each quote inside it ("")'
                )
            yield line, None, message
            continue
        if any(len(cell) > MAX_VALUE_LENGTH for cell in cells):
            yield line, None, _too_long_message(MAX_VALUE_LENGTH)
            continue
        yield line, cells, None


def _too_long_message(limit: int) -> str:
    return (
        f"a value is longer than {limit} characters, the longest accepted: shorten it, or "
        "close the quote that opens it"
    )


# --- mapping columns --------------------------------------------------------------------


def _header_key(name: str) -> str:
    """Return a header name without case, spaces, underscores or punctuation."""
    text = unicodedata.normalize("NFKC", name).casefold()
    return "".join(char for char in text if char.isalnum())


_ALIAS_FIELD = {
    _header_key(alias): field_name
    for field_name, aliases in FIELD_ALIASES.items()
    for alias in aliases
}

_COUNTRY_KEYS = frozenset(_header_key(alias) for alias in COUNTRY_ALIASES)
_EMAIL_STATUS_KEYS = frozenset(_header_key(alias) for alias in EMAIL_STATUS_ALIASES)


def variable_name(header: str) -> str:
    """Turn a header into a template variable name, such as company_name_for_emails.

    Accents are dropped and camelCase is split, because placeholder names are ASCII
    identifiers. Returns "" for a header without letters or digits.
    """
    ascii_name = unicodedata.normalize("NFKD", header).encode("ascii", "ignore").decode()
    ascii_name = re.sub(r"(?<=[a-z0-9])(?=[A-Z])", "_", ascii_name)
    name = re.sub(r"[^A-Za-z0-9]+", "_", ascii_name).strip("_").lower()
    if name[:1].isdigit():
        name = "column_" + name
    return name


@dataclass
class _Column:
    index: int
    header: str
    target: str  # a Lead field name, or "variable <name>"
    variable: str | None = None


@dataclass
class _Columns:
    all: list[_Column]
    fields: dict[str, list[int]]
    variables: list[_Column]
    country: int | None
    email_status: int | None


def _map_columns(header: list[str], name: str) -> _Columns:
    columns: list[_Column] = []
    fields: dict[str, list[int]] = {}
    variables: list[_Column] = []
    used_names: set[str] = set(LEAD_FIELDS)
    country = email_status = None

    for index, raw_header in enumerate(header):
        # A second byte order mark, left by tools that add one to an already-marked file.
        header_text = INVISIBLE.sub("", clean_text(raw_header))
        key = _header_key(header_text)
        field_name = _ALIAS_FIELD.get(key)
        if field_name is not None:
            fields.setdefault(field_name, []).append(index)
            columns.append(_Column(index, header_text, field_name))
            continue

        if key in _COUNTRY_KEYS and country is None:
            country = index
        if key in _EMAIL_STATUS_KEYS and email_status is None:
            email_status = index
        base = variable_name(header_text) or f"column_{index + 1}"
        variable, suffix = base, 2
        while variable in used_names:
            variable, suffix = f"{base}_{suffix}", suffix + 1
        used_names.add(variable)
        column = _Column(index, header_text, f"variable {variable}", variable)
        columns.append(column)
        variables.append(column)

    if "email" not in fields and "linkedin_url" not in fields:
        found = ", ".join(repr(clean_text(h)) for h in header) or "none"
        raise LeadFileError(
            f"{name} has no email or LinkedIn column (columns found: {found}): name a column "
            "'email' or 'linkedin_url', or use a usual spelling such as 'Email Address' or "
            "'Person Linkedin Url'"
        )
    return _Columns(columns, fields, variables, country, email_status)


# --- reading one row --------------------------------------------------------------------


@dataclass
class _Pending:
    """An accepted row before duplicate merging. Warnings carry the field they concern."""

    row: int
    line: int
    values: dict[str, str | None]
    variables: dict[str, str]
    warnings: list[tuple[str | None, str]] = field(default_factory=list)

    def warn(self, field_name: str | None, message: str) -> None:
        self.warnings.append((field_name, message))

    def build_lead(self) -> Lead:
        return Lead(**self.values, variables=self.variables)


def _read_row(
    cells: list[str], columns: _Columns, row: int, line: int, delimiter: str
) -> _Pending | RejectedRow:
    extra = [cell for cell in cells[len(columns.all) :] if cell.strip()]
    if extra:
        delimiter_name = "tab" if delimiter == "\t" else repr(delimiter)
        return RejectedRow(
            row,
            line,
            f"the row has {len(cells)} fields but the header has {len(columns.all)}, so a value "
            f"probably contains an unquoted {delimiter_name}: put quotes around that value",
        )

    def cell(index: int | None) -> str:
        return clean_text(cells[index]) if index is not None and index < len(cells) else ""

    def first(field_name: str) -> str:
        return next(
            (value for index in columns.fields.get(field_name, []) if (value := cell(index))), ""
        )

    entry = _Pending(row, line, dict.fromkeys(LEAD_FIELDS), {})
    email_problem = _read_email(entry, first("email"), cell(columns.email_status))
    url_problem = _read_linkedin_url(entry, first("linkedin_url"))

    if entry.values["email"] is None and entry.values["linkedin_url"] is None:
        return RejectedRow(row, line, _rejection_reason(email_problem, url_problem))
    if email_problem is not None:
        entry.warn("email", f"{_sentence(email_problem)} The lead is kept for LinkedIn steps only")

    for field_name in ("first_name", "last_name", "company"):
        entry.values[field_name] = first(field_name) or None
    phones = [cell(index) for index in columns.fields.get("phone", [])]
    _read_phone(entry, phones, cell(columns.country))
    _read_timezone(entry, first("timezone"))
    for column in columns.variables:
        value = cell(column.index)
        if value and column.variable is not None:
            entry.variables[column.variable] = value
    return entry


def _read_email(entry: _Pending, raw: str, status: str) -> str | None:
    """Store the normalised address and return why the address is invalid, if it is."""
    if not raw:
        return None
    try:
        email = normalize_email(raw)
    except InvalidEmailError as error:
        return str(error)

    entry.values["email"] = email
    invisible = dict.fromkeys(f"U+{ord(char):04X}" for char in INVISIBLE.findall(raw))
    if invisible:
        entry.warn(
            "email",
            f"removed invisible characters ({', '.join(invisible)}) from the email address "
            f"{raw!r}, leaving {email!r}: check the address with its source",
        )
    if _header_key(status) in UNVERIFIED_STATUSES:
        entry.warn("email", f"unverified address (higher bounce risk): Email Status is {status!r}")
    return None


def _read_linkedin_url(entry: _Pending, raw: str) -> str | None:
    """Store the cleaned URL and return why the URL was rejected, if it was."""
    if not raw:
        return None
    parsed = parse_linkedin_url(raw)
    if not parsed.usable:
        entry.warn("linkedin_url", f"LinkedIn URL dropped: {parsed.reason}")
        return parsed.reason

    entry.values["linkedin_url"] = parsed.cleaned
    if parsed.verdict == NEEDS_RESOLUTION:
        entry.warn("linkedin_url", f"LinkedIn URL kept, but it needs resolution: {parsed.reason}")
    for warning in parsed.warnings:
        entry.warn("linkedin_url", f"LinkedIn URL {parsed.cleaned}: {warning}")
    return None


def _rejection_reason(email_problem: str | None, url_problem: str | None) -> str:
    if email_problem is not None and url_problem is not None:
        return f"{_sentence(email_problem)} The LinkedIn URL is invalid too: {url_problem}"
    if email_problem is not None:
        return (
            f"{_sentence(email_problem)} The row has no LinkedIn URL either, so correct the "
            "address or add a LinkedIn URL"
        )
    if url_problem is not None:
        return f"no email address, and the LinkedIn URL is invalid: {url_problem}"
    return "no email address and no LinkedIn URL: every lead needs at least one of them"


def _sentence(text: str) -> str:
    return text if text.endswith((".", "!", "?")) else text + "."


def _read_phone(entry: _Pending, values: list[str], country: str) -> None:
    """Store the first valid number of the phone columns in E.164 form.

    Numbers without a leading + are read in the row's country. Each invalid number gets a
    warning and is dropped, never repaired.
    """
    region = _region_for_country(country) if country else None
    for value in values:
        if not value or value in EMPTY_MARKERS:
            continue
        number, warning = _parse_phone(value, region, country)
        if warning is not None:
            entry.warn("phone", warning)
        if number is not None:
            entry.values["phone"] = number
            return


def _parse_phone(value: str, region: str | None, country: str) -> tuple[str | None, str | None]:
    """Return the E.164 form of a number, or None, and a warning if there is one."""
    if SCIENTIFIC_NOTATION.fullmatch(value):
        return None, (
            f"phone {value!r} was damaged by a spreadsheet (scientific notation drops digits), "
            "so it was dropped: export the column formatted as text"
        )
    if not value.startswith("+") and region is None:
        where = (
            f"the Country {country!r} is not recognised" if country else "the row has no Country"
        )
        return None, (
            f"phone {value!r} has no country code and {where}, so it was dropped: write it in "
            f"international form, such as {EXAMPLE_PHONE}"
        )
    try:
        number = phonenumbers.parse(value, region)
    except phonenumbers.NumberParseException:
        return None, (
            f"invalid phone number {value!r}, so it was dropped: write it in international "
            f"form, such as {EXAMPLE_PHONE}"
        )
    if not phonenumbers.is_valid_number(number):
        return None, (
            f"invalid phone number {value!r} (no such number range), so it was dropped: check "
            "the number and its country code"
        )
    e164 = phonenumbers.format_number(number, phonenumbers.PhoneNumberFormat.E164)
    if number.extension:
        return e164, f"phone extension {number.extension} of {value!r} dropped: E.164 has none"
    return e164, None


@cache
def _country_regions() -> dict[str, str]:
    """Map country names in many languages, and ISO codes, to phonenumbers region codes."""
    # LOCALE_DATA is the region-name table that phonenumbers' geocoder uses. It is not
    # documented API, so a phonenumbers upgrade may move it. Imported here, on the first
    # country lookup, because importing it loads all of the geocoder's data (about 100 MB),
    # which every worker and CLI process would otherwise hold.
    from phonenumbers.geodata.locale import LOCALE_DATA

    regions: dict[str, str] = {}
    supported = phonenumbers.SUPPORTED_REGIONS
    for code, names in LOCALE_DATA.items():
        if code not in supported:
            continue
        regions.setdefault(_header_key(code), code)
        for language in ("en", *sorted(names)):
            name = names.get(language, "")
            # "*xx" means "the same name as in language xx".
            if name.startswith("*"):
                name = names.get(name[1:], "")
            if name:
                regions.setdefault(_header_key(name), code)
    for alias, code in (
        ("usa", "US"),
        ("united states of america", "US"),
        ("uk", "GB"),
        ("great britain", "GB"),
        ("england", "GB"),
        ("scotland", "GB"),
        ("wales", "GB"),
        ("northern ireland", "GB"),
    ):
        regions.setdefault(_header_key(alias), code)
    return regions


@cache
def _region_for_country(country: str) -> str | None:
    return _country_regions().get(_header_key(country))


def _read_timezone(entry: _Pending, value: str) -> None:
    if not value:
        return
    name = _timezones().get(value.casefold())
    if name is None:
        entry.warn(
            "timezone",
            f"invalid time zone {value!r}, so it was dropped: use an IANA name such as "
            "Europe/Berlin or America/New_York",
        )
    else:
        entry.values["timezone"] = name


@cache
def _timezones() -> dict[str, str]:
    """Map lower-cased IANA names to their spelling, so "europe/berlin" is accepted."""
    return {name.casefold(): name for name in zoneinfo.available_timezones()}


# --- duplicates and campaign checks -----------------------------------------------------


def _merge_duplicates(pending: list[_Pending], report: ImportReport) -> list[_Pending]:
    """Return the first row of each key, filled in from later duplicates, and report those."""
    accepted: list[_Pending] = []
    by_email: dict[str, _Pending] = {}
    by_url: dict[str, _Pending] = {}

    for entry in pending:
        email, url = entry.values["email"], entry.values["linkedin_url"]
        first, key = (by_email.get(email), email) if email else (None, None)
        same_url = by_url.get(url) if url else None
        # A row with an earlier row's LinkedIn URL is its duplicate unless both rows have an
        # email address. Two different addresses stay two leads, because the address is the key.
        if first is None and same_url is not None:
            if email is None or same_url.values["email"] is None:
                first, key = same_url, url
            else:
                entry.warn(
                    "linkedin_url",
                    f"same LinkedIn URL as row {same_url.row} (line {same_url.line}), which has "
                    "another email address: LinkedIn steps may reach this person twice",
                )

        if first is None:
            accepted.append(entry)
            _register(entry, by_email, by_url)
            continue
        filled = _fill_blanks(first, entry)
        report.duplicates.append(
            DuplicateRow(entry.row, entry.line, first.row, key or "", tuple(filled))
        )
        _register(first, by_email, by_url)
    return accepted


def _register(entry: _Pending, by_email: dict[str, _Pending], by_url: dict[str, _Pending]) -> None:
    email, url = entry.values["email"], entry.values["linkedin_url"]
    if email:
        by_email.setdefault(email, entry)
    if url:
        by_url.setdefault(url, entry)


def _fill_blanks(first: _Pending, duplicate: _Pending) -> list[str]:
    """Copy the duplicate's values into the first row's blank fields and return their names."""
    filled = []
    for field_name in LEAD_FIELDS:
        if first.values[field_name] is None and duplicate.values[field_name] is not None:
            first.values[field_name] = duplicate.values[field_name]
            filled.append(field_name)
            # The duplicate's warnings about a value now used travel with that value.
            for warning_field, message in duplicate.warnings:
                if warning_field == field_name:
                    first.warn(field_name, f"row {duplicate.row}: {message}")
    for name, value in duplicate.variables.items():
        if name not in first.variables:
            first.variables[name] = value
            filled.append(name)
    if filled:
        first.warn(
            None,
            f"filled {', '.join(filled)} from duplicate row {duplicate.row} "
            f"(line {duplicate.line})",
        )
    return filled


def _campaign_warnings(
    lead: Lead, campaign: Campaign, variables: dict[int, dict[str, list[str]]]
) -> list[str]:
    """Return a warning per channel the lead cannot be reached on, and per missing variable.

    `variables` is the campaign's `variables_by_step()`, worked out once per file.
    """
    warnings = []
    unreachable_steps: set[int] = set()
    for channel, (field_name, problem) in UNREACHABLE.items():
        if getattr(lead, field_name):
            continue
        numbers = [n for n, step in enumerate(campaign.steps, start=1) if step.channel == channel]
        if numbers:
            unreachable_steps.update(numbers)
            label = "step" if len(numbers) == 1 else "steps"
            listed = ", ".join(str(n) for n in numbers)
            warnings.append(f"{problem}: {label} {listed} cannot run for this lead")

    present = {name.lower() for name, value in lead.template_variables().items() if value.strip()}
    missing: dict[str, list[str]] = {}
    for number, fields in variables.items():
        if number in unreachable_steps:
            continue
        for template_field, names in fields.items():
            for name in names:
                if name.lower() not in present:
                    places = missing.setdefault(name.lower(), [])
                    places.append(f"step {number} {template_field}")
    for name, places in missing.items():
        fallback = EXAMPLE_FALLBACKS.get(name, "...")
        warnings.append(
            f"missing template variable {name!r} used by {', '.join(places)}: fill the "
            f"column, or give the placeholder a fallback such as {{{{{name}|{fallback}}}}}"
        )
    return warnings
