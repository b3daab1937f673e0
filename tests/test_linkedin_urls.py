from __future__ import annotations

from pathlib import Path

import pytest

from sequencer.linkedin_urls import LinkedInUrl, parse_linkedin_url

CORPUS = Path(__file__).resolve().parents[2] / "shared" / "corpus"
URL_TABLE = CORPUS / "linkedin_urls.tsv"


def _corpus_rows() -> list[dict[str, str]]:
    if not URL_TABLE.is_file():
        return []
    # Read bytes and split by hand: the inputs keep their leading and trailing spaces.
    lines = URL_TABLE.read_bytes().decode("utf-8").split("\n")
    header = lines[0].split("\t")
    return [dict(zip(header, line.split("\t"), strict=True)) for line in lines[1:] if line]


CORPUS_ROWS = _corpus_rows()


def _skip_without_corpus() -> None:
    if not CORPUS_ROWS:
        pytest.skip(f"LinkedIn URL corpus not found at {URL_TABLE}: check out shared/ beside main/")


@pytest.mark.parametrize(
    "row", CORPUS_ROWS or [None], ids=[row["id"] for row in CORPUS_ROWS] or ["corpus-missing"]
)
def test_corpus_row(row: dict[str, str] | None) -> None:
    _skip_without_corpus()
    assert row is not None
    result = parse_linkedin_url(row["input"])
    expected_normalised = row["expected_normalised"] or None

    assert result.verdict == row["verdict"], result.reason
    assert result.normalised == expected_normalised
    assert result.kind == row["kind"]
    if result.verdict in ("invalid", "needs-resolution"):
        assert result.reason
    else:
        assert result.reason is None


def test_corpus_is_not_empty() -> None:
    _skip_without_corpus()
    assert len(CORPUS_ROWS) >= 30


@pytest.mark.parametrize(
    ("raw", "kind"),
    [
        ("", "empty"),
        ("   ", "empty"),
        ("\u00a0\t ", "empty"),
        ("not a url", "not-a-url"),
        ("None", "not-a-url"),
        ("N/A", "not-a-url"),
        ("jane-doe", "not-a-url"),
        ("https://www.linkedin.com/in/jane\ndoe", "not-a-url"),
        ("https://www.linkedin.com:99999/in/jane-doe", "not-a-url"),
        ("mailto:jane@example.com", "other-scheme"),
        ("data:text/html,<script>alert(1)</script>", "injection"),
        ("JavaScript:alert(document.cookie)", "injection"),
        ("https://notlinkedin.com/in/jane-doe", "other-host"),
        ("https://help.linkedin.com/in/jane-doe", "other-host"),
        ("https://www.linkedin.com@evil.example/in/jane-doe", "other-host"),
        ("https://user@www.linkedin.com/in/jane-doe", "other-host"),
        ("https://lnkd.in/abc123", "short-link"),
        ("https://www.linkedin.com", "other-page"),
        ("https://www.linkedin.com/feed/", "post"),
        ("https://www.linkedin.com/pub/dir/jane/doe", "search"),
        ("https://www.linkedin.com/pub/", "empty-slug"),
        ("https://www.linkedin.com/sales/lead/", "empty-slug"),
        ("https://www.linkedin.com/profile/view", "empty-slug"),
        ("https://www.linkedin.com/profile/view?id=abc", "bad-slug"),
        ("https://www.linkedin.com/sales/lead/AC%20wA,NAME", "bad-slug"),
        ("https://www.linkedin.com/in/jane doe", "bad-slug"),
        ("https://www.linkedin.com/in/%3Cscript%3E", "bad-slug"),
        ("https://www.linkedin.com/in/%FF", "bad-slug"),
    ],
)
def test_invalid_input(raw: str, kind: str) -> None:
    result = parse_linkedin_url(raw)

    assert result.verdict == "invalid"
    assert result.kind == kind
    assert result.normalised is None
    assert result.cleaned is None
    assert result.reason
    assert not result.usable


