from __future__ import annotations

import csv
import io
import unicodedata
from pathlib import Path

import pytest

from sequencer.campaign import Campaign, parse_campaign
from sequencer.leads import ImportedLead, ImportReport, LeadFileError, read_leads, variable_name

CORPUS = Path(__file__).resolve().parents[2] / "shared" / "corpus" / "csv"
APOLLO_FILE = CORPUS / "apollo_like_semicolon_bom_crlf.csv"
EXPECTED_FILE = CORPUS / "expected.tsv"


def _require_corpus() -> None:
    if not APOLLO_FILE.is_file() or not EXPECTED_FILE.is_file():
        pytest.skip(f"lead CSV corpus not found in {CORPUS}: check out shared/ beside main/")


def _expected_rows() -> list[dict[str, str]]:
    if not EXPECTED_FILE.is_file():
        return []
    text = EXPECTED_FILE.read_bytes().decode("utf-8")
    rows = csv.DictReader(io.StringIO(text, newline=""), delimiter="\t")
    return [row for row in rows if row["file"] == APOLLO_FILE.name and row["data_row"] != "header"]


EXPECTED_ROWS = _expected_rows()


@pytest.fixture(scope="module")
def apollo_report() -> ImportReport:
    _require_corpus()
    return read_leads(APOLLO_FILE)


def _lead_at(report: ImportReport, row: int) -> ImportedLead:
    matches = [imported for imported in report.leads if imported.row == row]
    assert len(matches) == 1, f"row {row} is not among the imported leads"
    return matches[0]


def _write(tmp_path: Path, text: str, name: str = "leads.csv") -> Path:
    path = tmp_path / name
    path.write_bytes(text.encode("utf-8"))
    return path


def _campaign(*steps: dict[str, str]) -> Campaign:
    return parse_campaign(
        {"name": "Test campaign", "sender": {"email": "rep@acme.test"}, "steps": list(steps)}
    )


# --- the Apollo-like corpus file ---------------------------------------------------------


def test_corpus_fixture_is_unchanged() -> None:
    _require_corpus()
    data = APOLLO_FILE.read_bytes()

    assert data.startswith(b"\xef\xbb\xbf")
    assert b"\r\n" in data


@pytest.mark.parametrize(
    "expected",
    EXPECTED_ROWS or [None],
    ids=[f"row-{row['data_row']}" for row in EXPECTED_ROWS] or ["corpus-missing"],
)
def test_corpus_expected_row(apollo_report: ImportReport, expected: dict[str, str] | None) -> None:
    assert expected is not None
    row = int(expected["data_row"])
    outcome = expected["expected"]
    email = expected["normalised_email"] or None

    if outcome.startswith("duplicate-of-row-"):
        duplicates = [duplicate for duplicate in apollo_report.duplicates if duplicate.row == row]
        assert len(duplicates) == 1
        assert duplicates[0].of_row == int(outcome.removeprefix("duplicate-of-row-"))
        assert duplicates[0].key == email
        assert all(imported.row != row for imported in apollo_report.leads)
    elif outcome == "reject":
        rejections = [rejection for rejection in apollo_report.rejected if rejection.row == row]
        assert len(rejections) == 1
        assert repr(email) in rejections[0].reason
    elif outcome == "import":
        imported = _lead_at(apollo_report, row)
        assert imported.lead.email == email
        assert imported.warnings == []
    elif outcome in ("import-with-warning", "reject-or-clean"):
        # reject-or-clean rows are cleaned: invisible characters are stripped, with a warning.
        imported = _lead_at(apollo_report, row)
        assert imported.lead.email == email
        assert imported.warnings
    elif outcome == "import-linkedin-only":
        imported = _lead_at(apollo_report, row)
        assert imported.lead.email is None
        assert imported.lead.linkedin_url
    else:
        pytest.fail(f"unknown expected outcome {outcome!r} in {EXPECTED_FILE.name}")


