"""Tests of rewards.py: tables of hand-computed values, exploit cases, and hypothesis properties."""
import math

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from rewards import (ADV_EPS, ALPHA, PROBLEM_TYPES, accuracy_reward, advantages, extract_answer, format_reward,
                     group_advantages, is_correct, length_bonus, rouge_mean, temporal_bonus,
                     temporal_credit, wer)


def tag(s):
    return f"<answer>{s}</answer>"


# ---------------------------------------------------------------- extraction and format
@pytest.mark.parametrize("text, expected", [
    (tag("A"), "A"),
    (tag("  A \n"), "A"),
    ("<think>x</think>" + tag("B"), "B"),
    (tag("A") + tag("B"), "A"),                      # first tag wins
    ("<answer>\nline 1\nline 2\n</answer>", "line 1\nline 2"),  # dot matches newline
    (tag(""), ""),
    (tag("   "), ""),
    ("no tags at all", ""),
    ("<answer>A", ""),                               # unclosed
    ("A</answer>", ""),
    ("<ANSWER>A</ANSWER>", ""),                      # tags are case sensitive
])
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected


@pytest.mark.parametrize("completion, expected", [
    ("<think>a</think><answer>b</answer>", 1.0),
    ("<think>a</think>\n\n<answer>b</answer>", 1.0),   # whitespace between the blocks
    ("<think>\nmulti\nline\n</think> <answer>\nB\n</answer>", 1.0),
    ("<think></think><answer></answer>", 1.0),         # empty blocks still match the official regex
    (" <think>a</think><answer>b</answer>", 0.0),      # leading text
    ("<think>a</think><answer>b</answer>\n", 0.0),     # trailing newline
    ("so: <think>a</think><answer>b</answer>", 0.0),
    ("<think>a</think><answer>b</answer> done", 0.0),
    ("<think>a</think>text<answer>b</answer>", 0.0),   # text between the blocks
    ("<answer>b</answer>", 0.0),                       # missing think
    ("<think>a</think>", 0.0),                         # missing answer
    ("<think>a<answer>b</answer>", 0.0),               # unclosed think
    ("<think>a</think><answer>b", 0.0),                # unclosed answer
    ("<answer>b</answer><think>a</think>", 0.0),       # wrong order
    ("<think>a</think><answer>b</answer><answer>c</answer>", 1.0),  # official regex: lazy .*? stretches
    ("<think><think>a</think></think><answer>b</answer>", 1.0),     # nested think: official regex accepts
])
def test_format_reward(completion, expected):
    assert format_reward(completion) == expected


# ---------------------------------------------------------------- accuracy tables
def typed(problem_type, rows):
    """(problem_type, answer, gt, expected) rows: several types' tables share one test."""
    return [(problem_type, *row) for row in rows]


MULTIPLE_CHOICE = [
    ("A", "A", 1.0),
    (" A\n", "A", 1.0),
    ("a", "A", 0.0),                 # case sensitive
    ("A.", "A", 0.0),
    ("(A)", "A", 0.0),
    ("A. a cat", "A", 0.0),
    ("A B C D", "A", 0.0),           # stuffing every option
    ("A\nB", "A", 0.0),
    ("", "A", 0.0),
    ("A" * 10000, "A", 0.0),         # very long answer
]
NUMERICAL = [
    ("3", "3", 1.0),
    (" 42 ", "42", 1.0),
    ("-2", "-2", 1.0),
    ("3.0", "3", 0.0),               # official: exactly one has "." or ","
    ("3", "3.0", 0.0),
    ("3.00", "3.0", 1.0),
    ("1,000", "1000", 0.0),
    ("1000", "1,000", 0.0),
    ("1,000", "1,000", 1.0),
    ("1000.0", "1,000", 1.0),        # both have a decimal mark, values equal
    ("3.14159", "3.14", 1.0),        # equal after rounding to 2 decimals
    ("3.141", "3.142", 1.0),
    ("3.146", "3.14", 0.0),
    ("1e3", "1000", 1.0),
    ("4", "3", 0.0),
    ("abc", "3", 0.0),
    ("", "3", 0.0),
    ("three", "three", 0.0),         # unparsable solution: nothing can score
]


