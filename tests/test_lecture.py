"""The lecture experiment: its measurements on hand-made inputs, every stage at a micro scale
end to end, and its notebook executed on that run's workdir.

The micro run checks the wiring, the keys and the files, not the science (README reports the
tiny preset's figures)."""

import importlib.util
import json
import pathlib
import shutil

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from scipy.special import log_softmax

from rlhf_jax import parallel, stages
from rlhf_jax.analysis import lecture
from rlhf_jax.config import load_config
from rlhf_jax.engine.metrics import read_metrics
from rlhf_jax.errors import InputError
from rlhf_jax.evals import equal_mass_bins, expected_calibration_error, log_loss
from rlhf_jax.evals.confidence import AnswerConfidence
from rlhf_jax.playground.labelers import answer_words
from rlhf_jax.sampling.text import TextSamples
from test_kv_cache import LLAMA, forward, random_model

ROOT = pathlib.Path(__file__).resolve().parents[1]
PNG = b'\x89PNG\r\n\x1a\n'


def load_experiment():
  spec = importlib.util.spec_from_file_location('lecture_experiment',
                                                ROOT / 'experiments' / 'lecture.py')
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_equal_mass_bins_and_their_ece_by_hand():
  confidence, correct = [0.9, 0.1, 0.3, 0.2], [1, 0, 1, 0]
  bins = equal_mass_bins(confidence, correct, num_bins=2)  # {0.1, 0.2} and {0.3, 0.9}.
  np.testing.assert_allclose(bins.confidence, [0.15, 0.6])
  np.testing.assert_allclose(bins.frequency, [0.0, 1.0])
  np.testing.assert_array_equal(bins.count, [2, 2])
  np.testing.assert_allclose(bins.edges, [0.1, 0.3, 0.9])
  # ECE = ½ · |0 − 0.15| + ½ · |1 − 0.6|.
  assert expected_calibration_error(confidence, correct, num_bins=2,
                                    equal_mass=True) == pytest.approx(0.275)
  assert lecture.calibration_statistic(2)(np.array(confidence), np.array(correct)) == (
      pytest.approx(0.275))
  # Five answers in two bins: three and two; equal width would leave [0.5, 1] with one.
  assert equal_mass_bins([0.1, 0.15, 0.2, 0.25, 0.9], [0] * 5, num_bins=2).count.tolist() == [3, 2]
  with pytest.raises(InputError, match='num_bins=5'):
    equal_mass_bins([0.5] * 4, [1] * 4, num_bins=5)


def test_log_loss_and_the_fitted_temperature_by_hand():
  assert log_loss([0.8, 0.4], [1, 0]) == pytest.approx(-(np.log(0.8) + np.log(0.6)) / 2)
  correct = np.array([1, 0, 1, 1])  # Accuracy 0.75: confidence 0.75 has the least log loss.
  rows = np.array([[0.99] * 4, [0.75] * 4, [0.5] * 4])
  assert lecture.fit_temperature(rows, correct, (0.5, 1.0, 2.0)) == 1.0
  with pytest.raises(InputError, match='3 rows of confidences for 2 temperatures'):
    lecture.fit_temperature(rows, correct, (0.5, 1.0))


def test_distinct_answers_trend_and_bootstrap_by_hand():
  # Two samples (rows) of two prompts: the first prompt's differ, the second's agree.
  assert lecture.distinct_answers([['a', 'b'], ['c', 'b']]) == 1.5
  assert lecture.trend([3.0, 2.0, 1.0]) == pytest.approx(-1.0)
  assert lecture.trend([1.0, 3.0, 2.0]) == pytest.approx(1 / 3)
  values = np.tile([0.0, 1.0], 100)
  low, high = lecture.bootstrap_interval(lambda i: values[i].mean(), values.size)
  assert 0.4 < low < 0.5 < high < 0.6
  assert lecture.bootstrap_interval(lambda i: np.ones(8)[i].mean(), 8) == [1.0, 1.0]


def point(method, run, step, kl, gold):
  return lecture.Point(method, run, step, np.full(len(gold), kl), np.array(gold, float))


def test_the_envelope_takes_the_best_point_per_method_and_kl_bin():
  points = [point('dpo', 'a', 1, 0.05, [1, 0]), point('dpo', 'a', 2, 0.07, [1, 1]),
            point('dpo', 'b', 1, 0.30, [0, 0]), point('ppo', 'c', 1, 0.2, [0, 1])]
  rows = lecture.envelope(points, (0.0, 0.1, 0.25, 0.5), num_resamples=200)
  assert [(r['method'], r['kl_lo'], r['gold'], r['run'], r['step']) for r in rows] == [
      ('dpo', 0.0, 1.0, 'a', 2), ('dpo', 0.25, 0.0, 'b', 1), ('ppo', 0.1, 0.5, 'c', 1)]
  assert rows[0]['ci'] == [1.0, 1.0]  # The bin's best is 1 on every resample of the prompts.
  assert rows[2]['ci'] == [0.0, 1.0]  # Two prompts, 0 and 1: every mean from 0 to 1.
  with pytest.raises(InputError, match='same prompts'):
    lecture.envelope(points + [point('bon', 'd', 1, 0.0, [1, 1, 1])], (0.0, 1.0))


def test_the_frontier_table_names_a_method_that_never_left_its_start():
  points = [point('dpo', 'a', 0, 0.0, [0, 1]), point('dpo', 'a', 1, 0.3, [1, 1]),
            point('ppo', 'b', 0, 0.0, [1, 0]), point('ppo', 'b', 1, 0.4, [0, 0])]
  best = {r['method']: r for r in lecture.envelope(points, (0.0, np.inf), num_resamples=20)}
  assert (best['dpo']['kl'], best['ppo']['kl']) == (0.3, 0.0)
  table = lecture.frontier_table({'best': best, 'envelope': []})
  assert 'Never above its start on this run (best point at KL 0): ppo.' in table
  best.pop('ppo')
  assert not any('Never above' in line for line in lecture.frontier_table(
      {'best': best, 'envelope': []}))


