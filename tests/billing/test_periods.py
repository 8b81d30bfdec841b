"""Budget periods: calendar days, weeks (from Monday) and months in the team's timezone.

Expected boundaries are written out by hand as UTC instants, so a test reads as the
calendar it describes.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest
from hypothesis import given
from hypothesis import strategies as st

from billing.periods import Period, current_period


def utc(
    year: int, month: int, day: int, hour: int = 0, minute: int = 0, second: int = 0, us: int = 0
) -> datetime:
    return datetime(year, month, day, hour, minute, second, us, tzinfo=UTC)


def length(period: Period) -> timedelta:
    assert period.start is not None and period.end is not None
    return period.end - period.start


HOUR = timedelta(hours=1)
TICK = timedelta(microseconds=1)


# --- UTC ------------------------------------------------------------------------------------------


def test_it_makes_a_utc_day_from_midnight_to_midnight():
    period = current_period("daily", "UTC", utc(2024, 3, 15, 13, 45))

    assert period == Period("d20240315", utc(2024, 3, 15), utc(2024, 3, 16))


def test_it_starts_the_next_day_exactly_at_midnight():
    before = current_period("daily", "UTC", utc(2024, 3, 15, 23, 59, 59, 999999))
    at = current_period("daily", "UTC", utc(2024, 3, 16))

    assert before.end == at.start == utc(2024, 3, 16)
    assert before.id == "d20240315"
    assert at.id == "d20240316"


def test_it_starts_a_week_on_monday():
    friday = current_period("weekly", "UTC", utc(2024, 3, 15, 12))
    monday_midnight = current_period("weekly", "UTC", utc(2024, 3, 11))
    sunday_night = current_period("weekly", "UTC", utc(2024, 3, 17, 23, 59, 59))

    assert friday == Period("w20240311", utc(2024, 3, 11), utc(2024, 3, 18))
    assert monday_midnight == friday
    assert sunday_night == friday
    assert current_period("weekly", "UTC", utc(2024, 3, 18)).start == utc(2024, 3, 18)


def test_it_makes_a_calendar_month_including_a_leap_february():
    period = current_period("monthly", "UTC", utc(2024, 2, 29, 23, 59, 59))

    assert period == Period("m202402", utc(2024, 2, 1), utc(2024, 3, 1))
    assert current_period("monthly", "UTC", utc(2023, 2, 10)).end == utc(2023, 3, 1)
    assert current_period("monthly", "UTC", utc(2024, 4, 30)).end == utc(2024, 5, 1)


def test_it_rolls_december_over_into_january_of_the_next_year():
    december = current_period("monthly", "UTC", utc(2024, 12, 31, 23, 30))
    january = current_period("monthly", "UTC", utc(2025, 1, 1))

    assert december == Period("m202412", utc(2024, 12, 1), utc(2025, 1, 1))
    assert january == Period("m202501", utc(2025, 1, 1), utc(2025, 2, 1))
    assert current_period("daily", "UTC", utc(2024, 12, 31, 12)).end == utc(2025, 1, 1)
    # 2025-01-01 is a Wednesday: its week began on Monday 2024-12-30.
    assert current_period("weekly", "UTC", utc(2025, 1, 1, 12)) == Period(
        "w20241230", utc(2024, 12, 30), utc(2025, 1, 6)
    )


def test_it_gives_total_credit_no_window():
    period = current_period("total", "America/New_York", utc(2024, 12, 31, 23, 30))

    assert period == Period("total", None, None)
    assert current_period("total", "UTC", utc(1999, 1, 1)) == period


# --- other timezones ------------------------------------------------------------------------------


def test_it_aligns_days_to_midnight_in_new_york():
    # 03:00 UTC on 15 March 2024 is still 23:00 on the 14th in New York (EDT, UTC-4).
    period = current_period("daily", "America/New_York", utc(2024, 3, 15, 3))

    assert period == Period("d20240314", utc(2024, 3, 14, 4), utc(2024, 3, 15, 4))


def test_it_aligns_days_to_midnight_in_kolkata():
    # 20:00 UTC is already 01:30 the next day in Kolkata (IST, UTC+5:30).
    period = current_period("daily", "Asia/Kolkata", utc(2024, 3, 15, 20))

    assert period == Period("d20240316", utc(2024, 3, 15, 18, 30), utc(2024, 3, 16, 18, 30))


def test_it_aligns_weeks_to_monday_in_kolkata():
    # Sunday 18:45 UTC is Monday 00:15 in Kolkata: a new week there, not yet in UTC.
    period = current_period("weekly", "Asia/Kolkata", utc(2024, 3, 17, 18, 45))

    assert period == Period("w20240318", utc(2024, 3, 17, 18, 30), utc(2024, 3, 24, 18, 30))
    assert current_period("weekly", "UTC", utc(2024, 3, 17, 18, 45)).id == "w20240311"


def test_it_rolls_the_year_over_in_local_time():
    # 23:00 on New Year's Eve in New York is 04:00 UTC on 1 January: still December there.
    new_york = current_period("monthly", "America/New_York", utc(2025, 1, 1, 4))
    # 19:00 UTC on 31 December is 00:30 on 1 January in Kolkata: already January there.
    kolkata = current_period("monthly", "Asia/Kolkata", utc(2024, 12, 31, 19))

    assert new_york == Period("m202412", utc(2024, 12, 1, 5), utc(2025, 1, 1, 5))
    assert kolkata == Period("m202501", utc(2024, 12, 31, 18, 30), utc(2025, 1, 31, 18, 30))


# --- daylight saving time ------------------------------------------------------------------------


def test_it_makes_the_spring_forward_day_23_hours_long():
    # New York skipped 02:00-03:00 on Sunday 10 March 2024.
    period = current_period("daily", "America/New_York", utc(2024, 3, 10, 15))

    assert period == Period("d20240310", utc(2024, 3, 10, 5), utc(2024, 3, 11, 4))
    assert length(period) == timedelta(hours=23)


def test_it_makes_the_fall_back_day_25_hours_long():
    # New York repeated 01:00-02:00 on Sunday 3 November 2024.
    period = current_period("daily", "America/New_York", utc(2024, 11, 3, 15))

    assert period == Period("d20241103", utc(2024, 11, 3, 4), utc(2024, 11, 4, 5))
    assert length(period) == timedelta(hours=25)
    # Both passes through the repeated hour belong to that one day.
    assert current_period("daily", "America/New_York", utc(2024, 11, 3, 5, 30)) == period
    assert current_period("daily", "America/New_York", utc(2024, 11, 3, 6, 30)) == period


def test_it_makes_a_week_across_a_dst_change_167_hours_long():
    # The week of Monday 4 March 2024 starts in EST and ends in EDT.
    period = current_period("weekly", "America/New_York", utc(2024, 3, 10, 16))

    assert period == Period("w20240304", utc(2024, 3, 4, 5), utc(2024, 3, 11, 4))
    assert length(period) == timedelta(hours=167)


def test_it_makes_a_month_across_a_dst_change_in_local_months():
    period = current_period("monthly", "America/New_York", utc(2024, 11, 15))

    # 1 November is EDT (UTC-4), 1 December is EST (UTC-5).
    assert period == Period("m202411", utc(2024, 11, 1, 4), utc(2024, 12, 1, 5))


@pytest.mark.parametrize(
    ("tz", "start", "end"),
    [
        # Havana ends DST at 01:00 → 00:00: on 3 November 2024 midnight happens twice.
        ("America/Havana", utc(2024, 11, 3, 4), utc(2024, 11, 4, 5)),
        # So do the Azores (UTC+0 → UTC-1 at 01:00 local) on 27 October 2024.
        ("Atlantic/Azores", utc(2024, 10, 27, 0), utc(2024, 10, 28, 1)),
    ],
)
def test_it_keeps_one_day_through_a_repeated_midnight_hour(tz, start, end):
    """The day starts at the first midnight and lasts 25 hours.

    A request in the second pass through 00:00-01:00 is in that same day, with the
    same start and end: otherwise the budget counter (keyed by the id) and the ledger
    window (start..end) of one period disagree, and the hour between the two midnights
    belongs to no window at all.
    """
    first_pass = current_period("daily", tz, start + timedelta(minutes=30))
    second_pass = current_period("daily", tz, start + HOUR + timedelta(minutes=30))
    day_before = current_period("daily", tz, start - TICK)

    assert first_pass.start == start and first_pass.end == end
    assert second_pass == first_pass
    assert day_before.end == first_pass.start


# --- properties over many instants and zones -----------------------------------------------------

ZONES = [
    "UTC",
    "America/New_York",
    "Asia/Kolkata",
    "Europe/London",
    "Australia/Lord_Howe",  # a 30-minute DST shift
    "Asia/Kathmandu",  # UTC+5:45
    "Pacific/Chatham",  # UTC+12:45 / +13:45
    "America/Sao_Paulo",  # used to change clocks at midnight
    "Pacific/Apia",  # skipped 30 December 2011 entirely
]
instants = st.datetimes(
    min_value=datetime(2000, 1, 1), max_value=datetime(2037, 12, 31), timezones=st.just(UTC)
)


@given(
    now=instants, tz=st.sampled_from(ZONES), kind=st.sampled_from(["daily", "weekly", "monthly"])
)
def test_it_puts_every_instant_in_a_period_that_starts_at_a_local_calendar_boundary(now, tz, kind):
    period = current_period(kind, tz, now)

    assert period.start is not None and period.end is not None
    assert period.start.utcoffset() == timedelta(0) and period.end.utcoffset() == timedelta(0)
    assert period.start <= now < period.end
    # Contiguous: the instant at the end opens the next period, the one before the start
    # closes the previous one.
    following = current_period(kind, tz, period.end)
    previous = current_period(kind, tz, period.start - TICK)
    assert following.start == period.end and following.id != period.id
    assert previous.end == period.start and previous.id != period.id
    # Stable: the first and last instants name the very same period.
    assert current_period(kind, tz, period.start) == period
    assert current_period(kind, tz, period.end - TICK) == period
    # The id is the local calendar date (or month) the window begins on.
    local_now = now.astimezone(ZoneInfo(tz))
    if kind == "daily":
        assert period.id == local_now.strftime("d%Y%m%d")
        assert timedelta(hours=22) <= period.end - period.start <= timedelta(hours=26)
    elif kind == "monthly":
        assert period.id == local_now.strftime("m%Y%m")
    else:
        monday = local_now.date() - timedelta(days=local_now.weekday())
        assert period.id == monday.strftime("w%Y%m%d")
        assert (
            timedelta(days=7) - 2 * HOUR
            <= period.end - period.start
            <= timedelta(days=7) + 2 * HOUR
        )


@pytest.mark.parametrize("kind", ["daily", "weekly", "monthly"])
def test_it_reads_the_clock_when_no_instant_is_given(kind):
    before = datetime.now(UTC)
    period = current_period(kind, "Asia/Kolkata")
    after = datetime.now(UTC)

    assert period.start is not None and period.end is not None
    assert period.start <= after and before < period.end