@pytest.mark.parametrize("problem_type, answer, gt, expected",
                         typed("multiple choice", MULTIPLE_CHOICE) + typed("numerical", NUMERICAL))
def test_all_or_nothing_types(problem_type, answer, gt, expected):
    assert accuracy_reward(tag(answer), tag(gt), problem_type) == expected   # exactly 0 or 1, no tolerance


@pytest.mark.parametrize("answer, gt, expected", [
    ("10", "10", 1.0),
    ("8", "10", 0.8),
    ("12", "10", 0.8),
    ("19", "10", 0.1),
    ("20", "10", 0.0),
    ("25", "10", 0.0),               # relative error 1.5 is capped at 1
    ("-10", "10", 0.0),
    ("4.05", "4.5", 0.9),
    ("1,000", "1000", 1.0),          # no decimal-form rule for regression
    ("10.0", "10", 1.0),
    ("0", "0", 1.0),                 # gt == 0: exact match only
    ("0.0", "0", 1.0),
    ("0.001", "0", 0.0),
    ("abc", "10", 0.0),
    ("", "10", 0.0),
])
def test_regression(answer, gt, expected):
    assert accuracy_reward(tag(answer), tag(gt), "regression") == pytest.approx(expected)


@pytest.mark.parametrize("answer, gt, expected", [
    ("the quick brown fox", "the quick brown fox", 1.0),
    ("  the quick\nbrown   fox ", "the quick brown fox", 1.0),  # whitespace-split words
    ("the quick brown", "the quick brown fox", 0.75),          # 1 deletion / 4
    ("the quick red fox", "the quick brown fox", 0.75),        # 1 substitution / 4
    ("The quick brown fox", "the quick brown fox", 0.75),      # case sensitive
    ("quick brown fox jumps", "the quick brown fox", 0.5),     # 1 deletion + 1 insertion
    ("fox brown quick the", "the quick brown fox", 0.0),       # 4 edits
    ("a b c d e f g h", "the quick brown fox", 0.0),           # WER 2 clamped to 0
    ("", "the quick brown fox", 0.0),
    ("", "", 1.0),                                             # empty reference, empty answer
    ("word", "", 0.0),
])
def test_ocr(answer, gt, expected):
    assert accuracy_reward(tag(answer), tag(gt), "OCR") == pytest.approx(expected)


@pytest.mark.parametrize("ref, hyp, expected", [
    ("a b c d", "a b c d", 0.0),
    ("a b c d", "a b d", 0.25),
    ("a b", "b a", 1.0),
    ("a", "a b c", 2.0),
    ("", "", 0.0),                   # empty reference divides by 1 (official max(1, m))
    ("", "x y", 2.0),
])
def test_wer(ref, hyp, expected):
    assert wer(ref, hyp) == pytest.approx(expected)


@pytest.mark.parametrize("answer, gt, expected", [
    ("the cat sat on the mat", "the cat sat on the mat", 1.0),
    ("dog runs fast", "the cat sat", 0.0),
    ("the cat is running", "the cats are running", (0.75 + 1 / 3 + 0.75) / 3),  # stems: cat, run
    ("THE CAT SAT", "the cat sat", 1.0),             # rouge-score lowercases
    ("cat", "cat", 2 / 3),                           # one token has no bigram: ROUGE-2 is 0
    ("", "the cat sat", 0.0),
])
def test_free_form(answer, gt, expected):
    assert accuracy_reward(tag(answer), tag(gt), "free-form") == pytest.approx(expected)
    assert rouge_mean(gt, answer) == pytest.approx(expected)


