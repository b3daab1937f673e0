"""Compare the inbound classifier with flufl.bounce on the bounce corpus.

The bounce corpus is a folder of .eml files with an index.tsv that gives, per file, the expected
class (hard, soft or not-a-bounce) and the recipients the message is about. This module runs
`sequencer.inbound.classify_message` and flufl.bounce (GNU Mailman's bounce detector) on every
file, maps both outputs onto the index's classes and renders a Markdown report:

    python -m sequencer.bounce_accuracy CORPUS_DIR [--output FILE]

docs/bounce-accuracy.md is that report, and tests/test_bounce_accuracy.py fails when it is out
of date. flufl.bounce is a dev extra, so it is imported only when a report is built.
"""

from __future__ import annotations

import argparse
import csv
import email
import sys
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from functools import partial
from importlib import metadata
from pathlib import Path
from types import ModuleType

from sequencer.inbound import InboundKind, classify_message

SEQUENCER = "sequencer"
FLUFL_BOUNCE = "flufl.bounce"
TOOLS = (SEQUENCER, FLUFL_BOUNCE)

HARD = "hard"
SOFT = "soft"
NOT_A_BOUNCE = "not-a-bounce"
CLASSES = (HARD, SOFT, NOT_A_BOUNCE)  # the index's classes, in report order
ERROR = "error"  # the class of a tool that raised on a file, which never matches the index

# `flufl_bounce_class` can return every index class, so accuracy is compared on all of them.
# REPORT_MAPPING lists the finer distinctions that flufl.bounce cannot make.
FLUFL_BOUNCE_CLASSES = CLASSES

CLASS_OF_KIND = {
    InboundKind.HARD_BOUNCE: HARD,
    InboundKind.SOFT_BOUNCE: SOFT,
    InboundKind.DELAY_WARNING: NOT_A_BOUNCE,
    InboundKind.AUTO_REPLY: NOT_A_BOUNCE,
    InboundKind.COMPLAINT: NOT_A_BOUNCE,
    InboundKind.HUMAN_REPLY: NOT_A_BOUNCE,
    InboundKind.UNRELATED: NOT_A_BOUNCE,
}

REPORT_FILE = "docs/bounce-accuracy.md"
REGENERATE_COMMAND = f"python -m sequencer.bounce_accuracy CORPUS_DIR --output {REPORT_FILE}"