def test_corpus_expected_row_count() -> None:
    _require_corpus()
    assert len(EXPECTED_ROWS) == 14


def test_corpus_counts(apollo_report: ImportReport) -> None:
    assert len(apollo_report.leads) == 10
    assert len(apollo_report.duplicates) == 3
    assert len(apollo_report.rejected) == 1


def test_corpus_header_without_bom(apollo_report: ImportReport) -> None:
    columns = dict(apollo_report.columns)

    assert apollo_report.columns[0] == ("First Name", "first_name")
    assert columns["Person Linkedin Url"] == "linkedin_url"
    assert columns["Mobile Phone"] == "phone"
    assert columns["Company Name for Emails"] == "variable company_name_for_emails"


def test_corpus_line_numbers(apollo_report: ImportReport) -> None:
    assert _lead_at(apollo_report, 1).line == 2
    assert _lead_at(apollo_report, 6).line == 7
    assert _lead_at(apollo_report, 7).line == 9
    assert apollo_report.rejected[0].line == 16


def test_corpus_rejection_message(apollo_report: ImportReport) -> None:
    summary = apollo_report.summary()

    assert "row 14 (line 16): invalid email address 'bad.address@@bad.example': " in summary
    assert "row 2 (line 3): duplicate of row 1 (anna.schmidt@example.com)" in summary


def test_corpus_linkedin_normalised(apollo_report: ImportReport) -> None:
    first = _lead_at(apollo_report, 1).lead
    umlaut = _lead_at(apollo_report, 4).lead

    assert first.linkedin_url == "https://www.linkedin.com/in/anna-schmidt-example"
    assert umlaut.linkedin_url == "https://www.linkedin.com/in/jürgen-weiß-example"


def test_corpus_idn_email_unicode(apollo_report: ImportReport) -> None:
    assert _lead_at(apollo_report, 4).lead.email == "juergen@müller-bau.de"


def test_corpus_quoted_newline_and_delimiter(apollo_report: ImportReport) -> None:
    lead = _lead_at(apollo_report, 6).lead

    assert lead.variables["title"] == "Head of Sales\nEMEA"
    assert lead.company == "Smith; Jones & Co"
    assert lead.phone == "+33612345678"


def test_corpus_formula_stored_verbatim(apollo_report: ImportReport) -> None:
    lead = _lead_at(apollo_report, 7).lead

    assert lead.company == "=1+1"
    assert lead.variables["company_name_for_emails"] == "@SUM(1+1)"
    assert lead.phone is None


def test_corpus_zero_width_email_warning(apollo_report: ImportReport) -> None:
    imported = _lead_at(apollo_report, 9)

    assert imported.lead.email == "zed@zw.example"
    assert len(imported.warnings) == 1
    assert "invisible characters (U+200B)" in imported.warnings[0]


def test_corpus_linkedin_only_lead(apollo_report: ImportReport) -> None:
    lead = _lead_at(apollo_report, 10).lead

    assert lead.email is None
    assert lead.linkedin_url == "https://www.linkedin.com/sales/lead/ACwAAB_synthetic01"
    assert lead.key == lead.linkedin_url


def test_corpus_extrapolated_status_warning(apollo_report: ImportReport) -> None:
    imported = _lead_at(apollo_report, 11)

    assert len(imported.warnings) == 1
    assert imported.warnings[0].startswith("unverified address (higher bounce risk)")


def test_corpus_nfd_row_merged(apollo_report: ImportReport) -> None:
    imported = _lead_at(apollo_report, 12)
    warnings = "\n".join(imported.warnings)

    assert imported.lead.first_name == unicodedata.normalize("NFC", "Rene\u0301")
    assert imported.lead.first_name == "Ren\u00e9"
    assert "company page" in warnings
    assert "'3.3612345678E+10'" in warnings
    assert "filled linkedin_url, phone from duplicate row 13" in warnings
    assert imported.lead.linkedin_url == "https://www.linkedin.com/in/rene-decomposed-example"
    assert imported.lead.phone == "+33612345678"


