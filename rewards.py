"""Rewards of Video-R1's T-GRPO: accuracy per problem type, format, length bonus, temporal bonus,
advantages. Pure functions (numpy and rouge-score, no torch) so they can be tested exhaustively.
Accuracy and format follow the official code (tulerfeng/Video-R1, src/r1-v/src/open_r1/grpo.py);
the temporal and length rules come as rule="paper" or "official" (vllm_grpo_trainer_modified.py).
The rules and the departures: DETAILS.md, "Reward semantics"."""
import math
import re
import numpy as np
from rouge_score import rouge_scorer

ALPHA = 0.3                     # temporal reward (paper and official)
# length bonus: +LENGTH_BONUS to a correct response of MIN_LEN to MAX_LEN tokens
LENGTH_BONUS = 0.2
MIN_LEN = 320
MAX_LEN = 512
# official length bonus needs at least this many correct responses in the group
OFFICIAL_MIN_CORRECT = 2
ADV_EPS = 1e-4                  # official: (R - mean) / (std + 1e-4)
# rule -> (correctness threshold, strict ">" instead of ">=", mu in p >= mu * p~)
RULES = {"paper": (0.5, False, 1.0), "official": (0.1, True, 0.8)}
# where the temporal bonus enters: the rewards, or the advantages (advantages())
BONUS_TO = ("reward", "advantage")
PROBLEM_TYPES = ("multiple choice", "numerical", "OCR", "free-form", "regression")

_ANSWER_RE = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
_FORMAT_RE = re.compile(r"<think>.*?</think>\s*<answer>.*?</answer>", re.DOTALL)
_scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)

def extract_answer(text: str) -> str:
    """Text inside the first <answer>...</answer>, stripped; "" without a complete tag pair."""
    m = _ANSWER_RE.search(text)
    if m is None:
        return ""
    return m.group(1).strip()

def format_reward(completion: str) -> float:
    """1.0 iff the whole completion is <think>...</think> then (whitespace) <answer>...</answer>."""
    if _FORMAT_RE.fullmatch(completion):
        return 1.0
    return 0.0

def to_number(s: str):
    """float of s with "," removed, or None if unparsable or not finite (nan, inf, overflow like
    "1e999")."""
    try:
        x = float(s.replace(",", ""))
    except ValueError:
        return None
    if not math.isfinite(x):
        return None
    return x

def wer(reference: str, hypothesis: str) -> float:
    """Word error rate: word-level edit distance / max(1, reference words), whitespace split. An
    empty reference divides by 1 as officially, so the OCR reward (1 - WER, clamped) is 1 for an
    empty answer and 0 for any other."""
    ref = reference.split()
    hyp = hypothesis.split()
    # one row of the edit-distance table at a time; the first: distances from the empty reference
    prev = list(range(len(hyp) + 1))
    for i, r in enumerate(ref, 1):
        cur = [i]
        for j, h in enumerate(hyp, 1):
            if r == h:
                dist = prev[j - 1]  # the words match: no edit
            else:
                # one edit more than the best of: delete r, insert h, substitute h for r
                dist = 1 + min(prev[j], cur[j - 1], prev[j - 1])
            cur.append(dist)
        prev = cur
    return prev[-1] / max(1, len(ref))

def rouge_mean(reference: str, hypothesis: str) -> float:
    """Mean of the ROUGE-1, ROUGE-2 and ROUGE-L F-measures (rouge-score, Porter stemming). As
    officially, a one-word reference caps it at 2/3: it has no bigram, so ROUGE-2 is 0."""
    scores = _scorer.score(reference, hypothesis)
    return sum(score.fmeasure for score in scores.values()) / 3

