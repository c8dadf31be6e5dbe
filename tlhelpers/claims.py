"""Claims a notebook makes about its measurements, checked where they run.

A notebook that says "the pretrained encoder beats TF-IDF" measures it in
a cell and calls ``expect(condition, claim, measured=...,
failure_means=...)``. The learner sees a tick or a cross with the numbers
and, on a cross, what the failure means; a cross never stops the notebook,
because a claim that depends on a seed may fail for another seed, and
trying one is part of learning. Under ``TLH_STRICT=1`` (CI, ``tlcourse
run``) a cross raises, so a claim the course makes cannot quietly stop
being true. Plain ``assert`` is for invariants (shapes, counts), not for
claims.

This module imports no torch, so it is cheap to import anywhere.
"""

import numbers
import os
from dataclasses import dataclass

_TRUE = {"1", "true", "yes", "on"}
PASS_MARK = "\u2713"
FAIL_MARK = "\u2717"
DEFAULT_FAILURE = ("not this time. The text above describes what the "
                   "course measured; with this seed or setting the "
                   "numbers differ. Try another seed, or ask why.")


class ClaimFailed(AssertionError):
    """A claim the notebook makes did not hold (raised in strict mode)."""


@dataclass(frozen=True)
class Claim:
    """A checked claim: what was said, what was measured, and whether it
    held."""

    claim: str
    held: bool
    measured: str = ""
    failure_means: str = ""

    def __bool__(self):
        return self.held

    def __str__(self):
        mark = PASS_MARK if self.held else FAIL_MARK
        text = f"{mark} {self.claim}"
        if self.measured:
            text += f" (measured: {self.measured})"
        if not self.held:
            text += " \u2013 " + (self.failure_means or DEFAULT_FAILURE)
        return text

    def _ipython_display_(self):
        # expect() has already printed the claim; do not show it twice.
        pass


def _strict(environ=None):
    env = os.environ if environ is None else environ
    return env.get("TLH_STRICT", "").strip().lower() in _TRUE


def _format(measured):
    if measured is None:
        return ""
    if isinstance(measured, dict):
        return ", ".join(f"{k} {_format(v)}" for k, v in measured.items())
    if isinstance(measured, (list, tuple)):
        return "[" + ", ".join(_format(v) for v in measured) + "]"
    if isinstance(measured, numbers.Integral):
        return str(measured)
    if isinstance(measured, numbers.Real):  # float, numpy floats
        return f"{float(measured):.3g}"
    return str(measured)


def expect(condition, claim, measured=None, *, failure_means=None,
           strict=None):
    """Check a claim; print a tick or a cross with the measured numbers.

    Args:
        condition: whether the claim held (anything with a truth value).
        claim: the claim in words, e.g. "the probe beats TF-IDF".
        measured: the numbers behind it, a string, number or dict,
            e.g. {"probe": 0.93, "TF-IDF": 0.31}.
        failure_means: one sentence, shown only on a cross, on what a
            failure means, e.g. "with this seed the gap is within the
            noise"; None gives a generic sentence.
        strict: raise ClaimFailed when the claim fails; None follows
            TLH_STRICT.

    Returns:
        Claim, true when the claim held (so ``if expect(...):`` works).
    """
    if not isinstance(claim, str) or not claim.strip():
        raise ValueError("expect() needs the claim in words as its second "
                         f"argument, got {claim!r}")
    if failure_means is not None and not isinstance(failure_means, str):
        raise TypeError("failure_means must be a sentence (str) saying what "
                        f"a failure means, got {failure_means!r}")
    result = Claim(claim=claim.strip(), held=bool(condition),
                   measured=_format(measured),
                   failure_means=(failure_means or "").strip())
    print(result)
    if not result.held and (_strict() if strict is None else strict):
        raise ClaimFailed(str(result))
    return result