def test_a_one_word_free_form_answer_caps_at_two_thirds():
    """The official reward (kept): the mean of ROUGE-1, -2 and -L. A one-word reference has no bigram, so ROUGE-2 is 0
    for every answer and even the exact answer earns 2/3 (as reward and as eval score); it still counts as correct
    under both rules' thresholds, so the temporal and length bonuses treat it as correct."""
    exact = accuracy_reward(tag("cat"), tag("cat"), "free-form")
    assert exact == pytest.approx(2 / 3)
    assert accuracy_reward(tag("Cats"), tag("cat"), "free-form") == pytest.approx(2 / 3)  # stemmed, lowercased
    assert accuracy_reward(tag("a cat"), tag("cat"), "free-form") < exact                 # a longer one scores less
    assert is_correct(exact, rule="paper") and is_correct(exact, rule="official")
    assert accuracy_reward(tag("black cat"), tag("black cat"), "free-form") == 1.0         # two words: full credit


def test_solution_without_tag_has_empty_answer():
    # Official: extract_answer(solution) is "" then; the training data always tags its solutions.
    assert accuracy_reward(tag("A"), "A", "multiple choice") == 0.0
    assert accuracy_reward("no answer", "A", "multiple choice") == 1.0
    assert accuracy_reward(tag("3"), "3", "numerical") == 0.0


def test_unknown_problem_type():
    with pytest.raises(ValueError, match="multiple-choice"):
        accuracy_reward(tag("A"), tag("A"), "multiple-choice")


# ---------------------------------------------------------------- exploits
NON_FINITE = ["nan", "NaN", "-nan", "inf", "-inf", "Infinity", "1e999", "-1e999", "9" * 400]


@pytest.mark.parametrize("bad", NON_FINITE)
@pytest.mark.parametrize("problem_type", ["numerical", "regression"])
def test_non_finite_numbers_earn_zero(bad, problem_type):
    assert accuracy_reward(tag(bad), tag("3"), problem_type) == 0.0
    assert accuracy_reward(tag(bad), tag(bad), problem_type) == 0.0   # even against itself


def test_regression_overflow_of_the_difference():
    assert accuracy_reward(tag("-1e308"), tag("1e308"), "regression") == 0.0
    assert accuracy_reward(tag("1e300"), tag("1e-300"), "regression") == 0.0


@pytest.mark.parametrize("problem_type", PROBLEM_TYPES)
def test_very_long_answer_does_not_beat_the_correct_one(problem_type):
    gt = {"multiple choice": "B", "numerical": "7", "regression": "7", "OCR": "stop here",
          "free-form": "the red car stops"}[problem_type]
    long = tag((gt + " ") * 2000)
    assert accuracy_reward(long, tag(gt), problem_type) < accuracy_reward(tag(gt), tag(gt), problem_type)


# ---------------------------------------------------------------- length bonus
@pytest.mark.parametrize("acc, lengths, rule, expected", [
    ([1, 0.5, 0.4, 1], [400, 400, 400, 600], "paper", [0.2, 0.2, 0, 0]),
    ([1, 1, 1, 1], [319, 320, 512, 513], "paper", [0, 0.2, 0.2, 0]),
    ([1, 0, 0, 0], [400] * 4, "paper", [0.2, 0, 0, 0]),          # paper: one correct suffices
    ([1, 0, 0, 0], [400] * 4, "official", [0, 0, 0, 0]),         # official: needs >= 2 correct
    ([1, 0.2, 0, 0], [400] * 4, "official", [0.2, 0.2, 0, 0]),   # official correct: > 0.1
    ([1, 0.1, 0, 0], [400] * 4, "official", [0, 0, 0, 0]),       # exactly 0.1 is not correct
    ([1, 1, 0, 0], [400, 600, 400, 400], "official", [0.2, 0, 0, 0]),
    ([], [], "paper", []),
])
def test_length_bonus(acc, lengths, rule, expected):
    assert length_bonus(acc, lengths, rule=rule) == pytest.approx(expected)


