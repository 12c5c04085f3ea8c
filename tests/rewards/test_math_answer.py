"""The geometry answer checker: last \\boxed{} answer vs ground truth, equal up to mathematical form."""
import pytest

from mmrl_megatron.rewards import extract_boxed_answer, format_score
from mmrl_megatron.rewards.math_answer import compute_score

# (response, ground truth, expected correct)
CASES = [
    # equivalent forms of one half
    (r"\boxed{\frac{1}{2}}", "0.5", True),
    (r"\boxed{0.5}", r"\frac{1}{2}", True),
    (r"\boxed{1/2}", r"\frac{1}{2}", True),
    (r"\boxed{\dfrac{1}{2}}", "1/2", True),
    (r"\boxed{\frac12}", "0.5", True),
    (r"\boxed{\frac{1}{3}}", "0.5", False),
    (r"\boxed{0.33}", r"\frac{1}{3}", False),
    (r"\boxed{.5}", "1/2", True),
    # integers, decimals, signs
    (r"The answer is \boxed{12}.", "12", True),
    (r"\boxed{12.0}", "12", True),
    (r"\boxed{-3}", "-3", True),
    (r"\boxed{3}", "-3", False),
    (r"\boxed{1,000}", "1000", True),
    (r"\boxed{13}", "12", False),
    (r"\boxed{12.5}", "12", False),
    # radicals and pi
    (r"\boxed{2\sqrt{3}}", r"2 \sqrt { 3 }", True),
    (r"\boxed{\sqrt{12}}", r"2\sqrt{3}", True),
    (r"\boxed{4\sqrt{3}}", r"2\sqrt{3}", False),
    (r"\boxed{\frac{\sqrt{3}}{2}}", r"\frac{\sqrt{3}}{2}", True),
    (r"\boxed{8\pi}", r"8 \pi", True),
    (r"\boxed{8}", r"8\pi", False),
    (r"\boxed{2}", r"\sqrt{2}", False),
    (r"\boxed{\frac{40}{3}}", "13.33", False),
    (r"\boxed{\frac{40}{3}}", r"\frac{40}{3}", True),
    (r"\boxed{\frac{80}{6}}", r"\frac{40}{3}", True),
    # units and degrees
    (r"\boxed{30^\circ}", "30", True),
    (r"\boxed{30^{\circ}}", "30", True),
    (r"\boxed{30°}", "30", True),
    (r"\boxed{30 degrees}", "30", True),
    (r"\boxed{60^\circ}", "30", False),
    (r"\boxed{5 \text{ cm}}", "5", True),
    (r"\boxed{5 cm}", "5", True),
    (r"\boxed{12 \text{cm}^2}", "12", True),
    (r"\boxed{6\sqrt{3} \text{ square units}}", r"6\sqrt{3}", True),
    (r"\boxed{2.5 units}", r"\frac{5}{2}", True),
    (r"\boxed{50\%}", "50", True),
    # variables and equations
    (r"\boxed{x = 3}", "3", True),
    (r"\boxed{x=4}", "3", False),
    # nested braces and the last box
    (r"\boxed{\frac{\sqrt{2}}{2}}", r"\frac{\sqrt{2}}{2}", True),
    (r"\boxed{{7}}", "7", True),
    (r"First \boxed{4}, corrected: \boxed{5}", "5", True),
    (r"First \boxed{5}, corrected: \boxed{4}", "5", False),
    (r"\boxed{\frac{1}{\frac{1}{2}}}", "2", True),
    # missing or broken boxes
    ("The answer is 5.", "5", False),
    (r"\boxed{}", "5", False),
    (r"\boxed{5", "5", False),
    ("", "5", False),
    (r"\boxed 5", "5", True),
    (r"\fbox{5}", "5", True),
    # units inside text markup, spacing commands and degree marks (issue 16)
    (r"\boxed{\text{5 cm}}", "5", True),
    (r"\boxed{\mathrm{5\,cm}}", "5", True),
    (r"\boxed{5\ \mathrm{cm}^{2}}", "5", True),
    (r"\boxed{5 \mbox{ cm}}", "5", True),
    (r"\boxed{5\,\textnormal{mm}}", "5", True),
    (r"\boxed{\frac{5}{2} \mathrm{~m}^2}", "2.5", True),
    (r"\boxed{5\pi \text{ cm}^2}", r"5\pi", True),
    (r"\boxed{5 \text{ sq. units}}", "5", True),
    (r"\boxed{30^{\circ}\text{C}}", "30", True),
    (r"\boxed{2\sqrt{3}\,\text{in.}}", r"2\sqrt{3}", True),
    (r"\boxed{12}", r"12 \text{ cm}^2", True),
    (r"\boxed{\text{6 cm}}", "5", False),
    (r"\boxed{5 \mbox{ cm}}", r"5 \sqrt{2}", False),
    # hedges between values, with or without units: never right (a policy must not learn to list candidates)
    (r"\boxed{5 \text{ cm or } 6 \text{ cm}}", "5", False),
    (r"\boxed{5 \text{ cm or } 6 \text{ cm}}", "6", False),
    (r"\boxed{5 \text{ cm}, 6 \text{ cm}}", "5", False),
    (r"\boxed{5\text{ cm}\text{ or }6\text{ cm}}", "6", False),
    (r"\boxed{5 \text{ cm} \; \text{or} \; 6 \text{ cm}}", "5", False),
    (r"\boxed{5\text{ cm}; 6\text{ cm}}", "6", False),
    (r"\boxed{30^\circ \text{ or } 150^\circ}", "150", False),
    (r"\boxed{5 \text{ m}^2 \text{ and } 12 \text{ m}^2}", "12", False),
    (r"\boxed{x = 5 \text{ or } x = 6}", "5", False),
    (r"\boxed{5 or 6}", "6", False),
    (r"\boxed{5\text{ cm (or 6 cm)}}", "6", False),
    (r"\boxed{5 \text{ cm, or } 6 \text{ cm}}", "6", False),
    (r"\boxed{5 \text{ cm} \text{ and/or } 6 \text{ cm}}", "6", False),
    (r"\boxed{5 \text{ cm} \lor 6 \text{ cm}}", "6", False),
    (r"\boxed{5 \text{ cm and } 6 \text{ cm}}", "5, 6", True),  # both values asked for
    # equations, value first or chained
    (r"\boxed{4 = x}", "4", True),
    (r"\boxed{12 = AB}", "12", True),
    (r"\boxed{30^\circ = m\angle ABC}", "30", True),
    (r"\boxed{x = 3 = y}", "3", True),
    (r"\boxed{2\sqrt{3} = \overline{AB}}", r"\sqrt{12}", True),
    (r"\boxed{4 = x}", "x = 4", True),
    (r"\boxed{5 = x}", "4", False),
    (r"\boxed{3 = y - 2x}", "3", False),
    # repeating decimals
    (r"\boxed{0.\overline{3}}", r"\frac{1}{3}", True),
    (r"\boxed{0.(3)}", r"\frac{1}{3}", True),
    (r"\boxed{0.\dot{3}}", r"\frac{1}{3}", True),
    ("\\boxed{0.3\u0305}", r"\frac{1}{3}", True),  # combining overline
    (r"\boxed{0.1\overline{6}}", r"\frac{1}{6}", True),
    (r"\boxed{13.\overline{3}}", r"\frac{40}{3}", True),
    (r"\boxed{2.(45)}", r"\frac{27}{11}", True),
    (r"\boxed{-0.\overline{6}}", r"-\frac{2}{3}", True),
    (r"\boxed{\frac{1}{7}}", r"0.\overline{142857}", True),
    (r"\boxed{0.\overline{3}}", "0.3", False),
    (r"\boxed{0.(3)}", r"\frac{1}{4}", False),
    (r"\boxed{0.3}", r"0.\overline{3}", False),
    # unicode roots and symbols
    (r"\boxed{√2}", r"\sqrt{2}", True),
    (r"\boxed{2√3}", r"2\sqrt{3}", True),
    (r"\boxed{√12}", r"2\sqrt{3}", True),
    (r"\boxed{√(12)}", r"2\sqrt{3}", True),
    (r"\boxed{√3/2}", r"\frac{\sqrt{3}}{2}", True),
    (r"\boxed{∛8}", "2", True),
    (r"\boxed{2√3 cm²}", r"2\sqrt{3}", True),
    (r"\boxed{3√2}", r"2\sqrt{3}", False),
    (r"\boxed{√3}", "3", False),
    # ground truth written with its own box, multiple choice letters
    (r"\boxed{9}", r"\boxed{9}", True),
    (r"\boxed{B}", "B", True),
    (r"\boxed{C}", "B", False),
]