def test_a_hump_needs_its_last_point_below_its_best_on_resampled_prompts():
  falls = lecture.hump([point('dpo', 'a', 0, 0.0, [0.5] * 4), point('dpo', 'a', 10, 1.0, [1] * 4),
                        point('dpo', 'a', 20, 2.0, [0] * 4)], num_resamples=50)
  assert (falls['best_step'], falls['start_gold'], falls['best_gold'], falls['last_gold']) == (
      10, 0.5, 1.0, 0.0)
  assert falls['best_minus_last_ci'] == [1.0, 1.0] and falls['ends_below_peak']
  rises = lecture.hump([point('dpo', 'a', 0, 0.0, [0, 0]), point('dpo', 'a', 5, 1.0, [1, 1])],
                       num_resamples=50)
  assert rises['best_step'] == 5 and rises['best_minus_last_ci'] == [0.0, 0.0]
  assert not rises['ends_below_peak']
  # The middle point is best on the mean, but on resamples of the second prompt alone the last
  # point is as good: not a fall.
  tie = lecture.hump([point('dpo', 'a', 0, 0.0, [0, 0]), point('dpo', 'a', 5, 1.0, [1, 0]),
                      point('dpo', 'a', 9, 2.0, [0, 1])], num_resamples=200)
  assert tie['best_step'] == 5 and tie['best_minus_last_ci'][0] == 0.0
  assert not tie['ends_below_peak']
  with pytest.raises(InputError, match='at least 2 evaluations'):
    lecture.hump([point('dpo', 'a', 0, 0.0, [0])])


def test_direct_alignment_fits_gaos_rl_form_per_loss_and_ranks_accuracy_against_gold():
  # Gold gained d (α − β log d) with α = β = 0.1 (peak at d = 1) at d = 0.5, 1, 2 (KL = d²).
  d = np.array([0.5, 1.0, 2.0])
  gold = 0.5 + d * (0.1 - 0.1 * np.log(d))
  points = [point('ipo', 'ipo/beta0.1', 0, 0.0, [0.5] * 3)] + [
      point('ipo', 'ipo/beta0.1', step, kl, [g] * 3)
      for step, kl, g in zip((10, 20, 30), d**2, gold)]
  result = lecture.direct_alignment_overoptimization(
      {'ipo': {0.1: points}}, {'ipo': {0.1: [0.0, 0.6, 0.7, 0.8]}}, num_resamples=20)
  fit = result['fit']['ipo']
  assert (fit['alpha'], fit['beta'], result['r2']['ipo']) == pytest.approx((0.1, 0.1, 1.0))
  assert fit['peak_d'] == pytest.approx(1.0)
  assert result['max_kl']['ipo'] == pytest.approx(4.0)
  assert result['peak_fraction_of_epoch'] == {'ipo': {'0.1': pytest.approx(20 / 30)}}
  assert result['runs']['ipo']['0.1']['ends_below_peak']
  # Accuracy ranks 1, 2, 3; gold ranks 2, 3, 1: ρ = 1 − 6 (1 + 1 + 4) / (3 · 8) = −0.5.
  spearman = result['accuracy_gold_spearman']
  assert (spearman['rho'], spearman['points']) == (pytest.approx(-0.5), 3)
  assert result['curves']['ipo']['0.1']['d'] == pytest.approx([0.0, *d])
  table = '\n'.join(lecture.daa_overoptimization_table(result))
  # Last gold: 0.5 + 2 (0.1 − 0.1 ln 2) = 0.5614.
  assert '| ipo | 0.1 | 20 (0.67) | 0.500 → 0.600 → 0.561 |' in table and 'ρ = -0.50' in table
  flat = lecture.direct_alignment_overoptimization(
      {'ipo': {0.1: points}}, {'ipo': {0.1: [0.0, 0.5, 0.5, 0.5]}}, num_resamples=20)
  assert flat['accuracy_gold_spearman'] == {'rho': None, 'p': None, 'points': 3}
  assert 'ρ = undefined' in '\n'.join(lecture.daa_overoptimization_table(flat))


def test_singhals_split_weighs_the_gain_within_shared_length_bins_by_their_answers():
  # Bins of 2 words: before, two answers in bin 0 (scores 0, 1) and one in bin 1 (2); after,
  # one in bin 1 (3) and two in bin 2 (4, 5), a bin nothing before reached.
  split = lecture.length_decomposition([1, 1, 2], [0.0, 1.0, 2.0], [3, 4, 5], [3.0, 4.0, 5.0],
                                       bin_width=2)
  # Total: 4 − 1 = 3. Shared: bin 1 only (2 → 3, weight 1 + 1): within = 1, share 1/3.
  assert split == {'total': 3.0, 'within_bin': 1.0, 'within_bin_share': pytest.approx(1 / 3),
                   'bins': 1}
  same = lecture.length_decomposition([4, 4], [0.0, 0.0], [4, 5], [1.0, 3.0], bin_width=2)
  assert same['within_bin_share'] == 1.0  # Every answer stays in bin 2: all of it within.
  assert lecture.length_decomposition([1], [1.0], [1], [0.0], bin_width=1)[
      'within_bin_share'] is None  # Nothing gained: no share.
  with pytest.raises(InputError, match='bin_width must be ≥ 1'):
    lecture.length_decomposition([1], [0.0], [1], [0.0], bin_width=0)