def test_corpus_bytes_match_path(apollo_report: ImportReport) -> None:
    from_bytes = read_leads(APOLLO_FILE.read_bytes(), source_name="upload.csv")

    assert from_bytes.source == "upload.csv"
    assert from_bytes.leads == apollo_report.leads
    assert from_bytes.rejected == apollo_report.rejected
    assert from_bytes.duplicates == apollo_report.duplicates


# --- file format ---------------------------------------------------------------------------


def test_comma_file_without_bom(tmp_path: Path) -> None:
    path = _write(
        tmp_path,
        "email,first_name,last_name,company\n"
        "jane@example.com,Jane,Doe,Acme\n"
        '"john@example.com","John","Doe","Acme, Inc."\n',
    )

    report = read_leads(path)

    assert [imported.lead.email for imported in report.leads] == [
        "jane@example.com",
        "john@example.com",
    ]
    assert report.leads[1].lead.company == "Acme, Inc."
    assert report.leads[1].line == 3
    assert report.rejected == []


def test_tab_delimited_file(tmp_path: Path) -> None:
    path = _write(tmp_path, "Email\tFirst Name\r\njane@example.com\tJane\r\n")

    report = read_leads(path)

    assert report.leads[0].lead.first_name == "Jane"


def test_cr_only_line_endings(tmp_path: Path) -> None:
    path = _write(tmp_path, "email,company\rjane@example.com,Acme\rjohn@example.com,Beta\r")

    report = read_leads(path)

    assert [imported.lead.company for imported in report.leads] == ["Acme", "Beta"]
    assert report.leads[1].line == 3


def test_second_bom_ignored(tmp_path: Path) -> None:
    path = tmp_path / "leads.csv"
    path.write_bytes(b"\xef\xbb\xbf\xef\xbb\xbfemail\njane@example.com\n")

    report = read_leads(path)

    assert report.columns == [("email", "email")]


def test_excel_separator_line(tmp_path: Path) -> None:
    path = _write(tmp_path, "sep=;\r\nemail;company\r\njane@example.com;Acme, Inc.\r\n")

    report = read_leads(path)

    assert report.leads[0].lead.company == "Acme, Inc."
    assert report.leads[0].line == 3


@pytest.mark.parametrize(
    ("header", "field"),
    [
        ("firstName", "first_name"),
        ("First Name", "first_name"),
        ("FIRST_NAME", "first_name"),
        ("Given Name", "first_name"),
        ("Last Name", "last_name"),
        ("surname", "last_name"),
        ("Company Name", "company"),
        ("Organization", "company"),
        ("LinkedIn", "linkedin_url"),
        ("LinkedIn URL", "linkedin_url"),
        ("LinkedIn Profile", "linkedin_url"),
        ("Time Zone", "timezone"),
        ("tz", "timezone"),
    ],
)
def test_header_spellings(tmp_path: Path, header: str, field: str) -> None:
    values = {
        "first_name": "Jane",
        "last_name": "Doe",
        "company": "Acme",
        "linkedin_url": "https://www.linkedin.com/in/jane-doe",
        "timezone": "Europe/Berlin",
    }
    path = _write(tmp_path, f"E-mail,{header}\njane@example.com,{values[field]}\n")

    report = read_leads(path)

    assert dict(report.columns)[header] == field
    assert getattr(report.leads[0].lead, field) == values[field]


@pytest.mark.parametrize("header", ["Email", "E-mail", "Email Address", "email_address", "EMAIL"])
def test_email_header_spellings(tmp_path: Path, header: str) -> None:
    report = read_leads(_write(tmp_path, f"{header}\nJane@Example.com\n"))

    assert report.leads[0].lead.email == "jane@example.com"