def test_length_bonus_arguments():
    assert length_bonus([1, 1], [100, 200], bonus=0.5, min_len=150, max_len=250) == [0.0, 0.5]
    assert length_bonus([0.3, 0.6], [400, 400], threshold=0.3) == [0.2, 0.2]
    with pytest.raises(ValueError):
        length_bonus([1], [400, 400])
    with pytest.raises(ValueError):
        length_bonus([], [], rule="other")


@pytest.mark.parametrize("acc, threshold, rule, expected", [
    (0.5, None, "paper", True), (0.49, None, "paper", False),
    (0.1, None, "official", False), (0.11, None, "official", True),
    (0.3, 0.3, "paper", True), (0.3, 0.3, "official", False),
])
def test_is_correct(acc, threshold, rule, expected):
    assert is_correct(acc, threshold, rule) is expected


# ---------------------------------------------------------------- temporal bonus
@pytest.mark.parametrize("ordered, shuffled, kwargs, bonus, p, p_tilde, granted", [
    # paper: shares of correct (accuracy >= 0.5), p >= 1.0 * p~
    ([1, 1, 0, 0], [1, 0], {}, [.3, .3, 0, 0], .5, .5, True),
    ([1, 0, 0, 0], [1, 0], {}, [0, 0, 0, 0], .25, .5, False),        # p~ > p
    ([0, 0, 0, 0], [0, 0], {}, [0, 0, 0, 0], 0, 0, True),            # granted, but no correct response to pay
    ([0.5, 0.49], [0], {}, [.3, 0], .5, 0, True),                    # 0.5 is correct, 0.49 not
    ([0.6, 0.6], [1, 1], {}, [.3, .3], 1, 1, True),                  # shares, not raw means
    ([1, 0, 0, 0], [1, 0], {"mu": 0.5}, [.3, 0, 0, 0], .25, .5, True),
    ([1, 1, 1, 0], [1, 0], {"mu": 2.0}, [0, 0, 0, 0], .75, .5, False),
    ([1, 1, 0, 0], [0, 0], {"alpha": 0.5}, [.5, .5, 0, 0], .5, 0, True),
    ([0.4, 0.3], [0], {"threshold": 0.3}, [.3, .3], 1, 0, True),
    # official: mean raw accuracy, p >= 0.8 * p~, bonus to accuracy > 0.1
    ([0.6, 0.6], [1, 1], {"rule": "official"}, [0, 0], .6, 1, False),
    ([0.8, 0.8], [1, 1], {"rule": "official"}, [.3, .3], .8, 1, True),   # boundary: 0.8 >= 0.8 * 1
    ([0.8, 0.8], [1, 1], {"rule": "official", "mu": 1.0}, [0, 0], .8, 1, False),
    ([1, 0.1, 0.2, 0], [0.5, 0], {"rule": "official"}, [.3, 0, .3, 0], .325, .25, True),
    ([1, 0.1, 0.2, 0], [1, 1], {"rule": "official"}, [0, 0, 0, 0], .325, 1, False),
    ([0, 0], [0, 0], {"rule": "official"}, [0, 0], 0, 0, True),
    ([1, 0.3], [0], {"rule": "official", "threshold": 0.5}, [.3, 0], .65, 0, True),
])
def test_temporal_bonus(ordered, shuffled, kwargs, bonus, p, p_tilde, granted):
    got_bonus, got_p, got_pt, got_granted = temporal_bonus(ordered, shuffled, **kwargs)
    assert got_bonus == pytest.approx(bonus)
    assert (got_p, got_pt) == pytest.approx((p, p_tilde))
    assert got_granted is granted