def accuracy_reward(completion: str, solution: str, problem_type: str) -> float:
    """Accuracy in [0, 1] of the completion's answer against the solution's <answer>, by problem
    type."""
    if problem_type not in PROBLEM_TYPES:
        raise ValueError(
            f"unknown problem_type {problem_type!r}; expected one of {PROBLEM_TYPES}")
    out = extract_answer(completion)
    gt = extract_answer(solution)
    if problem_type == "multiple choice":
        return 1.0 if out == gt else 0.0
    if problem_type == "OCR":
        # WER >= 0, so only the floor can bind
        return max(0.0, 1.0 - wer(gt, out))
    if problem_type == "free-form":
        return min(1.0, max(0.0, rouge_mean(gt, out)))

    # numerical or regression: both answers must parse as numbers
    o = to_number(out)
    g = to_number(gt)
    if o is None or g is None:
        return 0.0
    if problem_type == "numerical":
        # Official rule: "3" and "3.0" (or "1000" and "1,000") differ in form: the answer is wrong.
        out_has_mark = "." in out or "," in out
        gt_has_mark = "." in gt or "," in gt
        if out_has_mark != gt_has_mark:
            return 0.0
        if round(o, 2) == round(g, 2):
            return 1.0
        return 0.0

    # regression: 1 - relative error, floored at 0
    if g == 0:
        # relative error undefined: only the exact answer counts
        if o == 0:
            return 1.0
        return 0.0
    # abs(o - g) may overflow to inf: min() then gives 0 reward
    return 1.0 - min(1.0, abs(o - g) / abs(g))

def _rule(rule: str):
    if rule not in RULES:
        raise ValueError(f"unknown rule {rule!r}; expected one of {tuple(RULES)}")
    return RULES[rule]

def is_correct(accuracy: float, threshold=None, rule: str = "paper") -> bool:
    """Whether a response counts as correct: paper accuracy >= 0.5, official accuracy > 0.1."""
    default, strict, _ = _rule(rule)
    if threshold is None:
        threshold = default
    if strict:
        return accuracy > threshold
    return accuracy >= threshold

def length_bonus(accuracies, lengths, rule="paper", bonus=LENGTH_BONUS, min_len=MIN_LEN,
                 max_len=MAX_LEN, threshold=None) -> list:
    """+bonus to each correct response (is_correct) with min_len <= token length <= max_len;
    rule="official" pays it only when at least OFFICIAL_MIN_CORRECT responses of the group are
    correct."""
    _rule(rule)  # validate even for an empty group
    if len(accuracies) != len(lengths):
        raise ValueError(f"{len(accuracies)} accuracies but {len(lengths)} lengths")
    correct = [is_correct(a, threshold, rule) for a in accuracies]
    if rule == "official" and sum(correct) < OFFICIAL_MIN_CORRECT:
        return [0.0] * len(accuracies)
    return [bonus if c and min_len <= n <= max_len else 0.0 for c, n in zip(correct, lengths)]

def temporal_bonus(ordered_acc, contrast_acc, rule="paper", alpha=ALPHA, mu=None, threshold=None,
                   strict=False):
    """T-GRPO temporal reward: (bonus per ordered response, p, p_tilde, granted), by `rule`
    (DETAILS.md, "Reward semantics"). Contrast responses only measure p~; images have none, so
    calling this without them is an error. strict=True grants only when p > mu * p~: the paper's
    p >= mu * p~ also pays ties, groups whose answers are as good shuffled (p = p~ = 0 included)."""
    # len(): also works for numpy arrays
    if len(ordered_acc) == 0 or len(contrast_acc) == 0:
        raise ValueError("temporal_bonus needs non-empty ordered and contrast groups "
                         "(images have no temporal reward)")
    if mu is None:
        mu = _rule(rule)[2]  # an unknown rule raises here, or in is_correct below
    correct = [is_correct(a, threshold, rule) for a in ordered_acc]

    # p and p~: the share of correct ordered and contrast responses (paper), or their mean
    # accuracy (official)
    if rule == "paper":
        p = sum(correct) / len(ordered_acc)
        contrast_correct = sum(is_correct(a, threshold, rule) for a in contrast_acc)
        p_tilde = contrast_correct / len(contrast_acc)
    else:
        p = float(np.mean(ordered_acc))
        p_tilde = float(np.mean(contrast_acc))

    # the bonus: alpha to each correct ordered response, when ordered frames beat shuffled ones
    if strict:
        granted = bool(p > mu * p_tilde)
    else:
        granted = bool(p >= mu * p_tilde)
    bonus = [alpha if granted and c else 0.0 for c in correct]
    return bonus, p, p_tilde, granted