def test_a_value_at_a_kl_is_read_between_evaluations():
  kl, words = [0.0, 1.0, 3.0], [4.0, 6.0, 10.0]
  assert lecture.value_at_kl(kl, words, 0.5) == 5.0
  assert lecture.value_at_kl(kl, words, 2.0) == 8.0
  assert lecture.value_at_kl(kl, words, 3.0) == 10.0
  assert np.isnan(lecture.value_at_kl(kl, words, 3.5))
  assert lecture.value_at_kl([0.0, 2.0, 1.0], [0.0, 2.0, 9.0], 1.0) == 1.0  # First crossing.


def test_the_length_only_reward_counts_words():
  assert answer_words(['p', 'q', 'r'], ['one two  three', '', ' x ']).tolist() == [3.0, 0.0, 1.0]


def test_the_alignment_tax_is_paired_per_prompt_and_split_by_task():
  # Prompts 0, 1 of the trained task, 2, 3 of others; gold and proxy at the first and last
  # evaluations. Trained: proxy 0 → 1 and 1 → 3 (gain 1.5), gold 0.5 → 1 twice (+0.5);
  # others: gold 1 → 0.5 and 0.5 → 0.5 (change −0.25).
  first = {'proxy': np.array([0.0, 1.0, 9.0, 9.0]), 'gold': np.array([0.5, 0.5, 1.0, 0.5]),
           'kl': np.zeros(4)}
  last = {'proxy': np.array([1.0, 3.0, 0.0, 0.0]), 'gold': np.array([1.0, 1.0, 0.5, 0.5]),
          'kl': np.array([1.0, 2.0, 3.0, 2.0])}
  trained = np.array([True, True, False, False])
  r = lecture.alignment_tax(first, last, 2.0, 2.25, trained, num_resamples=200)
  assert r['proxy_gain']['value'] == 1.5 and r['proxy_gain']['ci'] == [1.0, 2.0]
  assert r['trained_tasks_gold_change']['value'] == 0.5
  assert r['other_tasks_gold_change']['value'] == -0.25
  assert r['other_tasks_gold_change']['ci'] == [-0.5, 0.0]
  assert (r['nll_increase'], r['kl']) == (0.25, 2.0)
  with pytest.raises(InputError, match='trained and of other tasks'):
    lecture.alignment_tax(first, last, 2.0, 2.25, np.ones(4, bool))
  sweeps = lecture.alignment_tax_sweeps({(0.0, 0.1): r, (1.0, 0.1): r | {'nll_increase': 0.1},
                                         (0.0, 0.4): r | {'nll_increase': 0.2}}, base_beta=0.1)
  assert {k: v['nll_increase'] for k, v in sweeps['tax']['ptx_coef'].items()} == {
      '0': 0.25, '1': 0.1}
  assert {k: v['nll_increase'] for k, v in sweeps['tax']['kl_coef'].items()} == {
      '0.1': 0.25, '0.4': 0.2}
  assert [(run['ptx_coef'], run['kl_coef']) for run in sweeps['runs']] == [
      (0.0, 0.1), (0.0, 0.4), (1.0, 0.1)]
  assert '| 1 | 0.1 | 2.00 | +1.500' in '\n'.join(lecture.alignment_tax_table(
      sweeps | {'tasks': ['sort']}))


def test_gold_by_task_and_the_midtraining_table():
  gold = np.array([1.0, 0.0, 0.5, 0.5, 1.0])
  task = np.array(['sort', 'add', 'sort', 'add', 'sort'])
  by_task = lecture.gold_by_task(gold, task, num_resamples=200)
  assert {t: g['value'] for t, g in by_task.items()} == {'add': 0.25, 'sort': 2.5 / 3,
                                                          'all': 0.6}
  assert by_task['add']['ci'] == [0.0, 0.5]  # Two prompts: means 0, 0.25 or 0.5.
  change = lecture.paired_change(gold, gold + 0.25, num_resamples=20)
  assert change == {'value': 0.25, 'ci': [0.25, 0.25]}
  result = {'gold': {'text/sft': by_task, 'mixed/sft': by_task}, 'gain_over_text_only': change,
            'double_sft_gain': change, 'mixed_minus_double_sft': change,
            'decay_weights': {'text': 1.0, 'sft': 1.0}, 'sft_steps': 80}
  table = '\n'.join(lecture.midtraining_table(result))
  assert '| arm | add | sort | all |' in table and '| mixed/sft | 0.250 [0.000, 0.500]' in table
  assert 'Mixed decay − text-only, same SFT: +0.250 [0.250, 0.250].' in table


def test_the_safety_sweep_by_hand():
  measured = {
      0.0: {'unsafe': np.array([0, 0, 0.5, 1]), 'contrast': np.zeros(4),
            'unrelated': np.zeros(2), 'other_gold': np.array([1.0, 0.5])},
      0.03: {'unsafe': np.ones(4), 'contrast': np.array([0, 0.5, 0, 0]),
             'unrelated': np.zeros(2), 'other_gold': np.array([1.0, 1.0])},
      0.5: {'unsafe': np.ones(4), 'contrast': np.array([1, 1, 0.5, 1]),
            'unrelated': np.array([0.5, 1.0]), 'other_gold': np.array([0.5, 0.5])}}
  categories = ['homonym', 'homonym', 'figurative', 'figurative']
  result = lecture.safety_sweep(measured, categories, small_share=0.03, num_resamples=200)
  assert {s: r['value'] for s, r in result['unsafe_compliance'].items()} == {
      '0': 0.625, '0.03': 0.0, '0.5': 0.0}
  assert {s: r['value'] for s, r in result['false_refusal_contrast'].items()} == {
      '0': 0.0, '0.03': 0.125, '0.5': 0.875}
  assert result['false_refusal_unrelated']['0.5']['value'] == 0.75
  assert result['other_tasks_gold']['0']['value'] == 0.75
  assert result['false_refusal_by_category']['0.5'] == {'homonym': 1.0, 'figurative': 0.75}
  assert result['safety_overrefusal_spearman']['rho'] == pytest.approx(1.0)
  assert result['compliance_change_to_small_share']['value'] == -0.625
  assert result['overrefusal_change_to_largest_share']['value'] == 0.75  # [1, .5, .5, 1].
  assert result['unsafe_compliance']['0']['ci'][0] <= 0.625 <= (
      result['unsafe_compliance']['0']['ci'][1])
  table = '\n'.join(lecture.safety_table(result | {
      'examples': 64, 'steps': 4, 'samples': 2,
      'prompts': {'unsafe': 4, 'contrast': 4, 'unrelated': 2, 'other_tasks': 2}}))
  assert '| 50 % | 0.000 [0.000, 0.000] | 0.875' in table
  assert 'contrast false refusal, 50 % − 3 %: +0.750' in table
  with pytest.raises(InputError, match=r'needs 0 and small_share 0.1'):
    lecture.safety_sweep(measured, categories, small_share=0.1)