@pytest.mark.parametrize("ordered, shuffled, paper, strict", [
    ([1, 1, 0, 0], [1, 0], True, False),     # a tie, p = p~ = 0.5: as good shuffled
    ([0, 0, 0, 0], [0, 0], True, False),     # a tie at p = p~ = 0 (nothing to pay either way)
    ([1, 1, 1, 1], [1, 1], True, False),     # a tie at p = p~ = 1
    ([1, 1, 1, 0], [1, 0], True, True),      # p = 0.75 > p~ = 0.5
    ([1, 0, 0, 0], [1, 0], False, False),    # p < p~
])
def test_strict_contrast_pays_no_ties(ordered, shuffled, paper, strict):
    """The paper's p >= mu * p~ grants ties; strict=True grants only p > mu * p~."""
    bonus, p, p_tilde, granted = temporal_bonus(ordered, shuffled)
    assert granted is paper
    strict_bonus, _, _, strict_granted = temporal_bonus(ordered, shuffled, strict=True)
    assert strict_granted is strict
    if not strict:
        assert strict_bonus == [0.0] * len(ordered)
    # the paper's tie pays every correct response; the strict rule none of them
    if paper and p == p_tilde and p > 0:
        assert sum(bonus) == pytest.approx(0.3 * sum(ordered)) and sum(strict_bonus) == 0


def test_temporal_credit_by_hand():
    """clip(mean over a response's tokens of log pi(o | ordered) - log pi(o | shuffled), 0, 1)."""
    ordered = [[-0.1, -0.2, -0.3], [-1.0, -1.0, -9.0], [-0.5, -0.5, -0.5], [-3.0, -0.1, -0.1]]
    shuffled = [[-0.4, -0.5, -0.3], [-0.5, -1.0, -0.0], [-4.0, -2.0, -0.5], [-3.0, -0.1, -0.1]]
    mask = [[1, 1, 1], [1, 1, 0], [1, 1, 0], [0, 0, 0]]
    credit = temporal_credit(ordered, shuffled, mask)
    # row 0: (0.3 + 0.3 + 0) / 3; row 1: (-0.5 + 0) / 2 < 0 (the padded -9 is not counted);
    # row 2: (3.5 + 1.5) / 2 = 2.5, clipped to 1; row 3: no tokens
    assert credit.tolist() == pytest.approx([0.2, 0.0, 1.0, 0.0])
    with pytest.raises(ValueError, match="shapes"):
        temporal_credit([[0.0]], [[0.0, 0.0]], [[1]])


def test_temporal_bonus_errors():
    with pytest.raises(ValueError, match="contrast"):
        temporal_bonus([1, 0], [])
    with pytest.raises(ValueError):
        temporal_bonus([], [1])
    with pytest.raises(ValueError, match="other"):
        temporal_bonus([1], [1], rule="other")
    assert temporal_bonus(np.array([1.0, 0.0]), np.array([0.0]))[3] is True   # numpy inputs work


# ---------------------------------------------------------------- advantages
def test_group_advantages_values():
    a = 0.5 / (math.sqrt(0.5) + 1e-4)            # mean 0.5, unbiased std sqrt(0.5)
    np.testing.assert_allclose(group_advantages([1, 0]), [a, -a])
    std = math.sqrt(5 / 3)                        # [1, 2, 3, 4]: unbiased variance 5/3
    np.testing.assert_allclose(group_advantages([1, 2, 3, 4]), np.array([-1.5, -0.5, 0.5, 1.5]) / (std + 1e-4))
    np.testing.assert_allclose(group_advantages([1, 0], eps=0.0), [math.sqrt(0.5), -math.sqrt(0.5)])
    b = 5 / (math.sqrt(50) + 1e-4)                # [30, 20]: scaled internally, same formula
    np.testing.assert_allclose(group_advantages([30, 20]), [b, -b])


@pytest.mark.parametrize("rewards", [[0.1, 0.1, 0.1], [1.3] * 8, [2.0], [0.0]])
def test_group_advantages_degenerate_groups_give_zeros(rewards):
    out = group_advantages(rewards)
    assert out.dtype == np.float64 and out.shape == (len(rewards),)
    assert np.all(out == 0)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_group_advantages_rejects_non_finite(bad):
    with pytest.raises(ValueError):
        group_advantages([1.0, bad])