@pytest.mark.parametrize(
    "header", ["Phone", "Mobile Phone", "Phone Number", "Work Direct Phone", "Corporate Phone"]
)
def test_phone_header_spellings(tmp_path: Path, header: str) -> None:
    report = read_leads(_write(tmp_path, f"email,{header}\njane@example.com,+44 20 7946 0018\n"))

    assert report.leads[0].lead.phone == "+442079460018"


def test_extra_columns_become_variables(tmp_path: Path) -> None:
    path = _write(
        tmp_path,
        "email,Company Name for Emails,jobTitle,Geschäftsführer Notiz,City,city ,2nd Line,,City\n"
        "jane@example.com, Acme ,CTO,Grüße,Berlin,Munich,x,orphan,Paris\n",
    )

    report = read_leads(path)
    variables = report.leads[0].lead.variables

    assert variables["company_name_for_emails"] == "Acme"
    assert variables["job_title"] == "CTO"
    assert variables["geschaftsfuhrer_notiz"] == "Grüße"
    assert variables["city"] == "Berlin"
    assert variables["city_2"] == "Munich"
    assert variables["column_2nd_line"] == "x"
    assert variables["column_8"] == "orphan"
    assert variables["city_3"] == "Paris"
    assert report.columns[-1] == ("City", "variable city_3")


def test_variable_values_nfc(tmp_path: Path) -> None:
    path = _write(tmp_path, "email,Note\njane@example.com,Cafe\u0301 \u00a0\n")

    report = read_leads(path)

    assert report.leads[0].lead.variables["note"] == "Caf\u00e9"


@pytest.mark.parametrize(
    ("header", "name"),
    [
        ("Company Name for Emails", "company_name_for_emails"),
        ("firstName", "first_name"),
        ("  Job-Title ", "job_title"),
        ("Straße", "strae"),
        ("###", ""),
    ],
)
def test_variable_name(header: str, name: str) -> None:
    assert variable_name(header) == name


@pytest.mark.parametrize("value", ["=1+1", "+1+1", "-2+3", "@SUM(A1:A2)", '=HYPERLINK("x")'])
def test_formula_value_verbatim(tmp_path: Path, value: str) -> None:
    quoted = '"' + value.replace('"', '""') + '"'
    path = _write(tmp_path, f"email,company,Note\njane@example.com,{quoted},{quoted}\n")

    report = read_leads(path)

    assert report.leads[0].lead.company == value
    assert report.leads[0].lead.variables["note"] == value


# --- files that cannot be imported ---------------------------------------------------------


def test_non_utf8_file(tmp_path: Path) -> None:
    path = tmp_path / "latin1.csv"
    path.write_bytes("email,first_name\njürgen@example.com,Jürgen\n".encode("cp1252"))

    with pytest.raises(LeadFileError) as error:
        read_leads(path)

    assert str(path) in str(error.value)
    assert "not UTF-8" in str(error.value)
    assert "line 2" in str(error.value)
    assert "CSV UTF-8" in str(error.value)


def test_utf16_file(tmp_path: Path) -> None:
    path = tmp_path / "utf16.csv"
    path.write_bytes("email\njane@example.com\n".encode("utf-16"))

    with pytest.raises(LeadFileError, match="UTF-16"):
        read_leads(path)


def test_workbook_file(tmp_path: Path) -> None:
    path = tmp_path / "leads.xlsx"
    path.write_bytes(b"PK\x03\x04" + b"\x00" * 40)

    with pytest.raises(LeadFileError, match="not CSV"):
        read_leads(path)