def temporal_credit(logp_ordered, logp_shuffled, mask) -> np.ndarray:
    """Response-level temporal credit, per response: clip(mean_t[log pi(o_t | ordered frames)
    - log pi(o_t | shuffled frames)], 0, 1) over the response's own tokens (mask 1). A response
    the shuffled frames make less likely used the order; one as likely shuffled gets 0. Arrays
    (N, T); a response without tokens gets 0."""
    lo = np.asarray(logp_ordered, dtype=np.float64)
    ls = np.asarray(logp_shuffled, dtype=np.float64)
    m = np.asarray(mask, dtype=np.float64)
    if not lo.shape == ls.shape == m.shape:
        raise ValueError(f"shapes {lo.shape}, {ls.shape} and mask {m.shape} differ")
    tokens = m.sum(-1)
    gain = ((lo - ls) * m).sum(-1) / np.maximum(tokens, 1)
    return np.clip(gain, 0.0, 1.0)

def group_advantages(rewards, eps=ADV_EPS, scale=True) -> np.ndarray:
    """(R - mean) / (std + eps) within a group, unbiased std as officially; zeros for one response
    (torch: NaN) or equal rewards. scale=False: R - mean (Dr. GRPO), which keeps the rewards'
    scale, so a bonus grows A too."""
    r = np.asarray(rewards, dtype=np.float64)
    if not np.all(np.isfinite(r)):
        raise ValueError(f"non-finite reward in {rewards!r}")
    if r.size < 2 or np.all(r == r[0]):
        return np.zeros_like(r)
    # on r / max|r| (when > 1) huge finite rewards cannot overflow mean or std; eps scales alike:
    # A is unchanged
    c = max(1.0, float(np.max(np.abs(r))))
    x = r / c
    if not scale:
        return r - c * x.mean()
    return (x - x.mean()) / (x.std(ddof=1) + eps / c)

def advantages(base_rewards, bonus, bonus_to="reward", scale=True, eps=ADV_EPS):
    """A of one group of ordered responses, and the mean |A - A without the bonus|. base_rewards:
    accuracy + format (+ length); bonus: temporal_bonus's. bonus_to="reward" (eq. 2-3):
    A = norm(base + bonus); "advantage" (the paper's alternative): norm(base) + bonus. Why "reward"
    moves A by ~0: DETAILS.md, "A worked example: rewards to advantages"."""
    if bonus_to not in BONUS_TO:
        raise ValueError(f"unknown bonus_to {bonus_to!r}; expected one of {BONUS_TO}")
    base = np.asarray(base_rewards, dtype=np.float64)
    b = np.asarray(bonus, dtype=np.float64)
    if base.shape != b.shape:
        raise ValueError(f"{base.shape} base rewards but {b.shape} bonuses")
    if not np.all(np.isfinite(b)):
        raise ValueError(f"non-finite bonus in {bonus!r}")

    # the advantages without the bonus, then with it where bonus_to says
    without = group_advantages(base, eps, scale)
    if bonus_to == "reward":
        adv = group_advantages(base + b, eps, scale)
    else:
        adv = without + b

    # how far the bonus moved A (an empty group: not at all)
    if adv.size == 0:
        return adv, 0.0
    change = float(np.mean(np.abs(adv - without)))
    return adv, change


def carries_no_advantage(rewards, bonus, bonus_to="reward"):
    """True for a group whose advantages are all zero: every response earned the same reward R_i
    (eq. 2), and no bonus is added to the advantages (bonus_to="advantage" adds r_t after eq. 3).
    Such a group teaches nothing, yet it fills rows of the update; DAPO's dynamic sampling (and
    EasyR1, OneThinker) drop it (tgrpo.py's filter_groups)."""
    if bonus_to == "advantage" and np.any(bonus):
        return False
    return bool(np.ptp(np.asarray(rewards, dtype=np.float64)) == 0)