@pytest.mark.parametrize(
    ("raw", "normalised"),
    [
        ("linkedin.com/in/Jane-Doe", "https://www.linkedin.com/in/jane-doe"),
        ("www.linkedin.com:443/in/jane-doe/", "https://www.linkedin.com/in/jane-doe"),
        ("//de.linkedin.com/in/jane-doe", "https://www.linkedin.com/in/jane-doe"),
        (
            "https://m.linkedin.com/in/jane-doe/details/experience/",
            "https://www.linkedin.com/in/jane-doe",
        ),
        ("HTTPS://WWW.LINKEDIN.COM/M/IN/JANE-DOE", "https://www.linkedin.com/in/jane-doe"),
        ("LinkedIn://in/Jane-Doe?src=app", "https://www.linkedin.com/in/jane-doe"),
        (
            "\u00a0https://www.linkedin.com/in/jane-doe\u00a0",
            "https://www.linkedin.com/in/jane-doe",
        ),
    ],
)
def test_profile_variants_normalise(raw: str, normalised: str) -> None:
    result = parse_linkedin_url(raw)

    assert result.verdict == "normalise"
    assert result.kind == "profile"
    assert result.normalised == normalised
    assert result.cleaned == normalised


def test_canonical_url_is_valid() -> None:
    result = parse_linkedin_url("https://www.linkedin.com/in/jane-doe")

    assert result == LinkedInUrl(
        "valid",
        "profile",
        "https://www.linkedin.com/in/jane-doe",
        None,
        cleaned="https://www.linkedin.com/in/jane-doe",
    )
    assert result.usable


def test_salesnav_id_keeps_case() -> None:
    result = parse_linkedin_url("https://www.linkedin.com/sales/lead/ACwAAB_xYz12")

    assert result.verdict == "valid"
    assert result.normalised == "https://www.linkedin.com/sales/lead/ACwAAB_xYz12"


def test_bidi_slug_warns() -> None:
    result = parse_linkedin_url("https://www.linkedin.com/in/%E2%80%ABnir-dugma%E2%80%AC/")

    assert result.normalised == "https://www.linkedin.com/in/\u202bnir-dugma\u202c"
    assert len(result.warnings) == 1
    assert "U+202B, U+202C" in result.warnings[0]


@pytest.mark.parametrize(
    ("raw", "cleaned"),
    [
        (
            "https://se.linkedin.com/pub/keith-sample/11/667/8b1?trk=biz_employee_pub",
            "https://www.linkedin.com/pub/keith-sample/11/667/8b1",
        ),
        (
            "http://www.linkedin.com/profile/view?id=12345678&trk=tab_pro",
            "https://www.linkedin.com/profile/view?id=12345678",
        ),
    ],
)
def test_legacy_url_needs_resolution(raw: str, cleaned: str) -> None:
    result = parse_linkedin_url(raw)

    assert result.verdict == "needs-resolution"
    assert result.usable
    assert result.normalised is None
    assert result.cleaned == cleaned
    assert raw in result.reason


@pytest.mark.parametrize(
    "raw",
    [
        "https://www.linkedin.com/in/jane-doe",
        "https://www.linkedin.com/sales/lead/ACwAAB_xYz12",
        "https://www.linkedin.com/pub/keith-sample/11/667/8b1",
        "https://www.linkedin.com/profile/view?id=12345678",
    ],
)
def test_cleaned_url_reparses_unchanged(raw: str) -> None:
    first = parse_linkedin_url(raw)
    second = parse_linkedin_url(first.cleaned)

    assert second.verdict == first.verdict
    assert second.cleaned == first.cleaned


def test_reason_names_value() -> None:
    result = parse_linkedin_url("https://www.linkedin.com/company/acme-example/")

    assert "https://www.linkedin.com/company/acme-example/" in result.reason
    assert "company page" in result.reason