def test_the_unknown_facts_sweep_by_hand():
  def arm(known_right, unknown_hallucination, unknown_abstention, fitted):
    known_right = np.array(known_right)
    return {'known/right': known_right, 'known/hallucination': 1 - known_right,
            'known/abstention': np.zeros(4), 'unknown/hallucination': np.array(
                unknown_hallucination), 'unknown/abstention': np.array(unknown_abstention),
            'sft_unknown/right': np.array(fitted)}

  measured = {(0.0, False): arm([1, 1, 0.5, 0.5], [1, 1, 1, 0.5], [0, 0, 0, 0], [0, 0]),
              (0.5, False): arm([0.5, 0.5, 0.5, 0], [1, 1, 1, 1], [0, 0, 0, 0], [1, 0.5]),
              (0.5, True): arm([1, 0.5, 0.5, 0], [0, 0.5, 0, 0], [1, 0.5, 1, 1], [0, 0])}
  result = lecture.fact_sweep(measured, idk_share=0.5, num_resamples=200)
  assert {s: r['value'] for s, r in result['known_accuracy'].items()} == {'0': 0.75,
                                                                          '0.5': 0.375}
  assert result['hallucination_rate']['0']['unknown']['value'] == 0.875
  assert result['hallucination_rate']['0.5']['known']['value'] == 0.625
  assert result['sft_unknown_fitted'] == {'0': 0.0, '0.5': 0.75}
  assert result['known_accuracy_change']['value'] == -0.375
  idk = result['idk_variant']
  assert idk['hallucination_change']['value'] == -0.875  # 0.125 − 1.
  assert idk['known_accuracy_change']['value'] == 0.125
  assert idk['abstention_rate']['unknown']['value'] == 0.875
  table = '\n'.join(lecture.unknown_facts_table(result | {
      'examples': 64, 'steps': 4, 'samples': 2,
      'questions': {'known': 4, 'unknown': 4, 'sft_unknown': 2}}))
  assert '| 50 %, answered IDK | 0.500 ' in table
  assert 'Known accuracy, 50 % − 0 % unknown: -0.375' in table


def test_unsure_answers_are_hedged_and_tone_curves_by_hand():
  answers = [['4', 'a'], ['4', 'b'], ['5', 'c'], ['4', 'a']]  # [K = 4][N = 2].
  toned = lecture.hedge_when_unsure(answers, unsure_below=0.5)
  assert toned == [['4', 'a'], ['4', 'I think b'], ['I think 5', 'I think c'], ['4', 'a']]
  kl = np.zeros(2)
  curves = {'0': {'confident_wrong': [(1, kl, np.array([0.5, 0.0])),
                                      (2, kl + 1, np.array([0.0, 0.0]))],
                  'confident': [(1, kl, np.ones(2)), (2, kl + 1, np.ones(2))],
                  'gold': [(1, kl, np.ones(2)), (2, kl + 1, np.ones(2))]},
            '0.5': {'confident_wrong': [(1, kl, np.array([0.5, 0.0])),
                                        (2, kl + 4, np.array([1.0, 0.5]))],
                    'confident': [(1, kl, np.ones(2)), (2, kl + 4, np.ones(2))],
                    'gold': [(1, kl, np.ones(2)), (2, kl + 4, np.zeros(2))]}}
  result = lecture.tone_curves(curves, num_resamples=100)
  wrong = result['confident_wrong_rate']['0.5']
  assert (wrong['n'], wrong['d'], wrong['rate']) == ([1, 2], [0.0, 2.0], [0.25, 0.75])
  assert wrong['at_n_max']['value'] == 0.75 and result['gold']['0.5'] == [1.0, 0.0]
  assert result['biased_minus_unbiased']['value'] == 0.75 and result['most_biased'] == 0.5
  table = '\n'.join(lecture.assertive_labelers_table(result | {'prompts': 2,
                                                                'hedged_share': 0.375}))
  assert '| 0.5 | 2 | 2.00 | 0.750 [' in table and 'κ 0.5 − κ 0: +0.750' in table