@pytest.mark.parametrize("content", [b"", b"\xef\xbb\xbf", b"\r\n\r\n", b"   \n"])
def test_empty_file(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "empty.csv"
    path.write_bytes(content)

    with pytest.raises(LeadFileError) as error:
        read_leads(path)

    assert str(path) in str(error.value)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(LeadFileError, match="not found"):
        read_leads(tmp_path / "missing.csv")


def test_directory_instead_of_file(tmp_path: Path) -> None:
    with pytest.raises(LeadFileError, match="directory"):
        read_leads(tmp_path)


def test_no_email_or_linkedin_column(tmp_path: Path) -> None:
    path = _write(tmp_path, "First Name,Company\nJane,Acme\n")

    with pytest.raises(LeadFileError) as error:
        read_leads(path)

    message = str(error.value)
    assert str(path) in message
    assert "no email or LinkedIn column" in message
    assert "'First Name', 'Company'" in message


def test_header_only_file(tmp_path: Path) -> None:
    report = read_leads(_write(tmp_path, "email,first_name\r\n"))

    assert report.leads == []
    assert report.rejected == []


def test_lead_file_error_is_value_error() -> None:
    assert issubclass(LeadFileError, ValueError)


# --- bad rows ------------------------------------------------------------------------------


def test_bad_rows_do_not_abort(tmp_path: Path) -> None:
    path = _write(
        tmp_path,
        "email,first_name,linkedin_url\n"
        "not-an-address,Bad,\n"
        ",Nobody,\n"
        ",Company,https://www.linkedin.com/company/acme/\n"
        "jane@example.com,Jane,\n",
    )

    report = read_leads(path)
    reasons = {rejection.row: rejection.reason for rejection in report.rejected}

    assert [imported.row for imported in report.leads] == [4]
    assert reasons[1].startswith("invalid email address 'not-an-address'")
    assert (
        reasons[2] == "no email address and no LinkedIn URL: every lead needs at least one of them"
    )
    assert reasons[3].startswith("no email address, and the LinkedIn URL is invalid: ")
    assert "company page" in reasons[3]


def test_row_with_extra_fields_rejected(tmp_path: Path) -> None:
    path = _write(tmp_path, "email;company\njane@example.com;Smith; Jones\njohn@example.com;Acme\n")

    report = read_leads(path)

    assert report.rejected[0].row == 1
    assert "unquoted ';'" in report.rejected[0].reason
    assert report.leads[0].lead.email == "john@example.com"


def test_trailing_empty_fields_accepted(tmp_path: Path) -> None:
    report = read_leads(_write(tmp_path, "email,company\njane@example.com,Acme,,\n"))

    assert report.leads[0].lead.company == "Acme"


def test_short_row_accepted(tmp_path: Path) -> None:
    report = read_leads(_write(tmp_path, "email,company,city\njane@example.com\n"))

    assert report.leads[0].lead.company is None


def test_bad_quoting_rejected(tmp_path: Path) -> None:
    path = _write(tmp_path, 'email,company\njane@example.com,"Acme" Inc\njohn@example.com,Acme\n')

    report = read_leads(path)

    assert report.rejected[0].row == 1
    assert "invalid CSV quoting" in report.rejected[0].reason
    assert report.leads[0].row == 2
    assert report.leads[0].line == 3


def test_unclosed_quote_rejected(tmp_path: Path) -> None:
    path = _write(tmp_path, 'email,company\njane@example.com,Acme\njohn@example.com,"Acme\nx,y\n')

    report = read_leads(path)

    assert len(report.leads) == 1
    assert report.rejected[0].row == 2
    assert "a quote opened on line 3 is never closed" in report.rejected[0].reason


def test_blank_lines_keep_row_numbers(tmp_path: Path) -> None:
    path = _write(tmp_path, "email\r\n\r\njane@example.com\r\n,\r\njohn@example.com\r\n")

    report = read_leads(path)

    assert [(imported.row, imported.line) for imported in report.leads] == [(2, 3), (4, 5)]
    assert report.rejected == []


def test_invalid_email_with_linkedin_kept(tmp_path: Path) -> None:
    path = _write(
        tmp_path, "email,linkedin_url\njane@@example.com,https://www.linkedin.com/in/jane-doe\n"
    )

    report = read_leads(path)
    imported = report.leads[0]

    assert imported.lead.email is None
    assert imported.lead.linkedin_url == "https://www.linkedin.com/in/jane-doe"
    assert "invalid email address 'jane@@example.com'" in imported.warnings[0]
    assert "LinkedIn steps only" in imported.warnings[0]


def test_email_whitespace_trimmed(tmp_path: Path) -> None:
    report = read_leads(_write(tmp_path, "email\n\u00a0 Jane@Example.COM\u2003\n"))

    assert report.leads[0].lead.email == "jane@example.com"
    assert report.leads[0].warnings == []


@pytest.mark.parametrize(
    "status", ["Extrapolated", "Unverified", "guessed", "Catch-all", "catch_all"]
)
def test_unverified_status_warning(tmp_path: Path, status: str) -> None:
    report = read_leads(_write(tmp_path, f"Email,Email Status\njane@example.com,{status}\n"))

    assert report.leads[0].warnings == [
        f"unverified address (higher bounce risk): Email Status is {status!r}"
    ]


def test_verified_status_no_warning(tmp_path: Path) -> None:
    report = read_leads(_write(tmp_path, "Email,Email Status\njane@example.com,Verified\n"))

    assert report.leads[0].warnings == []
    assert report.leads[0].lead.variables["email_status"] == "Verified"


# --- LinkedIn URLs -------------------------------------------------------------------------


def test_legacy_linkedin_url_kept(tmp_path: Path) -> None:
    path = _write(
        tmp_path,
        "linkedin\nhttps://se.linkedin.com/pub/keith-sample/11/667/8b1?trk=biz_employee_pub\n",
    )

    report = read_leads(path)
    imported = report.leads[0]

    assert imported.lead.linkedin_url == "https://www.linkedin.com/pub/keith-sample/11/667/8b1"
    assert imported.warnings[0].startswith("LinkedIn URL kept, but it needs resolution: ")


def test_bidi_linkedin_warning_passed_on(tmp_path: Path) -> None:
    path = _write(tmp_path, "linkedin\nhttps://www.linkedin.com/in/%E2%80%ABnir-dugma%E2%80%AC\n")

    report = read_leads(path)

    assert report.leads[0].lead.linkedin_url == "https://www.linkedin.com/in/\u202bnir-dugma\u202c"
    assert "invisible characters (U+202B, U+202C)" in report.leads[0].warnings[0]


def test_invalid_linkedin_url_dropped(tmp_path: Path) -> None:
    path = _write(tmp_path, "email,linkedin\njane@example.com,javascript:alert(1)\n")

    report = read_leads(path)
    imported = report.leads[0]

    assert imported.lead.linkedin_url is None
    assert imported.warnings[0].startswith("LinkedIn URL dropped: 'javascript:alert(1)'")


# --- phones and time zones -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("phone", "country", "expected"),
    [
        ("+49 30 1234567", "", "+49301234567"),
        ("030 1234567", "Germany", "+49301234567"),
        ("030 1234567", "Deutschland", "+49301234567"),
        ("030 1234567", "DE", "+49301234567"),
        ("06 12 34 56 78", "France", "+33612345678"),
        ("(415) 555-0132", "USA", "+14155550132"),
        ("020 7946 0018", "United Kingdom", "+442079460018"),
    ],
)
def test_phone_e164(tmp_path: Path, phone: str, country: str, expected: str) -> None:
    path = _write(tmp_path, f'email,phone,country\njane@example.com,"{phone}",{country}\n')

    report = read_leads(path)

    assert report.leads[0].lead.phone == expected
    assert report.leads[0].warnings == []