@pytest.mark.parametrize("rewards, expected", [
    ([1, 0], [0.5, -0.5]),
    ([2.3, 1, 1, 1], [0.975, -0.325, -0.325, -0.325]),
    ([1, 2, 3, 4], [-1.5, -0.5, 0.5, 1.5]),
    ([1e308, -1e308], [1e308, -1e308]),           # scaled mean: no overflow on the way
    ([0.7, 0.7, 0.7], [0, 0, 0]),
    ([5.0], [0]),
])
def test_group_advantages_unscaled(rewards, expected):
    np.testing.assert_allclose(group_advantages(rewards, scale=False), expected, rtol=1e-12, atol=1e-15)


def paper_adv(r, eps=ADV_EPS):
    r = np.asarray(r, dtype=np.float64)
    return (r - r.mean()) / (r.std(ddof=1) + eps)


A1 = 0.75 / (0.5 + 1e-4)                            # [2, 1, 1, 1]: mean 1.25, unbiased std 0.5
A1_BONUS = 0.75 / (0.5 + 1e-4 / 1.3)               # the same group with +0.3 on the first: std 0.65
# base, bonus, bonus_to, scale, expected advantages, expected mean |A - A without bonus|
ADVANTAGE_TABLE = [
    # binary accuracy, one format for all: paper's eq. 2-3 only moves the eps term
    ([2, 1, 1, 1], [.3, 0, 0, 0], "reward", True, [A1_BONUS, *[-A1_BONUS / 3] * 3], (A1_BONUS - A1) / 2),
    # Dr. GRPO: the bonus scales the group's advantages by 1 + alpha
    ([2, 1, 1, 1], [.3, 0, 0, 0], "reward", False, [.975, -.325, -.325, -.325], .1125),
    ([2, 1, 1, 1], [.3, 0, 0, 0], "advantage", True, [A1 + .3, *[-A1 / 3] * 3], .075),
    ([2, 1, 1, 1], [.3, 0, 0, 0], "advantage", False, [1.05, -.25, -.25, -.25], .075),
    # format varies: the bonus acts through the reward
    ([2, 1, 1, 0], [.3, .3, 0, 0], "reward", True, paper_adv([2.3, 1.3, 1, 0]), None),
    # OCR-like continuous accuracy (0.6 and 0.9 pass the 0.5 threshold): the +alpha step is not affine
    ([1.6, 1.9, 1.3, 1.0], [.3, .3, 0, 0], "reward", True, paper_adv([1.9, 2.2, 1.3, 1.0]), None),
    # all correct: paper's rule has nothing to compare; bonus on the advantage still pays every response
    ([2, 2, 2, 2], [.3] * 4, "reward", True, [0, 0, 0, 0], 0.0),
    ([2, 2, 2, 2], [.3] * 4, "advantage", True, [.3] * 4, .3),
    # no bonus: the plain advantages, change 0 exactly
    ([2, 1, 0, 1], [0] * 4, "reward", True, paper_adv([2, 1, 0, 1]), 0.0),
    ([2, 1, 0, 1], [0] * 4, "advantage", False, [1, 0, -1, 0], 0.0),
    ([], [], "reward", True, [], 0.0),
]


@pytest.mark.parametrize("base, bonus, bonus_to, scale, expected, change", ADVANTAGE_TABLE)
def test_advantages_table(base, bonus, bonus_to, scale, expected, change):
    adv, got_change = advantages(base, bonus, bonus_to, scale)
    np.testing.assert_allclose(adv, expected, rtol=1e-9, atol=1e-12)
    without = group_advantages(base, scale=scale)
    assert got_change == pytest.approx(np.mean(np.abs(adv - without)) if len(base) else 0.0, abs=1e-15)
    if change is not None:
        assert got_change == pytest.approx(change, rel=1e-9, abs=1e-15)


def test_advantages_errors():
    with pytest.raises(ValueError, match="bonus_to"):
        advantages([1, 0], [0, 0], bonus_to="rewards")
    with pytest.raises(ValueError):
        advantages([1, 0], [0.3])
    with pytest.raises(ValueError):
        advantages([1, 0], [float("nan"), 0], bonus_to="advantage")
    with pytest.raises(ValueError):
        advantages([1, float("inf")], [0, 0])