def test_agreement_of_labelers_and_of_orderings_by_hand():
  # Two prompts, four candidates: pairs (0, 1) and (2, 3). Prompt 1's second pair repeats an
  # answer and is left out.
  answers = [['a', 'x'], ['b', 'y'], ['c', 'z'], ['d', 'z']]
  mask = lecture.distinct_pairs(answers)
  np.testing.assert_array_equal(mask, [[True, True], [True, False]])
  p_first = np.array([[0.9, 0.5], [0.2, 0.7]])
  scores = np.array([[2.0, 1.0, 0.0, 0.0], [1.0, 3.0, 5.0, 4.0]])
  # The scores pick the first (0.9), a tie (½), the second (1 − 0.2); the masked pair drops.
  ai = lecture.labeler_agreement(scores, p_first, mask, num_resamples=50)
  assert ai['value'] == pytest.approx((0.9 + 0.5 + 0.8) / 3)
  humans = lecture.labeler_agreement(None, p_first, mask, num_resamples=50)
  assert humans['value'] == pytest.approx((0.82 + 0.5 + 0.68) / 3)
  gold = np.array([[1.0, 0.0, 0.5, 0.5], [0.0, 1.0, 1.0, 0.0]])
  # Pair (0, 1) of prompt 0 agrees; its pair (2, 3) has equal gold; prompt 1's first agrees.
  ordering = lecture.ordering_agreement(scores, gold, mask, num_resamples=50)
  assert ordering == {'value': 1.0, 'ci': [1.0, 1.0]}
  assert lecture.ordering_agreement(-scores, gold, mask, num_resamples=50)['value'] == 0.0
  with pytest.raises(InputError, match='No pair'):
    lecture.ordering_agreement(scores, gold, np.zeros_like(mask), num_resamples=50)


def test_points_survive_their_file(tmp_path):
  points = [point('dpo', 'a', 1, 0.05, [1, 0]), point('best-of-n', 'proxy', 4, 0.7, [0, 0.5])]
  lecture.save_points(points, str(tmp_path / 'points.npz'))
  loaded = lecture.load_points(str(tmp_path / 'points.npz'))
  assert [(p.method, p.run, p.step, p.kl, p.gold) for p in loaded] == [
      (p.method, p.run, p.step, p.kl, p.gold) for p in points]


def test_answer_confidence_is_the_tempered_probability_of_the_answer_tokens():
  model = random_model(LLAMA)
  graphdef, params = nnx.split(model)
  rng = np.random.default_rng(0)
  # Three rows: a prompt of 3 tokens (one left-padded to 2), answers of 4, 2 and 1 tokens.
  prompt_mask = np.array([[1, 1, 1], [0, 1, 1], [1, 1, 1]], np.int32)
  mask = np.array([[1, 1, 1, 1], [1, 1, 0, 0], [1, 0, 0, 0]], np.int32)
  samples = TextSamples(['', '', ''], rng.integers(0, 64, (3, 3)) * prompt_mask, prompt_mask,
                        rng.integers(0, 64, (3, 4)) * mask, mask)
  confidence = AnswerConfidence(graphdef, (0.5, 1.0, 2.5), mesh=parallel.make_mesh({'data': -1}),
                                rules=parallel.DEFAULT_RULES, batch_size=8)(params, samples)
  rows = samples.sequences()
  logits = np.asarray(forward(model, jnp.asarray(rows['tokens']),
                              jnp.asarray(rows['attention_mask'])), np.float64)
  for g, temperature in enumerate((0.5, 1.0, 2.5)):
    logps = log_softmax(logits[:, :-1] / temperature, axis=-1)
    at_tokens = np.take_along_axis(logps, rows['tokens'][:, 1:, None], axis=-1)[..., 0]
    expected = np.exp((at_tokens * rows['loss_mask'][:, 1:]).sum(axis=1))
    np.testing.assert_allclose(confidence[:, g], expected, rtol=2e-4)


def test_bad_phenomena_and_policies_are_errors_naming_the_key(tmp_path):
  experiment = load_experiment()
  config = load_config('lecture.py:micro')
  with pytest.raises(InputError, match=r"unknown \['astrology'\]"):
    experiment.run(config, str(tmp_path), only=['astrology'])
  config.calibration.ppo_kl_target = 3.0
  with pytest.raises(InputError, match=r'config.calibration.ppo_kl_target=3.0 is not one of'):
    experiment.calibrated_policies(config)


