"""The figures the GPU benches print, on arrays whose answers are known."""

import numpy as np

from bench.fidelity import _deviation, _errors


def test_errors_and_their_sum_are_over_the_responses_that_have_a_reference():
    stored = np.array([10.0, 20.0, 99.0, 40.0])
    reference = np.array([10.0, 19.0, np.nan, 44.0])  # the third check's repeats made other tokens
    e = _errors(stored, reference)
    assert e["n"] == 3
    assert e["sum"] == (10 + 20 + 40) / (10 + 19 + 44) - 1
    assert e["max"] == abs(40 / 44 - 1) and e["median"] == abs(20 / 19 - 1)


def test_a_response_without_its_own_figure_is_left_out_of_both_sides_of_the_sum():
    window = np.array([np.nan, 11.0, 22.0])  # the counter did not move in the first window
    assert _errors(window, np.array([5.0, 10.0, 20.0]))["sum"] == (11 + 22) / (10 + 20) - 1
    assert np.isnan(_errors(np.array([np.nan]), np.array([1.0]))["median"])


def test_the_served_time_against_the_repeats_is_a_median_size_and_a_signed_range():
    d = _deviation(np.array([1.1, 0.8, 1.0]), np.array([1.0, 1.0, 1.0]))
    assert abs(d["median"] - 0.1) < 1e-12 and abs(d["min"] + 0.2) < 1e-12 and abs(d["max"] - 0.1) < 1e-12
    assert np.isnan(_deviation(np.array([np.nan]), np.array([1.0]))["median"])
