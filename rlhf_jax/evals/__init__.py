"""Host-side evaluation of trained models: reward-model accuracy and calibration."""

from rlhf_jax.evals.calibration import (ReliabilityBins, bradley_terry_ceiling, equal_mass_bins,
                                       expected_calibration_error, log_loss, preference_metrics,
                                       reliability_bins, reliability_diagram)