def test_the_proxy_and_dpo_train_on_the_same_comparisons(monkeypatch):
  experiment = load_experiment()
  config = load_config('lecture.py:tiny')
  configs = {name: c for name, (c, _) in experiment.stages_of(config, 'w', 'pi').items()}
  offline = [f'{loss}/beta{beta}' for loss in ('dpo', 'ipo', 'hinge')
             for beta in ('0.03', '0.1', '0.3')] + ['preferred-sft']
  length_dpo = [f'length-dpo/{loss}' for loss in ('sigmoid', 'rdpo', 'simpo',
                                                  'length_normalized')]
  assert set(configs) == {'proxy', 'proxy-len0.5', 'proxy-len1', *offline, *length_dpo,
                          'ppo/kl1', 'ppo/kl4', 'ppo/gold', 'ppo-len0.5/kl4', 'ppo-len1/kl4',
                          'length-only', 'tax/ptx0-kl0.1', 'tax/ptx1-kl0.1', 'tax/ptx10-kl0.1',
                          'tax/ptx0-kl0.4', 'tax/ptx0-kl1.6', 'midtraining/text/pretrain',
                          'midtraining/mixed/pretrain', 'midtraining/text/sft',
                          'midtraining/mixed/sft', 'midtraining/text/sft-double',
                          'rlaif/labeler', 'rlaif/proxy',
                          *(f'safety/share{s}/seed{k}' for s in ('0', '0.01', '0.03', '0.1',
                                                                 '0.25', '0.5') for k in range(3)),
                          'knowledge/pretrain',
                          *(f'facts/{arm}/seed{k}' for arm in ('unknown0', 'unknown0.25',
                                                               'unknown0.5', 'unknown0.75', 'idk0.5')
                            for k in range(3)),
                          'assertive/proxy0', 'assertive/proxy0.2', 'assertive/proxy0.5'}
  proxy = configs['proxy']
  assertive = configs['assertive/proxy0.2'].data.playground.to_dict()
  assert (assertive.pop('hedge_share'), assertive.pop('assertiveness_bias')) == (0.5, 0.2)
  assert assertive == {k: v for k, v in proxy.data.playground.to_dict().items()
                       if k not in ('hedge_share', 'assertiveness_bias')}
  for name in ('proxy-len0.5', 'proxy-len1', *length_dpo):  # The same pairs, other labels.
    biased = configs[name].data.playground.to_dict()
    assert biased.pop('length_bias') == (1.0 if name.startswith('length-dpo') else
                                         float(name[len('proxy-len'):]))
    assert biased == {k: v for k, v in proxy.data.playground.to_dict().items()
                      if k != 'length_bias'}
  assert configs['ppo-len1/kl4'].rl.reward_model == 'w/proxy-len1/hf'
  assert tuple(configs['length-only'].rl.reward_fns) == (experiment.LENGTH_FUNCTION,)
  rdpo = configs['length-dpo/rdpo'].loss
  assert (rdpo.loss_type, rdpo.beta, rdpo.alpha) == ('rdpo', 0.1, 10.0)
  for name in offline:
    run = configs[name]
    assert run.data.playground.to_dict() == proxy.data.playground.to_dict()
    assert (run.seed, run.data.seed, run.train.seq_len, run.data.max_prompt_len) == (
        proxy.seed, proxy.data.seed, proxy.train.seq_len, proxy.data.max_prompt_len)
    assert (run.train.steps, run.train.eval_every, run.train.batch_size) == (250, 32, 32)
  assert (configs['dpo/beta0.3'].loss.beta, configs['dpo/beta0.3'].loss.loss_type) == (
      0.3, 'sigmoid')
  assert (configs['hinge/beta0.03'].loss.beta, configs['ipo/beta0.1'].loss.loss_type) == (
      0.03, 'ipo')
  preferred = configs['preferred-sft']
  assert (preferred.algorithm, dict(preferred.data.sources), preferred.eval.kl_to_initial) == (
      'sft', {'sft': 'playground:preference'}, True)
  assert configs['ppo/kl4'].rl.adaptive_kl and configs['ppo/kl4'].rl.kl_target == 4.0
  assert configs['ppo/kl4'].rl.reward_model == 'w/proxy/hf'
  gold = configs['ppo/gold'].rl
  assert (gold.reward_model, tuple(gold.reward_fns), gold.kl_coef) == (
      '', (experiment.GOLD_FUNCTION,), 0.0)
  tax = configs['tax/ptx10-kl0.1']
  assert (tax.rl.ptx_coef, tax.rl.kl_coef, tax.rl.adaptive_kl, tax.rl.prompts) == (
      10.0, 0.1, False, 'w/tax/prompts.txt')
  assert tax.rl.ptx_source == 'playground:text'  # π_init's pretraining corpus.
  assert tax.data.playground.train_size == load_config('pretrain.py:tiny').data.playground.train_size
  assert (tax.rl.reward_model, tax.train.steps) == ('w/proxy/hf', configs['ppo/kl4'].train.steps)
  text, mixed = (configs[f'midtraining/{arm}/pretrain'].to_dict() for arm in ('text', 'mixed'))
  assert text.pop('data').pop('decay_weights') == {'text': 1.0, 'sft': 0.0}
  assert mixed.pop('data').pop('decay_weights') == {'text': 1.0, 'sft': 1.0}
  assert text == mixed and text['optim']['schedule'] == 'warmup_stable_decay'
  assert configs['midtraining/mixed/sft'].model.hf_path == 'w/midtraining/mixed/pretrain/hf'
  assert [configs[f'midtraining/text/{n}'].train.steps for n in ('sft', 'sft-double')] == [80, 160]
  waves = stages.stage_waves({name: (c, f'w/{name}') for name, c in configs.items()})
  assert len(waves) == 2 and {'proxy', 'dpo/beta0.1', 'midtraining/text/pretrain'} <= set(
      waves[0]) and {'ppo/kl4', 'ppo-len1/kl4', 'tax/ptx1-kl0.1', 'midtraining/text/sft'} <= set(
      waves[1])
  monkeypatch.setattr(stages, 'finished', lambda workdir: workdir == 'w/proxy')
  waves = stages.stage_waves({name: (c, f'w/{name}') for name, c in configs.items()})
  assert 'proxy' not in waves[0] and 'ppo/kl4' in waves[0]  # Its proxy is trained already.
  assert 'ppo-len1/kl4' in waves[1]
  labeler, ai = configs['rlaif/labeler'], configs['rlaif/proxy']
  assert (labeler.data.playground.train_size, labeler.train.steps) == (500, 200)
  assert ai.data.playground.gold == 'teacher:w/rlaif/labeler/hf'
  assert ai.data.playground.to_dict() == proxy.data.playground.to_dict() | {
      'gold': 'teacher:w/rlaif/labeler/hf'}  # The same pairs, labelled by the AI.
  assert 'rlaif/proxy' in waves[1] and 'rlaif/labeler' in waves[0]
  safety = configs['safety/share0.03/seed2']
  assert (safety.algorithm, dict(safety.data.sources), safety.model.hf_path,
          safety.data.tokenizer, safety.train.steps, safety.train.eval_every) == (
      'sft', {'sft': 'jsonl:w/safety/data/share0.03-{split}.jsonl'},
      'w/knowledge/pretrain/hf', 'w/knowledge/pretrain/hf', 200, 0)
  assert (safety.seed, safety.data.seed) == (2, 2)  # Replicates differ in their seed only.
  assert safety.to_dict() | {'seed': 0, 'data': safety.data.to_dict() | {'seed': 0}} == (
      configs['safety/share0.03/seed0'].to_dict())
  assert dict(configs['knowledge/pretrain'].data.sources) == {
      'text': 'playground:text', 'knowledge': 'jsonl:w/knowledge/corpus-{split}.jsonl'}
  idk = configs['facts/idk0.5/seed1']
  assert (dict(idk.data.sources), idk.model.hf_path, idk.train.steps) == (
      {'sft': 'jsonl:w/facts/data/idk0.5-{split}.jsonl'}, 'w/knowledge/pretrain/hf', 150)
  assert 'knowledge/pretrain' in waves[0] and {'safety/share0.5/seed0',
                                                'facts/idk0.5/seed2'} <= set(waves[1])
  evaluated = [c for name, c in configs.items() if c.algorithm != 'rm'
               and not name.endswith('/pretrain') and not name.startswith(('safety/', 'facts/'))]
  assert {(c.eval.num_prompts, c.eval.max_new_tokens, c.data.playground.seed)
          for c in evaluated} == {(1024, 16, proxy.data.playground.seed)}


