"""Rewrite a boxed answer into the LaTeX math-verify reads, for the forms it does not handle itself.

Written here because math-verify (0.9) lacks them, seen on Geometry3K-shaped answers:
- its unit stripping ends the answer at the first unit, so "5 \\text{ cm or } 6 \\text{ cm}" became 5 and a
  hedge listing two values scored right; here text markup is unwrapped, unit words after a value dropped and
  "or" / "and" / ";" become commas, so a hedge reaches math-verify as the set {5, 6} and is judged wrong;
- units inside the markup with the number ("\\text{5 cm}") and plain unit words ("5 square units");
- repeating decimals (0.\\overline{3}, 0.(3), 0.\\dot{3}, 0.3 with a combining overline), which it reads as 0.3;
- unicode roots and a few other symbols (√2, ∛8, ², ·), which it does not parse.
Equations written value-first ("4 = x") are handled in math_answer, which can ask math-verify which side is a
constant.
"""
import re
from fractions import Fraction

_TEXT_MARKUP = re.compile(r"\\(?:text|textrm|textnormal|textup|textit|textbf|textsf|mathrm|mathit|mathbf|mathsf|"
                          r"mbox|hbox|operatorname)\s*\{([^{}]*)\}")
_DEGREE = re.compile(r"(?:\^\s*\{?\s*\\circ\s*\}?|°|\\degree)"
                     r"(?:\s*(?:\\(?:text|mathrm)\s*\{\s*[CF]\s*\}|[CF](?![A-Za-z])))?")  # and Celsius, Fahrenheit
_SPACING = re.compile(r"\\[;:>]|\\quad|\\qquad|\\ |~|\\hspace\*?\{[^{}]*\}")
_THIN_SPACE = re.compile(r"(?<=\d)\\,(?=\d)")  # 1\,000: a thousands separator, not a space
_CONNECTIVE = re.compile(r"(?<![A-Za-z\\])(?:or|and)(?![A-Za-z])|\\(?:lor|vee)(?![A-Za-z])|;")
# what is left around a connective once it is a comma: "5, , 6", "5 ,/, 6" (and/or), "5 (, 6)" (5 (or 6))
_REPEATED_COMMAS = re.compile(r"\s*,(?:\s*[,/]\s*)+")
_PARENTHESISED_ALTERNATIVE = re.compile(r"\(\s*,\s*([^()]*?)\s*\)")
_UNIT_WORDS = (r"(?:(?:square|sq\.?|cubic|cu\.?)\s*)?"
               r"(?:units?|(?:centi|milli|kilo)?met(?:er|re)s?|cm|mm|km|m|inch(?:es)?|in\.?|ft|feet|foot|yd|"
               r"yards?|mi|miles?|degrees?|deg|radians?|rad|percent)")
# a unit word directly after a value (a digit, a closing brace or parenthesis, or \pi), with an optional power
_UNIT_AFTER_VALUE = re.compile(rf"(?P<value>[\d}})]|\\pi)\s*{_UNIT_WORDS}(?:\s*\^\s*\{{?\s*[23]\s*\}}?)?(?![A-Za-z])")
_REPEATING_DECIMAL = re.compile(r"(?P<whole>\d*)\.(?P<fixed>\d*)(?:\\(?:overline|bar|dot)\s*(?:\{(?P<braced>\d+)\}|"
                                r"(?P<digit>\d))|\((?P<parenthesised>\d+)\)|(?P<combining>(?:\d\u0305)+))")
_ROOT_SIGN = re.compile(r"(?P<sign>[√∛∜])\s*(?:\((?P<parenthesised>[^()]*)\)|\{(?P<braced>[^{}]*)\}|"
                        r"(?P<plain>\d+(?:\.\d+)?|[A-Za-z]|\\[A-Za-z]+))")
_ROOT_COMMANDS = {"√": "\\sqrt", "∛": "\\sqrt[3]", "∜": "\\sqrt[4]"}
_UNICODE_SYMBOLS = {"²": "^{2}", "³": "^{3}", "·": "\\cdot ", "⋅": "\\cdot "}


def _unicode_math(answer: str) -> str:
    for symbol, latex in _UNICODE_SYMBOLS.items():
        answer = answer.replace(symbol, latex)

    def root(match):
        radicand = next(match.group(name) for name in ("parenthesised", "braced", "plain") if match.group(name))
        return f"{_ROOT_COMMANDS[match.group('sign')]}{{{radicand}}}"

    return _ROOT_SIGN.sub(root, answer)


def _unwrap_text_markup(answer: str) -> str:
    """Replace \\text{...} and its kin with their content (innermost first), spaced off its neighbours."""
    while True:
        unwrapped = _TEXT_MARKUP.sub(lambda match: f" {match.group(1)} ", answer)
        if unwrapped == answer:
            return answer
        answer = unwrapped


def _repeating_decimal_as_fraction(match) -> str:
    whole, fixed = match.group("whole") or "0", match.group("fixed")
    repeating = next(group for group in (match.group("braced"), match.group("digit"), match.group("parenthesised"),
                                         match.group("combining")) if group).replace("\u0305", "")
    value = (int(whole) + Fraction(int(fixed or 0), 10 ** len(fixed))
             + Fraction(int(repeating), 10 ** len(fixed) * (10 ** len(repeating) - 1)))
    return str(value.numerator) if value.denominator == 1 else f"\\frac{{{value.numerator}}}{{{value.denominator}}}"


def normalize_answer(answer: str) -> str:
    """The answer without surrounding $, text markup, spacing commands, degree marks, units after values and
    percent signs; connectives as commas, repeating decimals as fractions, unicode roots as \\sqrt."""
    answer = answer.strip().strip("$").strip()
    answer = _unicode_math(answer)
    answer = _THIN_SPACE.sub("", answer)
    answer = _SPACING.sub(" ", answer.replace("\\!", "")).replace("\\,", " ")
    answer = _DEGREE.sub("", answer)
    answer = _unwrap_text_markup(answer)
    answer = _PARENTHESISED_ALTERNATIVE.sub(r", \1", _REPEATED_COMMAS.sub(", ", _CONNECTIVE.sub(",", answer)))
    answer = _UNIT_AFTER_VALUE.sub(lambda match: match.group("value"), answer)
    answer = answer.replace("\\%", "").replace("%", "")
    answer = re.sub(r"\\(?:dfrac|tfrac)", r"\\frac", answer)
    answer = _REPEATING_DECIMAL.sub(_repeating_decimal_as_fraction, answer)
    return re.sub(r"\s+", " ", answer).strip().rstrip(".").strip()