@pytest.mark.parametrize(
    ("phone", "country", "warning"),
    [
        ("030 1234567", "", "has no country code and the row has no Country"),
        ("030 1234567", "Atlantis", "the Country 'Atlantis' is not recognised"),
        ("3.3612345678E+10", "France", "damaged by a spreadsheet"),
        ("4.9301234567e10", "", "damaged by a spreadsheet"),
        ("call me", "France", "invalid phone number 'call me'"),
        ("+49 1", "", "invalid phone number '+49 1'"),
    ],
)
def test_phone_dropped_with_warning(tmp_path: Path, phone: str, country: str, warning: str) -> None:
    path = _write(tmp_path, f"email,phone,country\njane@example.com,{phone},{country}\n")

    report = read_leads(path)

    assert report.leads[0].lead.phone is None
    assert len(report.leads[0].warnings) == 1
    assert warning in report.leads[0].warnings[0]


@pytest.mark.parametrize("dash", ["-", "--", "—"])
def test_phone_dash_means_empty(tmp_path: Path, dash: str) -> None:
    report = read_leads(_write(tmp_path, f"email,phone\njane@example.com,{dash}\n"))

    assert report.leads[0].lead.phone is None
    assert report.leads[0].warnings == []


def test_first_valid_phone_column_wins(tmp_path: Path) -> None:
    path = _write(
        tmp_path,
        "email,Work Direct Phone,Mobile Phone,Corporate Phone\n"
        "jane@example.com,,+49 30 1234567,+44 20 7946 0018\n"
        "john@example.com,4.9301234567E+10,+44 20 7946 0018,\n",
    )

    report = read_leads(path)

    assert report.leads[0].lead.phone == "+49301234567"
    assert report.leads[1].lead.phone == "+442079460018"
    assert "damaged by a spreadsheet" in report.leads[1].warnings[0]


