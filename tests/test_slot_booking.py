"""Sending slots booked in the database: the same slots as the account workflow would give,
one booking at a time per account whichever worker books, on SQLite and PostgreSQL."""

from __future__ import annotations

import random
import threading
from datetime import UTC, datetime, timedelta

import pytest

from sequencer.campaign import Sender
from sequencer.models import AccountRef, SlotRequest
from sequencer.storage import Store
from tests.test_lead_machine import _naive_next_free as plain_next_free
from workflows.sender_account import Slot

T0 = datetime(2026, 3, 1, 9, 0, tzinfo=UTC)
DAY = timedelta(days=1)
SENDER = Sender(email="rep@acme.test")
ACCOUNT = AccountRef(id=SENDER.account_id, channel="email", sender=SENDER)


@pytest.fixture
def store(database_url):
    """A store on SQLite, then on PostgreSQL."""
    result = Store(database_url)
    yield result
    result.close()


def request(
    workflow_id: str,
    step: int = 1,
    kind: str = "email",
    cap: int | None = None,
    spacing: timedelta = timedelta(0),
    account: AccountRef = ACCOUNT,
) -> SlotRequest:
    return SlotRequest(
        account=account, workflow_id=workflow_id, step=step, kind=kind, cap=cap, spacing=spacing
    )


def test_booking_again_returns_the_same_slot(store):
    first = store.book_slot(request("lead-1", spacing=timedelta(minutes=10)), T0)
    other = store.book_slot(request("lead-2", spacing=timedelta(minutes=10)), T0)
    again = store.book_slot(request("lead-1", spacing=timedelta(minutes=10)), T0 + DAY / 2)
    assert (first.at, first.reason) == (T0, None)
    assert (other.at, other.reason) == (T0 + timedelta(minutes=10), "spacing")
    # Asked again later, as a retried activity would: the same slot, not before now.
    assert again.granted and again.at == T0 + DAY / 2


def test_cap_holds_the_next_send_a_day(store):
    grants = [store.book_slot(request(f"lead-{n}", cap=2), T0) for n in range(3)]
    assert [g.at for g in grants[:2]] == [T0, T0]
    assert grants[2].reason == "cap"
    assert grants[2].at == T0 + DAY + timedelta(minutes=1)
    assert grants[2].detail == "email:rep@acme.test reached its limit of 2 email sends in 24 hours"
    # Another kind on the same account has a cap of its own.
    visit = store.book_slot(request("lead-0", step=2, kind="linkedin_visit", cap=2), T0)
    assert visit.at == T0


def test_disconnected_account_books_nothing(store):
    store.set_account_connected(ACCOUNT, False, "535 authentication failed")
    assert store.book_slot(request("lead-1"), T0) is None
    [row] = store.sender_accounts()
    assert (row.connected, row.reason, row.booked_ahead) == (False, "535 authentication failed", 0)
    store.set_account_connected(ACCOUNT, True)
    assert store.book_slot(request("lead-1"), T0).at == T0


def test_release_frees_only_slots_ahead(store):
    spacing = timedelta(minutes=10)
    now = datetime.now(UTC)
    store.book_slot(request("lead-1", spacing=spacing), now - timedelta(minutes=30))
    store.book_slot(request("lead-2", spacing=spacing), now)
    later = store.book_slot(request("lead-3", spacing=spacing), now)
    assert later.at == now + spacing
    assert store.release_slots("lead-1", now) == 0  # already sent
    assert store.release_slots("lead-3", now, account_id="email:other@acme.test") == 0
    assert store.release_slots("lead-3", now) == 1
    [row] = store.sender_accounts()
    assert row.sends_last_24h == {"email": 2}
    assert row.booked_ahead == 0
    # The freed slot goes to the next lead.
    assert store.book_slot(request("lead-4", spacing=spacing), now).at == now + spacing


def test_bookings_match_the_plain_rules(store):
    """Random bookings and releases over three days give the slots of the obvious scan."""
    generator = random.Random(11)
    reference: list[Slot] = []
    now = T0
    for number in range(300):
        now += timedelta(minutes=generator.choice([0, 1, 7, 30, 180, 600]))
        kind = generator.choice(["email", "linkedin_visit", "linkedin_invite"])
        cap = generator.choice([None, 3, 5, 20])
        spacing = timedelta(minutes=generator.choice([0, 2, 10]))
        # The account drops sends that no 24-hour window from now can hold.
        reference = [s for s in reference if s.at > now - DAY]
        expected = plain_next_free(reference, now, kind, cap, spacing)
        grant = store.book_slot(request(f"w{number}", kind=kind, cap=cap, spacing=spacing), now)
        assert (grant.at, grant.reason) == expected, number
        reference.append(Slot(at=grant.at, kind=kind, workflow_id=f"w{number}", step=1))
        if number % 9 == 0:
            victim = generator.choice(reference)
            freed = store.release_slots(victim.workflow_id, now)
            assert freed == (1 if victim.at > now else 0)
            if freed:
                reference.remove(victim)


def test_workers_booking_at_once_never_share_a_slot(store):
    """Eight workers, each with a connection pool of its own, book 25 slots each at once."""
    spacing = timedelta(minutes=1)
    grants = []
    failures = []

    def worker(number: int) -> None:
        own = Store(store.url)
        try:
            for lead in range(25):
                grant = own.book_slot(request(f"w{number}-{lead}", spacing=spacing, cap=150), T0)
                grants.append(grant.at)
        except Exception as error:  # noqa: BLE001 - reported by the assertion below
            failures.append(error)
        finally:
            own.close()

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert failures == []
    times = sorted(grants)
    assert len(times) == 200
    assert all(b - a >= spacing for a, b in zip(times, times[1:], strict=False))
    # The first 150 fit the cap on the first day, one minute apart; the rest wait a day.
    assert times[149] == T0 + 149 * spacing
    assert times[150] >= T0 + DAY
