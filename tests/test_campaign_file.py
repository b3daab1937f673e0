"""The campaign file format: valid files load, invalid ones name the step and field."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest

from sequencer.campaign import CampaignError, load_campaign, parse_campaign
from sequencer.durations import parse_duration
from sequencer.templates import MissingVariableError, TemplateSyntaxError, render

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def test_examples_load():
    campaign = load_campaign(EXAMPLES / "mixed-outreach.yaml")
    assert campaign.id == "mixed-outreach-demo"
    assert [step.channel.value for step in campaign.steps] == [
        "linkedin",
        "linkedin",
        "email",
        "email",
        "phone",
    ]
    assert load_campaign(EXAMPLES / "email-only.yaml").steps[0].wait_after == timedelta(seconds=5)


@pytest.mark.parametrize(
    "text, seconds",
    [
        ("2d", 172800),
        ("36h", 129600),
        ("90m", 5400),
        ("45s", 45),
        ("1d12h", 129600),
        ("P2D", 172800),
        ("PT36H", 129600),
        ("p1dt1h", 90000),
        (30, 30),
    ],
)
def test_duration_forms(text, seconds):
    assert parse_duration(text).total_seconds() == seconds


@pytest.mark.parametrize("text", ["2x", "-3s", "P", "soon", "", True])
def test_invalid_duration(text):
    with pytest.raises(ValueError, match="invalid"):
        parse_duration(text)


def problems(steps, **fields) -> list[str]:
    data = {"name": "Bad", "sender": {"email": "rep@acme.test"}, "steps": steps, **fields}
    with pytest.raises(CampaignError) as error:
        parse_campaign(data, "bad.yaml")
    return error.value.problems


def test_unknown_step_type_named():
    assert problems([{"type": "sms"}]) == [
        "step 1 (sms): type: unknown step type 'sms'; use one of email, linkedin_visit, "
        "linkedin_invite, linkedin_message, call, manual_task"
    ]


def test_bad_duration_named():
    found = problems([{"type": "linkedin_visit"}, {"type": "linkedin_visit", "wait_after": "2x"}])
    assert found == [
        "step 2 (linkedin_visit): wait_after: invalid duration '2x': use a form "
        "such as 2d, 36h, 90m, 45s or P2D"
    ]


def test_missing_subject_named():
    assert problems([{"type": "email", "body": "Hello"}]) == ["step 1 (email): subject: missing"]


def test_unbalanced_braces_named():
    found = problems([{"type": "email", "subject": "Hi", "body": "Hi {{first_name}"}])
    assert len(found) == 1
    assert found[0].startswith("step 1 (email): body: unbalanced braces")


def test_unknown_field_named():
    found = problems([{"type": "call", "colour": "red"}])
    assert found[0].startswith("step 1 (call): colour: unknown field")


def test_credentials_in_smtp_url_rejected():
    found = problems(
        [{"type": "linkedin_visit"}],
        sender={"email": "rep@acme.test", "smtp_url": "smtp://user:secret@mail.acme.test:587"},
    )
    assert "SEQUENCER_SMTP_PASSWORD" in found[0]
    assert "secret" not in found[0]


def test_every_problem_reported_at_once():
    found = problems([{"type": "sms"}, {"type": "email"}, {"wait_after": "1d"}])
    assert len(found) == 4
    assert found[-1] == "step 3: type: missing; every step needs a type such as email or call"


def test_invalid_yaml_names_line(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("name: X\nsteps:\n  - type: email\n   subject: [\n")
    with pytest.raises(CampaignError, match="line 4"):
        load_campaign(path)


def test_missing_file_named(tmp_path):
    with pytest.raises(CampaignError, match="file not found"):
        load_campaign(tmp_path / "nope.yaml")


def test_render_uses_fallback():
    assert render("Hi {{ first_name | there }}!", {"first_name": "  "}) == "Hi there!"
    assert render("Hi {{first_name}}!", {"first_name": "Ann"}) == "Hi Ann!"


def test_render_refuses_missing_variable():
    with pytest.raises(MissingVariableError) as error:
        render("Hi {{first_name}} from {{company}}", {"first_name": "Ann"})
    assert error.value.names == ["company"]


@pytest.mark.parametrize(
    "template", ["{{first_name}", "{{{first_name}}", "first_name}}", "{{a b}}"]
)
def test_template_syntax_errors(template):
    with pytest.raises(TemplateSyntaxError):
        render(template, {"first_name": "Ann"})


EMAIL_STEP = {"type": "email", "subject": "Hi", "body": "Hello"}


@pytest.mark.parametrize(
    ("settings", "expected"),
    [
        (
            {"sender": {"email": "a@b.co", "daily_limit": 0}},
            "sender.daily_limit: invalid value 0: use a whole number of at least 1",
        ),
        (
            {"max_new_leads_per_day": "many"},
            "max_new_leads_per_day: invalid value 'many': use a whole number",
        ),
        ({"linkedin": {"account": "bad name"}}, "linkedin.account: invalid name 'bad name'"),
        ({"linkedin": "default"}, "linkedin: expected a mapping of fields, not 'default'"),
        ({"schedule": "weekdays"}, "such as {timezone: Europe/Paris"),
        (
            {"schedule": {"timezone": "Mars/Olympus", "start": "9", "end": "17"}},
            "unknown timezone 'Mars/Olympus'",
        ),
        ({"invite_timeout": "0s"}, "invite_timeout: '0s' is not a positive duration"),
        ({"sender": {"email": "a@b.co", "min_spacing": "soon"}}, "sender.min_spacing: invalid"),
    ],
)
def test_limits_and_schedule_errors_named(settings, expected):
    data = {"name": "Limits", "sender": {"email": "a@b.co"}, "steps": [EMAIL_STEP], **settings}
    with pytest.raises(CampaignError) as error:
        parse_campaign(data)
    assert expected in str(error.value)


def test_limits_and_schedule_read():
    campaign = parse_campaign(
        {
            "name": "Limits",
            "sender": {"email": "a@b.co", "daily_limit": 20, "min_spacing": "2m"},
            "linkedin": {"account": "sales-1", "daily_invites": 10},
            "schedule": {"timezone": "Europe/Paris", "days": "mon-fri", "start": 9, "end": 17},
            "invite_timeout": "3d",
            "max_new_leads_per_day": 40,
            "steps": [EMAIL_STEP],
        }
    )
    assert campaign.sender.daily_limit == 20
    assert campaign.sender.min_spacing == timedelta(minutes=2)
    assert campaign.linkedin.account_id == "linkedin:sales-1"
    assert campaign.schedule.describe() == "Mon-Fri 09:00-17:00 Europe/Paris"
    assert campaign.invite_timeout == timedelta(days=3)
    assert parse_campaign(campaign.model_dump(mode="json")) == campaign