# Explanation of each disagreement with the index, by (tool, file). Each was found by reading
# the message and, for flufl.bounce 6.0.0, the detector that handled it (flufl/bounce/_detectors).
# tests/test_bounce_accuracy.py requires an entry for every disagreement and no other entries.
EXPLANATIONS: dict[tuple[str, str], str] = {
    (FLUFL_BOUNCE, "lhost-yahoo-01.eml"): (
        "The Yahoo detector runs only when From starts with mailer-daemon@yahoo, and this "
        "pseudonymised copy comes from MAILER-DAEMON@y.example.co.jp (with a yahoo.co.jp sender "
        "it finds the address). No generic pattern matches 'Sorry, we were unable to deliver "
        "your message', so no address is found."
    ),
    (FLUFL_BOUNCE, "lhost-sendmail-25.eml"): (
        "The class is right, but the DSN detector reads Final-Recipient with "
        "Message.get_params(), which splits the MIME encoded-word local part at its '=', so "
        "the reported address is an empty string."
    ),
    (FLUFL_BOUNCE, "rhost-google-02.eml"): (
        "The boundary in the Content-Type header differs from the one the parts use, so the "
        "email package finds no MIME parts, and no detector matches the unsplit Postfix text. "
        "The sequencer classifier reads the DSN fields from the raw text instead."
    ),
    (FLUFL_BOUNCE, "rhost-google-05.eml"): (
        "The DSN detector puts every Action: failed recipient in the permanent set and never "
        "reads Status or Diagnostic-Code, so Gmail's 5.2.2 'out of storage space' is hard."
    ),
    (FLUFL_BOUNCE, "lhost-outlook-01.eml"): (
        "Action: failed makes the DSN detector report a permanent failure, although Status "
        "5.2.2 and 'Mailbox Full' mean a full mailbox."
    ),
    (FLUFL_BOUNCE, "lhost-qmail-06.eml"): (
        "The qmail detector reports every address as a permanent failure, and the remote "
        "reply here is a temporary 450 4.2.2 'Mailbox Full' given up after the queue lifetime."
    ),
    (FLUFL_BOUNCE, "rb-issue-368-bug.eml"): (
        "No detector knows this German ISP notification ('target mail address:'), which has "
        "no DSN part and no X-Failed-Recipients, so the mailbox-full bounce goes unnoticed."
    ),
    (FLUFL_BOUNCE, "rhost-yahooinc-02.eml"): (
        "The DSN detector ignores Status 4.7.0 and the 421 TSS04 deferral and reports "
        "Action: failed as permanent. The cause is the sender's reputation, not the address."
    ),
    (FLUFL_BOUNCE, "lhost-qmail-19.eml"): (
        "The qmail detector reports every address as a permanent failure, but the remote "
        "reply is 421 4.7.0 TSS04, a deferral for the sender's reputation."
    ),
    (FLUFL_BOUNCE, "lhost-sendmail-10.eml"): (
        "The DSN detector reports Action: failed as permanent despite Status 4.4.7, and the "
        "remote reply (450 4.7.1 'Client host rejected') blames the sending host."
    ),
    (FLUFL_BOUNCE, "lhost-exim-06.eml"): (
        "The Exim detector reports every X-Failed-Recipients address as a permanent failure, "
        "but 'retry timeout exceeded' is a temporary failure that outlived the retry period."
    ),
    (FLUFL_BOUNCE, "lhost-sendmail-33.eml"): (
        "The DSN detector reports Action: failed as permanent. The Diagnostic-Code '550 5.7.1 "
        "IP address blacklisted by recipient' blames the sending IP, not the address."
    ),
    (FLUFL_BOUNCE, "rhost-microsoft-01.eml"): (
        "The DSN detector reports Action: failed as permanent, but 5.7.606 'banned sending "
        "IP' blames the sending IP, not the address."
    ),
    (FLUFL_BOUNCE, "lhost-barracuda-01.eml"): (
        "The DSN detector reports Action: failed as permanent, but 5.7.1 'Message content "
        "rejected, UBE' rejects the content, not the address."
    ),
    (FLUFL_BOUNCE, "rhost-google-04.eml"): (
        "The recipient is right because the DSN detector reads Original-Recipient first, but "
        "it reports Action: failed as permanent, and 5.7.26 is an SPF/DKIM failure of the "
        "sender."
    ),
    (FLUFL_BOUNCE, "lhost-googleworkspace-01.eml"): (
        "The message/delivery-status part is empty, so the Exim detector takes Gmail's "
        "X-Failed-Recipients as a permanent failure. The cause is the sender's misconfigured "
        "'Send mail as' SMTP server, which does not advertise AUTH."
    ),
    (FLUFL_BOUNCE, "lhost-outlook-06.eml"): (
        "The DSN detector puts Action: delayed recipients in the temporary set, so a delay "
        "warning, whose message may still be delivered, reads as a soft bounce."
    ),
    (FLUFL_BOUNCE, "rfc3834-01.eml"): (
        "The class is right, but flufl.bounce has no notion of auto-replies, so it names no "
        "address. The index expects the auto-reply's sender, by which the engine finds the lead."
    ),
    (FLUFL_BOUNCE, "rfc3834-02.eml"): (
        "The class is right, but flufl.bounce has no notion of auto-replies, so it names no "
        "address. The index expects the auto-reply's sender, by which the engine finds the lead."
    ),
    (FLUFL_BOUNCE, "arf-14.eml"): (
        "The class is right, but flufl.bounce has no detector for feedback reports (ARF), so it "
        "misses the complaint and names no address where the index expects Original-Rcpt-To."
    ),
    (FLUFL_BOUNCE, "arf-18.eml"): (
        "The class is right, but flufl.bounce has no detector for feedback reports (ARF), so it "
        "names no address for this DMARC failure report, where the index expects "
        "Original-Rcpt-To."
    ),
}

