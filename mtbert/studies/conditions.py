"""Conditional parameters of a sweep spec: the `when:` of a space entry.

`when: {train.schedule: proportional}` samples the parameter only where that
key has that value; a list of values matches any of them
(`{train.schedule: [proportional, annealed]}`), and a list of mappings holds
where any of them does (`[{train.schedule: triple_batch}, {train.batches_per_step: 3}]`).
A key the trial does not sample reads the spec's base.
"""

from __future__ import annotations

from typing import Any, Callable

When = dict[str, Any] | list[dict[str, Any]]


def when_alternatives(when: When) -> list[dict[str, list]]:
    """A `when:` as alternatives, any of which holds, each mapping keys to the values any
    of which matches (a list-valued key's value is matched by a list of lists)."""
    alternatives = when if isinstance(when, list) else [when] if when else []
    return [{k: v if isinstance(v, list) else [v] for k, v in alternative.items()}
            for alternative in alternatives]


def when_holds(when: When, value_of: Callable[[str], Any]) -> bool:
    """Whether `when` holds for the values `value_of(key)` gives (no `when`: always)."""
    alternatives = when_alternatives(when)
    return not alternatives or any(all(value_of(k) in values for k, values in alt.items())
                                   for alt in alternatives)


def describe_when(when: When) -> str:
    """`when` in words: 'train.schedule is triple_batch, or loss.method is sum or dwa'."""
    return ", or ".join(" and ".join(f"{k} is {' or '.join(map(str, values))}"
                                     for k, values in alternative.items())
                        for alternative in when_alternatives(when))
