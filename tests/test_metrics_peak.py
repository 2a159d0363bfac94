"""The spec-peak table behind every MFU figure (the loop's `mfu`, benchmarks/train_step.py, BENCHMARKS.md)."""
import logging

import pytest

from kanana_jax.train import metrics


@pytest.mark.parametrize("kind,tflops", [("NVIDIA H200", 989.0), ("NVIDIA H100 80GB HBM3", 989.0),
                                         ("TPU v5p", 459.0), ("TPU v5 lite", 197.0), ("TPU v6 lite", 918.0),
                                         ("TPU v4", 275.0), ("TPU7x", 2307.0)])
def test_spec_peak_by_device_kind(kind, tflops):
    assert metrics.spec_peak_tflops(kind) == tflops
    assert metrics.peak_flops_per_device(0.0) > 0  # this CPU: measured, not in the table
    assert metrics.peak_flops_per_device(123.0) == 123e12


def test_unlisted_device_is_none_and_the_fallback_says_so_once(caplog):
    assert metrics.spec_peak_tflops("cpu") is None
    metrics._SAID_NO_PEAK.clear()
    with caplog.at_level(logging.INFO, logger="kanana_jax.train"):
        metrics.peak_flops_per_device(0.0)
        metrics.peak_flops_per_device(0.0)
    said = [r for r in caplog.records if "no spec peak" in r.getMessage()]
    assert len(said) == 1 and "train.peak_tflops_per_device" in said[0].getMessage()
    assert said[0].levelno == logging.INFO   # a CPU: not a warning on the happy path
