"""Epoch rules: RFC 6887 §8.5 and RFC 6886 §3.6, worked values of protocols.md."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from portbroker.epoch import EpochCheck, EpochObservation, check_natpmp_epoch, check_pcp_epoch

PREV = EpochObservation(server_epoch=1000, client_time=5000)


def pcp_after(client_delta: int, server_delta: int) -> EpochCheck:
    current = EpochObservation(1000 + server_delta, 5000 + client_delta)
    return check_pcp_epoch(PREV, current)


def natpmp_after(elapsed: int, new_epoch: int) -> EpochCheck:
    return check_natpmp_epoch(PREV, EpochObservation(new_epoch, 5000 + elapsed))


class TestPcp:
    def test_first_response_is_always_valid(self) -> None:
        assert check_pcp_epoch(None, PREV) is EpochCheck.FIRST
        assert not EpochCheck.FIRST.state_lost

    @pytest.mark.parametrize("server_delta", [73, 80, 87])
    def test_within_a_sixteenth_plus_two_seconds_after_80s(self, server_delta: int) -> None:
        assert pcp_after(80, server_delta) is EpochCheck.VALID

    def test_72_after_80s_is_too_slow(self) -> None:
        assert pcp_after(80, 72) is EpochCheck.TOO_SLOW
        assert EpochCheck.TOO_SLOW.state_lost

    def test_88_after_80s_is_too_fast(self) -> None:
        # PCP, unlike NAT-PMP, also flags an epoch that ran ahead of the clock.
        assert pcp_after(80, 88) is EpochCheck.TOO_FAST

    @pytest.mark.parametrize(
        ("server_delta", "want"),
        [
            (3372, EpochCheck.TOO_SLOW),
            (3373, EpochCheck.VALID),
            (3842, EpochCheck.VALID),
            (3843, EpochCheck.TOO_FAST),
        ],
    )
    def test_bounds_after_an_hour(self, server_delta: int, want: EpochCheck) -> None:
        assert pcp_after(3600, server_delta) is want

    @pytest.mark.parametrize("client_delta", [0, 1])
    def test_one_second_step_back_is_a_reordered_packet(self, client_delta: int) -> None:
        # Valid only with signed deltas; unsigned arithmetic calls it a reset.
        assert pcp_after(client_delta, -1) is EpochCheck.VALID

    def test_one_second_back_two_seconds_later_is_state_lost(self) -> None:
        assert pcp_after(2, -1).state_lost

    def test_going_back_two_seconds_means_state_lost(self) -> None:
        assert pcp_after(0, -2) is EpochCheck.WENT_BACKWARDS

    def test_restart_to_zero(self) -> None:
        assert check_pcp_epoch(PREV, EpochObservation(0, 5001)) is EpochCheck.WENT_BACKWARDS

    def test_fractions_of_client_seconds_are_floored(self) -> None:
        prev = EpochObservation(1000, 5000.9)
        assert check_pcp_epoch(prev, EpochObservation(1080, 5080.1)) is EpochCheck.VALID


class TestNatPmp:
    @pytest.mark.parametrize(("elapsed", "smallest_ok"), [(80, 1068), (3600, 4148)])
    def test_smallest_epoch_that_is_not_a_reboot(self, elapsed: int, smallest_ok: int) -> None:
        assert natpmp_after(elapsed, smallest_ok) is EpochCheck.VALID
        assert natpmp_after(elapsed, smallest_ok - 1) is EpochCheck.TOO_SLOW

    def test_no_upper_limit(self) -> None:
        assert natpmp_after(80, 10**9) is EpochCheck.VALID

    def test_estimate_is_built_on_the_previous_epoch(self) -> None:
        # libplum adds the elapsed time to the *current* epoch and so calls any
        # reply 3 s after the last a reboot. A steady gateway must stay valid.
        assert natpmp_after(3, 1003) is EpochCheck.VALID
        assert natpmp_after(600, 1600) is EpochCheck.VALID

    def test_restart(self) -> None:
        assert natpmp_after(10, 0) is EpochCheck.TOO_SLOW


@given(st.integers(0, 2**31), st.integers(0, 10**7), st.floats(0, 1e9))
def test_a_gateway_whose_epoch_follows_the_clock_is_always_valid(
    start: int, elapsed: int, t0: float
) -> None:
    prev = EpochObservation(start, t0)
    current = EpochObservation(min(start + elapsed, 2**32 - 1), t0 + elapsed)
    if current.server_epoch == start + elapsed:
        assert check_pcp_epoch(prev, current) is EpochCheck.VALID
        assert check_natpmp_epoch(prev, current) is EpochCheck.VALID
