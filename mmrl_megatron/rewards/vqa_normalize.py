"""The answer normalisation of the VQA v2 evaluation (vqaEval.py of the VQA API), for exact-match accuracy.

Written here because the official script is not a package (lmms-eval carries a copy, inside a whole evaluation
framework). Its steps, in its order: whitespace, punctuation (removed where it touches a space or when the
answer holds a digit-comma-digit, else replaced by a space), periods not followed by a digit, lower case,
number words to digits, articles. One deviation: instead of its table of 170 contractions written without
the apostrophe ("dont" -> "don't"), apostrophes are removed, so both spellings meet at "dont" (a possessive
"dog's" then equals "dogs", which the official table does not make equal).
"""
import re

_PUNCTUATION = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?",
                "!")
# the official pattern, whose "(?!<=\d)" is a look-ahead (not a look-behind): a period not followed by a digit
_PERIOD = re.compile(r"(?!<=\d)(\.)(?!\d)")
_DIGIT_COMMA_DIGIT = re.compile(r"(\d)(,)(\d)")
_NUMBER_WORDS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5", "six": "6",
                 "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
_ARTICLES = {"a", "an", "the"}


def _strip_punctuation(text: str) -> str:
    out = text
    thousands = _DIGIT_COMMA_DIGIT.search(text) is not None
    for mark in _PUNCTUATION:
        out = out.replace(mark, "" if (mark + " " in text or " " + mark in text or thousands) else " ")
    return _PERIOD.sub("", out)


def normalize_vqa_answer(text: str) -> str:
    """The answer as VQA v2's evaluation compares it: "Two dogs." -> "2 dogs", "The 1,000 cats!" -> "1000 cats"."""
    text = _strip_punctuation(" ".join(text.split()).replace("'", ""))
    words = [_NUMBER_WORDS.get(word, word) for word in text.lower().split()]
    return " ".join(word for word in words if word not in _ARTICLES)