@pytest.mark.parametrize("response, ground_truth, expected", CASES)
def test_geometry_checker_table(response, ground_truth, expected):
    """Invariant: each hand-made case is judged as a person would (equivalent forms accepted, wrong or unboxed
    answers rejected), and score and accuracy agree."""
    result = compute_score("hiyouga/geometry3k", response, ground_truth, {})
    assert result == {"score": float(expected), "acc": float(expected)}


def test_table_is_large_enough():
    """Invariant: the acceptance table keeps at least 40 cases, both outcomes well represented."""
    assert len(CASES) >= 40 and sum(expected for *_, expected in CASES) >= 15
    assert sum(not expected for *_, expected in CASES) >= 15


def test_boxed_extraction_handles_nesting():
    """Invariant: the extractor returns the whole content of the last box however deeply braces nest."""
    assert extract_boxed_answer(r"so \boxed{\frac{a^{2}}{\sqrt{b_{1}}}} done") == r"\frac{a^{2}}{\sqrt{b_{1}}}"
    assert extract_boxed_answer(r"\boxed{1} then \boxed{\{2, 3\}}") == r"\{2, 3\}"
    assert extract_boxed_answer("no box") is None and extract_boxed_answer(r"\boxed{{unclosed}") is None


@pytest.mark.parametrize("response, expected", [
    ("<think>count the squares</think> There are \\boxed{3}.", 1.0),
    ("  <think>\nline\n</think>\n\\boxed{\\frac{1}{2}}", 1.0),
    ("<think>count</think> There are 3.", 0.0),
    ("\\boxed{3}", 0.0),
    ("<think></think>\\boxed{3}", 0.0),
    ("<think>a</think><think>b</think>\\boxed{3}", 0.0),
    ("\\boxed{3}<think>late</think>", 0.0),
])
def test_format_reward(response, expected):
    """Invariant: only a non-empty <think> block followed by a boxed answer earns the format reward."""
    assert format_score(response) == expected
