"""Numbers read from outside (metrics files, commit records, results.json): one test of what counts."""
import math


def is_finite_number(value) -> bool:
    """A real, finite number: an int or float, not a bool, not NaN or inf."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