def test_phone_extension_dropped(tmp_path: Path) -> None:
    path = _write(tmp_path, "email,phone\njane@example.com,+1 415 555 0132 ext. 12\n")

    report = read_leads(path)

    assert report.leads[0].lead.phone == "+14155550132"
    assert "extension 12" in report.leads[0].warnings[0]


@pytest.mark.parametrize(
    ("value", "expected"),
    [("Europe/Berlin", "Europe/Berlin"), ("america/new_york", "America/New_York"), ("UTC", "UTC")],
)
def test_timezone_valid(tmp_path: Path, value: str, expected: str) -> None:
    report = read_leads(_write(tmp_path, f"email,timezone\njane@example.com,{value}\n"))

    assert report.leads[0].lead.timezone == expected


@pytest.mark.parametrize("value", ["GMT+1", "Berlin", "+01:00", "../../etc/passwd"])
def test_timezone_invalid_dropped(tmp_path: Path, value: str) -> None:
    report = read_leads(_write(tmp_path, f"email,timezone\njane@example.com,{value}\n"))

    assert report.leads[0].lead.timezone is None
    assert report.leads[0].warnings[0].startswith(f"invalid time zone {value!r}")


# --- duplicates ----------------------------------------------------------------------------


def test_duplicate_fills_blank_fields(tmp_path: Path) -> None:
    path = _write(
        tmp_path,
        "email,first_name,company,phone,City\n"
        "jane@example.com,Jane,,,\n"
        "JANE@example.com,Janet,Acme,+49 30 1234567,Berlin\n",
    )

    report = read_leads(path)
    lead = report.leads[0].lead

    assert lead.first_name == "Jane"
    assert lead.company == "Acme"
    assert lead.phone == "+49301234567"
    assert lead.variables["city"] == "Berlin"
    assert report.duplicates[0].of_row == 1
    assert report.duplicates[0].filled == ("company", "phone", "city")


def test_duplicate_by_linkedin_url(tmp_path: Path) -> None:
    path = _write(
        tmp_path,
        "email,linkedin\n"
        ",https://www.linkedin.com/in/jane-doe\n"
        ",http://uk.linkedin.com/in/Jane-Doe/?trk=x\n"
        "jane@example.com,https://linkedin.com/in/jane-doe\n",
    )

    report = read_leads(path)

    assert len(report.leads) == 1
    assert report.leads[0].lead.email == "jane@example.com"
    assert [d.of_row for d in report.duplicates] == [1, 1]
    assert report.duplicates[0].key == "https://www.linkedin.com/in/jane-doe"