REPORT_MAPPING = f"""\
## How the outputs map onto the index

The index gives each file one of three classes. `hard` means that the address is dead.
`soft` means that the message was not delivered for a reason that may pass or that is the
sender's fault. `not-a-bounce` covers delay warnings, auto-replies, complaints, DMARC failure
reports and ordinary mail. For these, the recipient column names the address the message is
about: the delayed recipient, the auto-reply's sender or the complained-about recipient.

- **{SEQUENCER}**: `classify_message` returns a kind. `hard_bounce` is `hard`, `soft_bounce` is
  `soft`, and `delay_warning`, `auto_reply`, `complaint`, `human_reply` and `unrelated` are
  `not-a-bounce`. Its recipients are the addresses in `InboundMessage.recipients`.
- **{FLUFL_BOUNCE}**: each file is parsed with `email.message_from_bytes` (the compat32 policy,
  which gives the `email.message.Message` the detectors read), and `all_failures(message)`
  returns two sets of byte-string addresses, temporary first and permanent second. A non-empty
  permanent set is `hard`, even when it contains only an empty address. Otherwise a non-empty
  temporary set is `soft`, and two empty sets are `not-a-bounce`. Its recipients are the union
  of both sets, decoded as ASCII.
- **class + recipients** counts a file when the class is right and the set of recipients equals
  the index's, ignoring case. A tool that raises on a file gets the class `{ERROR}`.

What {FLUFL_BOUNCE} cannot express: it has no notion of auto-replies, complaints or DMARC
reports, so it returns nothing for them and names no address. It cannot tell a delay warning
from a temporary failure, because both land in the temporary set. It reports no cause, so a
refusal that blames the sender (a blocklist, SPF/DKIM, content, reputation) looks like a bad
address. Its DSN detector sorts recipients by the `Action` field alone, and its qmail and Exim
detectors report every address as a permanent failure.
"""


@dataclass(frozen=True)
class IndexRow:
    """One file of the corpus, with the class and recipients that the index expects."""

    file: str
    source: str
    expected_class: str
    recipients: tuple[str, ...]


@dataclass(frozen=True)
class ToolVerdict:
    """One tool's output on one file, and the index class it maps to."""

    output: str  # what the tool returned, as the report shows it
    verdict_class: str
    recipients: tuple[str, ...]


@dataclass(frozen=True)
class FileResult:
    """The verdicts of both tools on one file of the corpus."""

    row: IndexRow
    verdicts: dict[str, ToolVerdict]  # by tool name

    def class_correct(self, tool: str) -> bool:
        return self.verdicts[tool].verdict_class == self.row.expected_class

    def recipients_correct(self, tool: str) -> bool:
        return _address_set(self.verdicts[tool].recipients) == _address_set(self.row.recipients)

    def fully_correct(self, tool: str) -> bool:
        return self.class_correct(tool) and self.recipients_correct(tool)


@dataclass(frozen=True)
class Score:
    """How many files of one expected class a tool got right."""

    files: int
    class_correct: int
    fully_correct: int  # class and recipients


def _address_set(addresses: Iterable[str]) -> frozenset[str]:
    return frozenset(address.lower() for address in addresses)


# --- corpus and tools -------------------------------------------------------------------------


def read_index(corpus_dir: Path) -> list[IndexRow]:
    """Read the corpus's index.tsv.

    Raises FileNotFoundError when index.tsv is missing, and ValueError when a column is missing
    or a row has a class that this module does not map.
    """
    index_file = corpus_dir / "index.tsv"
    if not index_file.is_file():
        raise FileNotFoundError(
            f"index.tsv not found in {corpus_dir}. Pass the folder of the bounce corpus."
        )
    with index_file.open(encoding="utf-8", newline="") as handle:
        reader = csv.DictReader(handle, delimiter="\t")
        records = list(reader)
        columns = set(reader.fieldnames or ())

    missing = {"file", "source", "class", "recipient"} - columns
    if missing:
        raise ValueError(f"{index_file} has no column {', '.join(sorted(missing))}")
    rows = []
    for record in records:
        if record["class"] not in CLASSES:
            raise ValueError(
                f"{index_file}: unknown class {record['class']!r} for {record['file']}, "
                f"expected one of {', '.join(CLASSES)}. Map the new class in "
                "sequencer/bounce_accuracy.py before measuring."
            )
        rows.append(
            IndexRow(
                file=record["file"],
                source=record["source"],
                expected_class=record["class"],
                recipients=tuple(a for a in record["recipient"].split(";") if a),
            )
        )
    return rows


def load_flufl_bounce() -> ModuleType:
    """Import flufl.bounce, which only the dev extras install."""
    try:
        import flufl.bounce as flufl_bounce
    except ImportError as error:
        raise ImportError(
            "flufl.bounce is not installed, but the bounce accuracy report needs it. Install "
            "the dev extras with: pip install -e '.[dev]'"
        ) from error
    return flufl_bounce


