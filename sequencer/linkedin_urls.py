"""Classify and normalise LinkedIn URLs as they appear in lead lists.

The canonical profile URL is `https://www.linkedin.com/in/<slug>`, with the slug
percent-decoded to Unicode and lower-cased, and no query, fragment, trailing slash or
sub-page. A Sales Navigator lead becomes `https://www.linkedin.com/sales/lead/<id>`, with
the id's case kept because the id is case-sensitive. Legacy `/pub/` and `/profile/view?id=`
URLs cannot be turned into a slug offline, so they are kept for a provider to resolve.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass
from urllib.parse import parse_qs, unquote, urlsplit

VALID = "valid"
NORMALISE = "normalise"
NEEDS_RESOLUTION = "needs-resolution"
INVALID = "invalid"

CANONICAL_HOST = "www.linkedin.com"
EXAMPLE_PROFILE = "https://www.linkedin.com/in/jane-doe"

# linkedin.com itself, www, the mobile hosts and the two-letter country hosts that LinkedIn
# redirects to (uk., de., es., ...). Any other host, including one that only starts with
# "linkedin.com", is not LinkedIn's.
_LINKEDIN_HOST = re.compile(r"(?:(?:www|m|mobile|touch|[a-z]{2})\.)?linkedin\.com")
_SCHEME = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*):")
# A bare host with a port, such as "www.linkedin.com:443/in/x", also matches _SCHEME.
_HOST_WITH_PORT = re.compile(r"[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)+:\d+(?:[/?#]|$)")
_DANGEROUS_SCHEMES = frozenset({"javascript", "data", "vbscript", "file"})
_SALES_NAVIGATOR_ID = re.compile(r"[A-Za-z0-9_-]+")
_NUMERIC_ID = re.compile(r"\d+")

# Kind and description of LinkedIn pages that are not a person's profile, by first path segment.
_OTHER_PAGES = {
    "company": ("company", "a LinkedIn company page"),
    "showcase": ("company", "a LinkedIn company showcase page"),
    "school": ("school", "a LinkedIn school page"),
    "edu": ("school", "a LinkedIn school page"),
    "pulse": ("article", "a LinkedIn article"),
    "posts": ("post", "a LinkedIn post"),
    "feed": ("post", "a LinkedIn feed post"),
    "groups": ("group", "a LinkedIn group page"),
    "jobs": ("job", "a LinkedIn job posting"),
    "events": ("event", "a LinkedIn event page"),
    "search": ("search", "a LinkedIn search result page"),
}


@dataclass(frozen=True)
class LinkedInUrl:
    """The verdict on one LinkedIn URL and its canonical form.

    `verdict` is "valid" (already canonical), "normalise" (a canonical form exists),
    "needs-resolution" (a legacy profile URL that only LinkedIn can map to a slug) or
    "invalid". `kind` names what the URL points to, such as "profile" or "company".
    `normalised` is the canonical URL for valid and normalise verdicts, else None.
    `reason` is a sentence naming the value and the fix, for invalid and needs-resolution.
    `cleaned` is the URL to store for any usable verdict: `normalised`, or for
    needs-resolution the legacy URL on https://www.linkedin.com without tracking parameters.
    """

    verdict: str
    kind: str
    normalised: str | None
    reason: str | None
    warnings: tuple[str, ...] = ()
    cleaned: str | None = None

    @property
    def usable(self) -> bool:
        """True when LinkedIn steps can use the URL, directly or after provider resolution."""
        return self.verdict in (VALID, NORMALISE, NEEDS_RESOLUTION)


def parse_linkedin_url(raw: str) -> LinkedInUrl:
    """Classify a LinkedIn URL and return its canonical form where one exists.

    Accepts http and https, a missing scheme, `//host` URLs, country and mobile hosts,
    upper case, the `/mwlite/in/` and `/m/in/` paths, `linkedin://in/<slug>` app links and
    surrounding whitespace. Any string that is not a usable URL gets an invalid verdict, not an
    exception.
    """
    text = (raw or "").strip()
    if not text:
        return _invalid(
            "empty", f"the LinkedIn URL is empty: give a profile URL such as {EXAMPLE_PROFILE}"
        )
    # urlsplit silently deletes tabs and line breaks, which would join two words into a slug.
    control = next((char for char in text if unicodedata.category(char) == "Cc"), None)
    if control is not None:
        return _invalid(
            "not-a-url",
            f"{text!r} is not a LinkedIn URL: it contains the control character "
            f"U+{ord(control):04X}. Give a single profile URL such as {EXAMPLE_PROFILE}",
        )

    scheme_match = _SCHEME.match(text)
    scheme = scheme_match.group(1).lower() if scheme_match else None
    if scheme == "linkedin":
        # App links (linkedin://in/<slug>) carry the path where a URL has its host.
        rest = text[scheme_match.end() :].lstrip("/")
        url = f"https://{CANONICAL_HOST}/{rest}"
    elif scheme in ("http", "https"):
        url = text
    elif scheme is None or _HOST_WITH_PORT.match(text):
        url = "https:" + text if text.startswith("//") else "https://" + text
    elif scheme in _DANGEROUS_SCHEMES:
        return _invalid(
            "injection",
            f"{text!r} is a {scheme}: URL, not a LinkedIn URL, and must never be shown as a "
            f"link. Replace it with the person's profile URL, such as {EXAMPLE_PROFILE}",
        )
    else:
        return _invalid(
            "other-scheme",
            f"{text!r} is not a LinkedIn URL because it uses the {scheme}: scheme. Give an "
            f"https profile URL such as {EXAMPLE_PROFILE}",
        )

    return _parse_http_url(raw, text, url)


def _parse_http_url(raw: str, text: str, url: str) -> LinkedInUrl:
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as error:
        return _invalid(
            "not-a-url",
            f"{text!r} is not a valid URL ({error}). Give a profile URL such as {EXAMPLE_PROFILE}",
        )
    host = (parts.hostname or "").rstrip(".")
    if not re.fullmatch(r"[a-z0-9-]+(?:\.[a-z0-9-]+)+", host):
        return _invalid(
            "not-a-url",
            f"{text!r} is not a URL. Give a LinkedIn profile URL such as {EXAMPLE_PROFILE}",
        )
    if host == "lnkd.in":
        return _invalid(
            "short-link",
            f"{text!r} is a LinkedIn short link, which may lead to any page. Open it and use "
            "the profile URL it leads to instead",
        )
    if not _LINKEDIN_HOST.fullmatch(host):
        return _invalid(
            "other-host",
            f"{text!r} is not on linkedin.com (the host is {host}). Give a LinkedIn profile "
            f"URL such as {EXAMPLE_PROFILE}",
        )
    if parts.username is not None or port not in (None, 80, 443):
        return _invalid(
            "other-host",
            f"{text!r} has a user name or port before the path, which LinkedIn profile URLs "
            f"never have. Give a plain profile URL such as {EXAMPLE_PROFILE}",
        )

    segments = [segment for segment in parts.path.split("/") if segment]
    lowered = [segment.lower() for segment in segments]
    if lowered[:2] in (["mwlite", "in"], ["m", "in"]):
        segments, lowered = segments[1:], lowered[1:]

    if not lowered:
        return _invalid(
            "other-page",
            f"{text!r} is the LinkedIn home page, not a profile. Give a profile URL such as "
            f"{EXAMPLE_PROFILE}",
        )
    if lowered[0] == "in":
        return _parse_profile(raw, text, segments[1:])
    if lowered[:1] == ["sales"] and len(lowered) >= 2 and lowered[1] in ("lead", "people"):
        return _parse_sales_navigator(raw, text, segments[2:])
    if lowered[0] == "pub" and lowered[1:2] != ["dir"]:
        return _parse_legacy_pub(text, segments[1:])
    if lowered[:2] == ["profile", "view"]:
        return _parse_legacy_numeric(text, parts.query)

    kind, description = _OTHER_PAGES.get(lowered[0], ("other-page", "a LinkedIn page"))
    if lowered[:2] == ["pub", "dir"]:
        kind, description = "search", "a LinkedIn people search page"
    return _invalid(
        kind,
        f"{text!r} is {description}, not a person's profile. Give the person's profile URL, "
        f"such as {EXAMPLE_PROFILE}",
    )


def _parse_profile(raw: str, text: str, segments: list[str]) -> LinkedInUrl:
    if not segments:
        return _invalid(
            "empty-slug",
            f"{text!r} has no profile name after /in/. Give the full profile URL, such as "
            f"{EXAMPLE_PROFILE}",
        )
    # Later segments are sub-pages such as /overlay/contact-info or /details/experience.
    try:
        slug = unquote(segments[0], errors="strict").lower()
    except UnicodeDecodeError:
        return _invalid(
            "bad-slug",
            f"{text!r} has a profile name with invalid percent-encoding. Copy the URL from "
            "the browser's address bar again",
        )
    problem = _slug_problem(slug)
    if problem:
        return _invalid("bad-slug", f"{text!r} is not a valid profile URL: {problem}")

    normalised = f"https://{CANONICAL_HOST}/in/{slug}"
    return _usable(raw, "profile", normalised, _invisible_warning(slug))


def _slug_problem(slug: str) -> str | None:
    """Return why a decoded slug cannot be a LinkedIn profile name, or None if it can."""
    for char in slug:
        category = unicodedata.category(char)
        if category[0] == "Z":
            return "the profile name contains a space, which LinkedIn profile names never do"
        # NOTE: the allowed set is an estimate from real profile URLs: letters and digits of
        # any script, combining marks, hyphens, underscores and dots. Invisible format
        # characters (category Cf) are allowed because LinkedIn itself generates some.
        if category[0] not in "LMN" and category != "Cf" and char not in "-_.":
            return (
                f"the profile name contains {char!r}, which LinkedIn profile names do not "
                "contain. Copy the URL from the browser's address bar again"
            )
    return None


def _invisible_warning(slug: str) -> tuple[str, ...]:
    invisible = [char for char in slug if unicodedata.category(char) == "Cf"]
    if not invisible:
        return ()
    codes = ", ".join(dict.fromkeys(f"U+{ord(char):04X}" for char in invisible))
    return (
        f"the profile name {slug!r} contains invisible characters ({codes}). They are kept "
        "because LinkedIn generated them and removing them breaks the link, but check that "
        "the URL opens the right profile",
    )


def _parse_sales_navigator(raw: str, text: str, segments: list[str]) -> LinkedInUrl:
    # The id is followed by the search context that produced it: ID,NAME_SEARCH,abcd.
    lead_id = unquote(segments[0]).split(",")[0] if segments else ""
    if not lead_id:
        return _invalid(
            "empty-slug",
            f"{text!r} has no Sales Navigator lead id. Copy the lead's URL from Sales "
            "Navigator again",
        )
    if not _SALES_NAVIGATOR_ID.fullmatch(lead_id):
        return _invalid(
            "bad-slug",
            f"{text!r} has an invalid Sales Navigator lead id {lead_id!r}: ids contain only "
            "letters, digits, '_' and '-'. Copy the lead's URL from Sales Navigator again",
        )
    normalised = f"https://{CANONICAL_HOST}/sales/lead/{lead_id}"
    return _usable(raw, "salesnav-lead", normalised, ())


def _parse_legacy_pub(text: str, segments: list[str]) -> LinkedInUrl:
    if not segments:
        return _invalid(
            "empty-slug",
            f"{text!r} has no profile name after /pub/. Give the full profile URL, such as "
            f"{EXAMPLE_PROFILE}",
        )
    path = "/".join(segments)
    return LinkedInUrl(
        verdict=NEEDS_RESOLUTION,
        kind="profile-legacy-pub",
        normalised=None,
        reason=(
            f"{text!r} is a legacy /pub/ profile URL, and its /in/ profile name cannot be "
            "derived offline. Open it and use the /in/ URL that LinkedIn redirects to, or let "
            "the LinkedIn provider resolve it"
        ),
        cleaned=f"https://{CANONICAL_HOST}/pub/{path}",
    )


def _parse_legacy_numeric(text: str, query: str) -> LinkedInUrl:
    member_ids = parse_qs(query).get("id", [])
    member_id = member_ids[0].strip() if member_ids else ""
    if not member_id:
        return _invalid(
            "empty-slug",
            f"{text!r} has no member id (id= parameter). Give the person's profile URL, such "
            f"as {EXAMPLE_PROFILE}",
        )
    if not _NUMERIC_ID.fullmatch(member_id):
        return _invalid(
            "bad-slug",
            f"{text!r} has a member id {member_id!r} that is not a number. Give the person's "
            f"profile URL, such as {EXAMPLE_PROFILE}",
        )
    return LinkedInUrl(
        verdict=NEEDS_RESOLUTION,
        kind="profile-legacy-numeric",
        normalised=None,
        reason=(
            f"{text!r} is a legacy profile URL with a numeric member id, and its /in/ profile "
            "name cannot be derived offline. Open it and use the /in/ URL that LinkedIn "
            "redirects to, or let the LinkedIn provider resolve it"
        ),
        cleaned=f"https://{CANONICAL_HOST}/profile/view?id={member_id}",
    )


def _usable(raw: str, kind: str, normalised: str, warnings: tuple[str, ...]) -> LinkedInUrl:
    verdict = VALID if raw == normalised else NORMALISE
    return LinkedInUrl(verdict, kind, normalised, None, warnings, cleaned=normalised)


def _invalid(kind: str, reason: str) -> LinkedInUrl:
    return LinkedInUrl(INVALID, kind, None, reason)
