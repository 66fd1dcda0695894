"""Host-side evaluation of trained models: reward-model accuracy and calibration."""

from rlhf_jax.evals.calibration import (ReliabilityBins, bradley_terry_ceiling,
                                       expected_calibration_error, preference_metrics,
                                       reliability_bins, reliability_diagram)
