"""Tests for tlhelpers.claims: ticks for learners, errors in strict mode."""

import subprocess
import sys

import pytest

from tlhelpers import claims


def test_a_claim_that_holds_prints_a_tick_with_the_numbers(capsys):
    result = claims.expect(0.9 > 0.3, "the probe beats TF-IDF",
                           measured={"probe": 0.9, "TF-IDF": 0.3})
    out = capsys.readouterr().out
    assert result.held and bool(result)
    assert out.startswith(claims.PASS_MARK)
    assert "the probe beats TF-IDF" in out
    assert "probe 0.9, TF-IDF 0.3" in out


def test_a_failed_claim_prints_a_cross_and_does_not_raise(capsys,
                                                           monkeypatch):
    monkeypatch.delenv("TLH_STRICT", raising=False)
    result = claims.expect(False, "fine-tuning wins", measured=0.25)
    out = capsys.readouterr().out
    assert not result.held and not bool(result)
    assert out.startswith(claims.FAIL_MARK)
    assert "0.25" in out and "another seed" in out


def test_a_failed_claim_raises_under_tlh_strict(monkeypatch):
    monkeypatch.setenv("TLH_STRICT", "1")
    with pytest.raises(claims.ClaimFailed, match="fine-tuning wins"):
        claims.expect(False, "fine-tuning wins", measured=0.25)
    # A claim that holds never raises, strict or not.
    assert claims.expect(True, "the probe wins")


def test_strict_argument_overrides_the_environment(monkeypatch):
    monkeypatch.setenv("TLH_STRICT", "1")
    assert not claims.expect(False, "a claim", strict=False)
    monkeypatch.delenv("TLH_STRICT")
    with pytest.raises(AssertionError):
        claims.expect(False, "a claim", strict=True)


def test_a_claim_needs_words():
    with pytest.raises(ValueError, match="claim in words"):
        claims.expect(True, "")


def test_claims_module_does_not_import_torch():
    code = ("import sys, tlhelpers.claims; "
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True,
                         text=True, check=True).stdout.strip()
    assert out == "False"


def test_a_failed_claim_says_what_its_failure_means(capsys, monkeypatch):
    monkeypatch.delenv("TLH_STRICT", raising=False)
    claims.expect(False, "fine-tuning beats the probe",
                  measured={"gap": 0.01},
                  failure_means="the gap is within the seeds' spread")
    out = capsys.readouterr().out.strip()
    assert out == (f"{claims.FAIL_MARK} fine-tuning beats the probe "
                   "(measured: gap 0.01) \u2013 the gap is within the "
                   "seeds' spread")
    # A claim that holds does not show what a failure would mean.
    claims.expect(True, "the probe wins", failure_means="never shown")
    assert "never shown" not in capsys.readouterr().out


def test_strict_error_carries_the_failure_sentence(monkeypatch):
    monkeypatch.setenv("TLH_STRICT", "yes")
    with pytest.raises(claims.ClaimFailed, match="within the spread"):
        claims.expect(0, "a wins", failure_means="within the spread")


def test_measured_numbers_are_rounded_readably(capsys):
    import numpy as np

    claims.expect(True, "spread", measured={
        "mean": np.float32(0.912345), "seeds": 3,
        "range": (0.8999, np.float64(0.93456))})
    out = capsys.readouterr().out
    assert "mean 0.912, seeds 3, range [0.9, 0.935]" in out


def test_failure_means_must_be_a_sentence():
    with pytest.raises(TypeError, match="failure_means"):
        claims.expect(True, "a claim", failure_means=1)