def run_sequencer(raw: bytes) -> ToolVerdict:
    verdict = classify_message(raw)
    recipients = tuple(recipient.address for recipient in verdict.recipients)
    return ToolVerdict(
        output=f"{verdict.kind.value} ({verdict.subtype}): {_format_addresses(recipients)}",
        verdict_class=CLASS_OF_KIND[verdict.kind],
        recipients=recipients,
    )


def flufl_bounce_class(temporary: frozenset[bytes], permanent: frozenset[bytes]) -> str:
    """Map the two sets that flufl.bounce's all_failures returns onto an index class."""
    if permanent:
        return HARD
    if temporary:
        return SOFT
    return NOT_A_BOUNCE


def run_flufl_bounce(flufl_bounce: ModuleType, raw: bytes) -> ToolVerdict:
    message = email.message_from_bytes(raw)
    temporary, permanent = flufl_bounce.all_failures(message)

    permanent_addresses = sorted(address.decode("ascii", "replace") for address in permanent)
    temporary_addresses = sorted(address.decode("ascii", "replace") for address in temporary)
    return ToolVerdict(
        output=(
            f"permanent: {_format_addresses(permanent_addresses)}; "
            f"temporary: {_format_addresses(temporary_addresses)}"
        ),
        verdict_class=flufl_bounce_class(temporary, permanent),
        recipients=tuple(permanent_addresses + temporary_addresses),
    )


def _format_addresses(addresses: Sequence[str]) -> str:
    if not addresses:
        return "none"
    return ", ".join(address or "''" for address in addresses)


def _run_safely(tool: str, run: Callable[[bytes], ToolVerdict], raw: bytes) -> ToolVerdict:
    """Run one tool on one file, and record an exception as that tool's verdict."""
    try:
        return run(raw)
    except Exception as error:  # a crash on one file is a result to report, not a reason to stop
        return ToolVerdict(
            output=f"{tool} raised {type(error).__name__}: {error}",
            verdict_class=ERROR,
            recipients=(),
        )


def evaluate(corpus_dir: Path) -> list[FileResult]:
    """Run both tools on every file in the index, in index order.

    The files are only read, as bytes, because the corpus must stay byte-exact.
    """
    rows = read_index(corpus_dir)
    flufl_bounce = load_flufl_bounce()

    results = []
    for row in rows:
        raw = (corpus_dir / row.file).read_bytes()
        verdicts = {
            SEQUENCER: _run_safely(SEQUENCER, run_sequencer, raw),
            FLUFL_BOUNCE: _run_safely(FLUFL_BOUNCE, partial(run_flufl_bounce, flufl_bounce), raw),
        }
        results.append(FileResult(row=row, verdicts=verdicts))
    return results


# --- scores and disagreements -----------------------------------------------------------------


def score_by_class(results: Sequence[FileResult], tool: str) -> dict[str, Score]:
    """Score one tool per expected class, for the classes that occur in the index."""
    scores = {}
    for name in CLASSES:
        in_class = [result for result in results if result.row.expected_class == name]
        if not in_class:
            continue
        scores[name] = Score(
            files=len(in_class),
            class_correct=sum(result.class_correct(tool) for result in in_class),
            fully_correct=sum(result.fully_correct(tool) for result in in_class),
        )
    return scores


def find_disagreements(results: Sequence[FileResult]) -> list[tuple[str, FileResult]]:
    """List (tool, result) for each tool whose class or recipients differ from the index."""
    return [
        (tool, result) for result in results for tool in TOOLS if not result.fully_correct(tool)
    ]


# --- report -----------------------------------------------------------------------------------


def _version(distribution: str) -> str:
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError as error:
        raise RuntimeError(
            f"package metadata for {distribution} not found. Install the project with: "
            "pip install -e '.[dev]'"
        ) from error


def _cell(text: str) -> str:
    """Escape a Markdown table cell. GitHub tables need "\\|" even inside code spans."""
    return text.replace("|", "\\|")


def _expected_cell(row: IndexRow) -> str:
    addresses = ", ".join(f"`{address}`" for address in row.recipients) or "no address"
    return f"{row.expected_class}: {addresses}"


def _verdict_cell(verdict: ToolVerdict) -> str:
    return f"`{verdict.output}` → {verdict.verdict_class}"


def _corpus_sources(results: Sequence[FileResult]) -> str:
    """Name the repositories and commits the corpus files were copied from."""
    sources = sorted({result.row.source.partition(":")[0] for result in results})
    described = []
    for source in sources:
        repository, _, commit = source.partition("@")
        described.append(f"{repository} at commit {commit}" if commit else repository)
    return " and ".join(described)