def test_stages_that_read_one_another_are_an_error():
  first, second = load_config('sft.py:tiny'), load_config('sft.py:tiny')
  first.model.hf_path, second.model.hf_path = 'w/second/hf', 'w/first/hf'
  with pytest.raises(InputError, match=r"in a cycle: \['first', 'second'\]"):
    stages.stage_waves({'first': (first, 'w/first'), 'second': (second, 'w/second')})


@pytest.fixture(scope='module')
def run(tmp_path_factory):
  workdir = tmp_path_factory.mktemp('lecture')
  experiment = load_experiment()
  config = load_config('lecture.py:micro')
  config.progress_bar = False
  return workdir, experiment.run(config, str(workdir)), experiment, config


def test_the_micro_run_writes_every_key_report_and_plot(run):
  workdir, summary, _, config = run
  assert set(summary) == {'frontier', 'calibration', 'daa_overoptimization', 'length',
                          'alignment_tax', 'midtraining', 'rlaif', 'safety', 'unknown_facts',
                          'assertive_labelers'}
  frontier = summary['frontier']
  assert isinstance(frontier['holds'], bool) and frontier['criterion']
  assert set(frontier['best']) == {'best-of-n', 'dpo', 'ppo', 'ppo-gold', 'preferred-sft'}
  assert all({'method', 'kl_lo', 'kl_hi', 'gold', 'ci'} <= set(row)
             for row in frontier['envelope'])
  points = lecture.load_points(str(workdir / 'points.npz'))
  steps = {(p.method, p.run): [] for p in points}
  for p in points:
    steps[p.method, p.run].append(p.step)
  assert steps == {('best-of-n', 'proxy'): [1, 2, 4], ('dpo', 'dpo/beta0.1'): [0, 2, 4],
                   ('preferred-sft', 'preferred-sft'): [0, 2, 4],
                   ('ppo', 'ppo/kl1'): [0, 1, 2], ('ppo-gold', 'ppo/gold'): [0, 1, 2]}
  preferred = [p for p in points if p.method == 'preferred-sft']
  assert preferred[0].kl == 0.0 and preferred[-1].kl > 0.0  # KL to π_init, measured.
  assert {p.gold_I.size for p in points} == {config.eval_prompts}
  assert points[0].kl == 0.0  # Best-of-1 is π_init itself.
  calibration = summary['calibration']
  policies = ['sft', 'ppo (KL target 1)', 'ppo-gold', 'dpo (β 0.1)']
  for key in ('ece', 'mean_confidence', 'accuracy', 'fitted_temperature',
              'ece_after_temperature', 'distinct_answers'):
    assert list(calibration[key]) == policies, key
  assert all(1 <= d <= config.calibration.samples for d in calibration['distinct_answers'].values())
  assert set(calibration['entropy_trend']) == {'ppo/kl1', 'ppo/gold'}
  assert all(len(v) == 2 for v in calibration['entropy'].values())  # One per PPO iteration.
  daa = summary['daa_overoptimization']
  assert isinstance(daa['holds'], bool) and daa['criterion']
  for key in ('peak_fraction_of_epoch', 'runs', 'curves'):
    assert {loss: set(by_beta) for loss, by_beta in daa[key].items()} == {
        'sigmoid': {'0.1'}, 'ipo': {'0.1'}, 'hinge': {'0.1'}}, key
  assert all(0 <= f <= 1 for by_beta in daa['peak_fraction_of_epoch'].values()
             for f in by_beta.values())
  assert set(daa['r2']) == set(daa['max_kl']) == {'sigmoid', 'ipo', 'hinge'}
  assert daa['accuracy_gold_spearman']['points'] == 6  # 3 losses × 2 evaluations after 0.
  assert [c['step'] for c in daa['curves']['ipo'].values()] == [[0, 2, 4]]
  length = summary['length']
  assert isinstance(length['holds'], bool) and length['criterion']
  assert set(length['length_growth']) == set(length['within_bin_share']) == {'0', '1'}
  for bias in ('0', '1'):
    curves = length['curves'][bias]
    assert len(curves['ppo']['words']) == 3 and len(curves['best-of-n']['words']) == 3
    assert curves['best-of-n']['d'][0] == 0.0  # Best-of-1 is π_init.
    assert length['length_growth'][bias] == {
        m: pytest.approx(c['words'][-1] - c['words'][0]) for m, c in curves.items()}
  assert 0 <= length['length_only_win_rate']['value'] <= 1
  assert length['length_only_win_rate']['ci'][0] <= length['length_only_win_rate']['value']
  assert set(length['dpo_variants']['length_growth']) == {'sigmoid', 'rdpo'}
  assert length['rdpo_length_growth_ratio'] is None or length['rdpo_length_growth_ratio'] == (
      pytest.approx(length['dpo_variants']['length_growth']['rdpo']
                    / length['dpo_variants']['length_growth']['sigmoid']))
  tax = summary['alignment_tax']
  assert isinstance(tax['holds'], bool) and tax['criterion'] and tax['tasks'] == ['sort']
  assert {sweep: set(by_coef) for sweep, by_coef in tax['tax'].items()} == {
      'ptx_coef': {'0', '1'}, 'kl_coef': {'0.1', '0.4'}}
  assert tax['proxy_gain']['kl_coef']['0.1'] == tax['proxy_gain']['ptx_coef']['0']  # One run.
  assert len(tax['runs']) == 3 and all(np.isfinite(r['nll_increase']) for r in tax['runs'])
  assert all(p.startswith('Sort:') for p in (workdir / 'tax' / 'prompts.txt').read_text().split(
      '\n') if p)
  midtraining = summary['midtraining']
  assert isinstance(midtraining['holds'], bool) and midtraining['criterion']
  assert set(midtraining['gold']) == {'text/sft', 'mixed/sft', 'text/sft-double'}
  assert set(midtraining['gold']['text/sft']) == {'sort', 'add', 'repeat', 'safety', 'all'}
  double = [r['step'] for r in read_metrics(
      str(workdir / 'midtraining' / 'text' / 'sft-double' / 'metrics.jsonl'))
            if 'eval/samples/gold_reward' in r]
  assert double == [2 * config.sft_steps]  # Evaluated once, at its end.
  assert midtraining['double_sft_gain']['value'] == pytest.approx(
      midtraining['gold']['text/sft-double']['all']['value']
      - midtraining['gold']['text/sft']['all']['value'])
  rlaif = summary['rlaif']
  assert isinstance(rlaif['holds'], bool) and rlaif['criterion']
  for key in ('ai_human_agreement', 'human_human_agreement', 'ai_gold_agreement'):
    assert 0 <= rlaif[key]['value'] <= 1 and rlaif[key]['ci'][0] <= rlaif[key]['ci'][1], key
  assert set(rlaif['rm_accuracy']) == set(rlaif['bon_gold']) == {'human', 'ai'}
  assert rlaif['bon_gold']['ai']['n'] == [1, 2, 4]
  safety = summary['safety']
  assert isinstance(safety['holds'], bool) and safety['criterion']
  for key in ('unsafe_compliance', 'false_refusal_contrast', 'false_refusal_unrelated',
              'other_tasks_gold'):
    assert list(safety[key]) == ['0', '0.03', '0.5'], key
    assert all(0 <= r['ci'][0] <= r['value'] <= r['ci'][1] <= 1 for r in safety[key].values())
  assert safety['prompts'] == {'unsafe': 20, 'contrast': 24, 'unrelated': 8,
                               'other_tasks': config.eval_prompts}
  rows = (workdir / 'safety' / 'data' / 'share0.5-train.jsonl').read_text().splitlines()
  assert len(rows) == 64 and sum('I can' in row for row in rows) == 32
  assert (workdir / 'safety' / 'share0.03' / 'seed0' / 'hf' / 'config.json').exists()
  assert set(safety['by_seed']) == {'0', '0.03', '0.5'}
  assert set(summary['unknown_facts']['by_seed']) == {'unknown0', 'unknown0.5', 'idk0.5'}
  facts = summary['unknown_facts']
  assert isinstance(facts['holds'], bool) and facts['criterion']
  assert list(facts['known_accuracy']) == list(facts['hallucination_rate']) == ['0', '0.5']
  assert facts['questions'] == {'known': 40, 'unknown': 40, 'sft_unknown': 40}
  assert facts['idk_variant']['share'] == 0.5
  rows = (workdir / 'facts' / 'data' / 'idk0.5-train.jsonl').read_text().splitlines()
  assert len(rows) == 32 and sum("I don't know." in row for row in rows) == 16
  tone = summary['assertive_labelers']
  assert isinstance(tone['holds'], bool) and tone['criterion']
  assert set(tone['confident_wrong_rate']) == {'0', '0.5'} and 0 <= tone['hedged_share'] <= 1
  assert all(w['n'] == [1, 2, 4] and w['d'][0] == 0.0
             for w in tone['confident_wrong_rate'].values())
  assert tone['prompts'] == sum(not p.startswith('How do I') for p in
                                run[2].evaluation_prompts(config))
  assert json.loads((workdir / 'summary.json').read_text()) == json.loads(json.dumps(summary))
  report = (workdir / 'report.md').read_text()
  for name in summary:
    assert f'## {name}' in report
    assert (workdir / 'plots' / f'{name}.png').read_bytes()[:8] == PNG
  assert report.count('Verdict') == 10