def test_same_linkedin_two_emails_warns(tmp_path: Path) -> None:
    path = _write(
        tmp_path,
        "email,linkedin\n"
        "jane@example.com,https://www.linkedin.com/in/jane-doe\n"
        "jane.doe@example.org,https://www.linkedin.com/in/jane-doe\n",
    )

    report = read_leads(path)

    assert len(report.leads) == 2
    assert report.duplicates == []
    assert "same LinkedIn URL as row 1" in report.leads[1].warnings[0]


def test_duplicate_warnings_follow_value(tmp_path: Path) -> None:
    path = _write(
        tmp_path,
        "email,linkedin\n"
        "jane@example.com,\n"
        "jane@example.com,https://www.linkedin.com/pub/jane-doe/1/2/3\n",
    )

    report = read_leads(path)
    warnings = report.leads[0].warnings

    assert report.leads[0].lead.linkedin_url == "https://www.linkedin.com/pub/jane-doe/1/2/3"
    assert warnings[0].startswith("row 2: LinkedIn URL kept, but it needs resolution")
    assert warnings[1] == "filled linkedin_url from duplicate row 2 (line 3)"


# --- campaign checks -----------------------------------------------------------------------


def test_campaign_missing_variable(tmp_path: Path) -> None:
    campaign = _campaign(
        {"type": "email", "subject": "Hi {{first_name}}", "body": "About {{company}} and {{city}}"},
        {"type": "linkedin_message", "message": "Hello from {{company}}"},
    )
    path = _write(
        tmp_path,
        "email,first_name,company,linkedin,City\n"
        "jane@example.com,Jane,,https://www.linkedin.com/in/jane-doe,\n"
        "john@example.com,John,Acme,https://www.linkedin.com/in/john-doe,Berlin\n",
    )

    report = read_leads(path, campaign)
    jane, john = report.leads

    assert jane.warnings == [
        "missing template variable 'company' used by step 1 body, step 2 message: fill the "
        "column, or give the placeholder a fallback such as {{company|your team}}",
        "missing template variable 'city' used by step 1 body: fill the column, or give the "
        "placeholder a fallback such as {{city|...}}",
    ]
    assert john.warnings == []


def test_campaign_fallback_not_required(tmp_path: Path) -> None:
    campaign = _campaign({"type": "email", "subject": "Hi", "body": "At {{company|your team}}"})

    report = read_leads(_write(tmp_path, "email\njane@example.com\n"), campaign)

    assert report.leads[0].warnings == []


def test_campaign_missing_channel_address(tmp_path: Path) -> None:
    campaign = _campaign(
        {"type": "email", "subject": "Hi", "body": "Hello"},
        {"type": "linkedin_visit"},
        {"type": "linkedin_invite"},
        {"type": "call"},
    )
    path = _write(tmp_path, "email\njane@example.com\n")

    report = read_leads(path, campaign)

    assert report.leads[0].warnings == [
        "no LinkedIn URL: steps 2, 3 cannot run for this lead",
        "no phone number: step 4 cannot run for this lead",
    ]


def test_campaign_skips_unreachable_variables(tmp_path: Path) -> None:
    campaign = _campaign({"type": "email", "subject": "Hi {{first_name}}", "body": "Hello"})

    report = read_leads(_write(tmp_path, "linkedin\nhttps://www.linkedin.com/in/jane\n"), campaign)

    assert report.leads[0].warnings == ["no email address: step 1 cannot run for this lead"]


# --- summary -------------------------------------------------------------------------------


def test_summary_limits_lines(tmp_path: Path) -> None:
    rows = "".join(f"bad{index}@@example.com\n" for index in range(5))
    report = read_leads(_write(tmp_path, "email\n" + rows))

    summary = report.summary(limit=2)

    assert summary.splitlines()[0].endswith(
        "0 leads imported, 5 rows rejected, 0 duplicates merged, 0 warnings"
    )
    assert "row 2 (line 3)" in summary
    assert "row 3 (line 4)" not in summary
    assert "... and 3 more" in summary