def invariance_bound(k, G, alpha, eps=ADV_EPS):
    """Largest |A_i(with bonus) - A_i(without)| on a 0/1 group of G with k correct and one format reward:
    R = f + (1 + alpha) a, so A = (a - mean a) / (s + eps / (1 + alpha)) against (a - mean a) / (s + eps)."""
    s = math.sqrt(k * (G - k) / (G * (G - 1)))
    return max(k, G - k) / G * eps * alpha / (1 + alpha) / ((s + eps / (1 + alpha)) * (s + eps))


def test_invariance_bound_values():
    # G = 8: 4 correct gives 4.0e-5 (the figure); 1 or 7 correct is the worst case, 1.6e-4;
    # any k is below G * eps * alpha / (1 + alpha) since s^2 >= 1 / G
    assert invariance_bound(4, 8, ALPHA) == pytest.approx(4.04e-5, rel=1e-2)
    assert invariance_bound(1, 8, ALPHA) == pytest.approx(1.615e-4, rel=1e-2)
    for G in range(2, 17):
        assert all(invariance_bound(k, G, ALPHA) <= G * ADV_EPS * ALPHA / (1 + ALPHA) for k in range(1, G))


@settings(max_examples=300, deadline=None)
@given(acc=st.lists(st.sampled_from([0.0, 1.0]), min_size=2, max_size=16), fmt=st.sampled_from([0.0, 1.0]),
       alpha=st.floats(0.05, 1.0), length=st.sampled_from([0.0, 0.2]))
def test_invariance_binary_uniform_format(acc, fmt, alpha, length):
    """Issue 13: eq. 2-3's bonus is void on 0/1 accuracies with one format reward (and one length bonus per
    correct answer, as then too R is affine in a); only Dr. GRPO's scale or the bonus on the advantage act."""
    bonus, _, _, granted = temporal_bonus(acc, [0.0], alpha=alpha)
    assert granted
    base = [fmt + (1 + length) * a for a in acc]
    adv, change = advantages(base, bonus)
    without = group_advantages(base)
    k, G = int(sum(acc)), len(acc)
    bound = invariance_bound(k, G, alpha / (1 + length)) if 0 < k < G else 0.0
    assert np.max(np.abs(adv - without)) <= bound * (1 + 1e-6) + 1e-12
    assert change <= G * ADV_EPS * alpha / (1 + alpha) + 1e-12
    np.testing.assert_allclose(advantages(base, bonus, scale=False)[0],
                               (1 + alpha / (1 + length)) * group_advantages(base, scale=False), atol=1e-12)
    adv_a, change_a = advantages(base, bonus, bonus_to="advantage")
    np.testing.assert_allclose(adv_a - without, bonus, atol=1e-12)
    assert change_a == pytest.approx(alpha * k / G)


@pytest.mark.parametrize("acc, fmt, length", [
    ([1, 1, 0, 0, 1, 0, 0, 0], [1, 0, 1, 1, 1, 1, 0, 1], [0] * 8),           # binary, format varies
    ([0.6, 0.9, 0.3, 0.0, 0.4, 1.0, 0.2, 0.5], [1] * 8, [0] * 8),            # OCR-like continuous accuracy
    ([1, 1, 0, 0, 1, 0, 0, 0], [1] * 8, [0.2, 0, 0, 0, 0.2, 0, 0, 0]),       # length bonus for some correct ones
])
def test_bonus_acts_when_the_group_is_not_affine(acc, fmt, length):
    bonus, _, _, granted = temporal_bonus(acc, [0.0])
    assert granted
    _, change = advantages(np.add(acc, fmt) + length, bonus)
    assert change > 50 * 8 * ADV_EPS * ALPHA / (1 + ALPHA)          # 50 times the eps effect's bound


# ---------------------------------------------------------------- properties
FRAGMENTS = ["<answer>", "</answer>", "<think>", "</think>", " ", "\n", "A", "B", "a", "3", "3.0", "0", ".", ",",
             "-", "e", "nan", "inf", "1e999", "cat", "the", "running"]