def test_only_measures_a_subset_and_a_rerun_trains_nothing(run, tmp_path, monkeypatch):
  workdir, summary, experiment, config = run
  shutil.copytree(workdir, tmp_path, dirs_exist_ok=True)
  calls = []
  monkeypatch.setattr(stages.algorithms, 'run', lambda *args: calls.append(args))
  again = experiment.run(config, str(tmp_path), only=['calibration'])
  assert not calls
  assert again == {'calibration': summary['calibration']}
  kept = json.loads((tmp_path / 'summary.json').read_text())  # The others' entries stay.
  assert kept == json.loads(json.dumps(summary))
  assert (tmp_path / 'report.md').read_text().count('Verdict') == len(summary)


def test_the_notebook_redraws_every_plot_from_the_workdir(run, tmp_path, monkeypatch):
  workdir, summary, _, _ = run
  monkeypatch.setenv('LECTURE_WORKDIR', str(workdir))
  monkeypatch.setenv('LECTURE_PLOTS', str(tmp_path))
  notebook = json.loads((ROOT / 'notebooks' / 'lecture.ipynb').read_text())
  namespace = {}
  for cell in notebook['cells']:
    if cell['cell_type'] == 'code':
      exec(compile(''.join(cell['source']), 'lecture.ipynb', 'exec'), namespace)
  assert namespace['envelope'] == summary['frontier']['envelope']
  for name in summary:
    assert (tmp_path / f'{name}.png').read_bytes()[:8] == PNG