def _accuracy_table(results: Sequence[FileResult]) -> list[str]:
    scores = {tool: score_by_class(results, tool) for tool in TOOLS}
    header = "| expected class | files |"
    rule = "|---|---:|"
    for tool in TOOLS:
        header += f" {tool}: class | {tool}: class + recipients |"
        rule += "---:|---:|"
    lines = [header, rule]

    for name in scores[SEQUENCER]:
        line = f"| {name} | {scores[SEQUENCER][name].files} |"
        for tool in TOOLS:
            score = scores[tool][name]
            line += f" {score.class_correct} | {score.fully_correct} |"
        lines.append(line)

    total_line = f"| **total** | **{len(results)}** |"
    for tool in TOOLS:
        class_correct = sum(score.class_correct for score in scores[tool].values())
        fully_correct = sum(score.fully_correct for score in scores[tool].values())
        total_line += f" **{class_correct}** | **{fully_correct}** |"
    lines.append(total_line)
    return lines


def _disagreement_table(
    results: Sequence[FileResult], explanations: dict[tuple[str, str], str]
) -> list[str]:
    disagreements = find_disagreements(results)
    if not disagreements:
        return ["Both tools agree with the index on every file."]

    lines = [
        f"| file | tool | expected | {SEQUENCER} said | {FLUFL_BOUNCE} said | explanation |",
        "|---|---|---|---|---|---|",
    ]
    for tool, result in disagreements:
        explanation = explanations.get(
            (tool, result.row.file),
            "**No explanation recorded**: add one to EXPLANATIONS in sequencer/bounce_accuracy.py.",
        )
        cells = [
            f"`{result.row.file}`",
            tool,
            _expected_cell(result.row),
            _verdict_cell(result.verdicts[SEQUENCER]),
            _verdict_cell(result.verdicts[FLUFL_BOUNCE]),
            explanation,
        ]
        lines.append("| " + " | ".join(_cell(cell) for cell in cells) + " |")
    return lines


def render_report(
    results: Sequence[FileResult],
    explanations: dict[tuple[str, str], str] = EXPLANATIONS,
) -> str:
    """Render the Markdown report. It contains no timestamp or path, so that it is reproducible."""
    python = f"{sys.version_info.major}.{sys.version_info.minor}"
    intro = f"""\
# Bounce classifier accuracy

<!-- Generated by sequencer/bounce_accuracy.py. Do not edit by hand. -->

This page compares the inbound classifier with flufl.bounce, the bounce detector of GNU
Mailman, on the bounce corpus.

- classifier: `sequencer.inbound.classify_message` of {SEQUENCER} {_version(SEQUENCER)}
- {FLUFL_BOUNCE} {_version(FLUFL_BOUNCE)}, on Python {python}
- corpus: {len(results)} messages copied from {_corpus_sources(results)}
- expected results: the corpus's index.tsv, written for this project, which gives the class
  and the recipients of each message

Regenerate this page from the repository root with

    {REGENERATE_COMMAND}

where CORPUS_DIR is the corpus's `bounces` folder (`CORPUS / "bounces"` in tests/conftest.py).
tests/test_bounce_accuracy.py fails when this page differs from the output.
"""
    sections = [
        intro,
        REPORT_MAPPING,
        "## Accuracy\n\nNumber of files each tool got right, per expected class.\n",
        "\n".join(_accuracy_table(results)) + "\n",
        "## Disagreements\n\nOne row per tool and file where the class or the recipients "
        "differ from the index.\n",
        "\n".join(_disagreement_table(results, explanations)) + "\n",
    ]
    return "\n".join(sections)


def build_report(corpus_dir: Path) -> str:
    return render_report(evaluate(corpus_dir))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m sequencer.bounce_accuracy",
        description=(
            "Measure the inbound classifier and flufl.bounce against the bounce corpus and "
            "print a Markdown report."
        ),
    )
    parser.add_argument(
        "corpus_dir", type=Path, help="folder of the bounce corpus (the .eml files and index.tsv)"
    )
    parser.add_argument(
        "--output", type=Path, help="file to write the report to (default: standard output)"
    )
    args = parser.parse_args(argv)

    try:
        report = build_report(args.corpus_dir)
    except (ImportError, OSError, ValueError, RuntimeError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1

    if args.output is None:
        sys.stdout.write(report)
    else:
        args.output.write_text(report, encoding="utf-8", newline="\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