texts = st.one_of(st.text(max_size=30),
                  st.lists(st.one_of(st.sampled_from(FRAGMENTS), st.text(max_size=4)), max_size=20).map("".join))
SETTINGS = settings(max_examples=200, deadline=None)


@SETTINGS
@given(completion=texts, solution=texts, problem_type=st.sampled_from(PROBLEM_TYPES))
def test_rewards_are_finite_and_in_unit_interval(completion, solution, problem_type):
    for r in (accuracy_reward(completion, solution, problem_type), format_reward(completion)):
        assert math.isfinite(r) and 0.0 <= r <= 1.0


@SETTINGS
@given(completion=texts, solution=texts, problem_type=st.sampled_from(PROBLEM_TYPES))
def test_no_answer_beats_the_correct_one(completion, solution, problem_type):
    correct = tag(extract_answer(solution))
    assert accuracy_reward(correct, solution, problem_type) >= accuracy_reward(completion, solution, problem_type)


@SETTINGS
@given(answer=texts.filter(lambda s: "</answer>" not in s), completion=texts,
       problem_type=st.sampled_from(PROBLEM_TYPES))
def test_no_answer_beats_the_tagged_solution(answer, completion, problem_type):
    sol = tag(answer)
    assert accuracy_reward(sol, sol, problem_type) >= accuracy_reward(completion, sol, problem_type)


@SETTINGS
@given(st.lists(st.floats(allow_nan=False, allow_infinity=False), min_size=1, max_size=16))
def test_advantages_of_any_finite_group_are_finite(rewards):
    assert np.all(np.isfinite(group_advantages(rewards)))


@SETTINGS
@given(st.lists(st.floats(-1e3, 1e3), min_size=1, max_size=16), st.booleans())
def test_advantages_sum_to_zero(rewards, scale):
    assert abs(group_advantages(rewards, scale=scale).sum()) <= 1e-6 * (1 if scale else 1e3)


@SETTINGS
@given(ordered=st.lists(st.floats(0, 1), min_size=1, max_size=8), shuffled=st.lists(st.floats(0, 1), min_size=1,
       max_size=4), rule=st.sampled_from(["paper", "official"]))
def test_temporal_bonus_only_pays_correct_ordered_responses(ordered, shuffled, rule):
    bonus, p, p_tilde, granted = temporal_bonus(ordered, shuffled, rule=rule)
    assert 0 <= p <= 1 and 0 <= p_tilde <= 1
    for b, a in zip(bonus, ordered):
        assert b == (ALPHA if granted and is_correct(a, rule=rule) else 0.0)


@pytest.mark.parametrize("rewards_, bonus, bonus_to, expected", [
    ([2.0, 2.0, 2.0], [0, 0, 0], "reward", True),          # all right: zero advantages
    ([1.0, 1.0, 1.0], [0, 0, 0], "advantage", True),       # all wrong
    ([2.3, 2.3, 2.3], [0.3, 0.3, 0.3], "reward", True),    # all right, bonus paid to all: eq. 3 leaves zeros
    ([2.0, 2.0, 2.0], [0.3, 0.3, 0.3], "advantage", False),  # the bonus added after eq. 3: +0.3 each
    ([2.0, 1.0, 2.0], [0, 0, 0], "reward", False),         # mixed
    ([1.5, 1.25, 1.5], [0, 0, 0], "reward", False),        # OCR's partial credit differs
])
def test_carries_no_advantage(rewards_, bonus, bonus_to, expected):
    """filter_groups' test: a group is dropped exactly when its advantages are all zero."""
    from rewards import carries_no_advantage
    assert carries_no_advantage(rewards_, bonus, bonus_to) is expected
    adv, _ = advantages(np.array(rewards_) - np.array(bonus) * (bonus_to == "advantage"), bonus, bonus_to)
    assert (np.abs(adv).max() < 1e-9) == expected
