"""Extract the final \\boxed{...} answer from a response; braces may nest."""
import re
from typing import Optional

_BOX_COMMAND = re.compile(r"\\(?:boxed|fbox)")


def extract_boxed_answer(text: str) -> Optional[str]:
    """The content of the last \\boxed{...} (or \\fbox{...}, or `\\boxed 5`), or None when there is none or
    its braces never close."""
    matches = list(_BOX_COMMAND.finditer(text))
    if not matches:
        return None
    start = matches[-1].end()
    if start < len(text) and text[start] == " ":
        bare = re.match(r"\s+([^\s$]+)", text[start:])
        return bare.group(1) if bare else None
    if start >= len(text) or text[start] != "{":
        return None
    depth = 0
    for position in range(start, len(text)):
        if text[position] == "{":
            depth += 1
        elif text[position] == "}":
            depth -= 1
            if depth == 0:
                return text[start + 1:position].strip()
    return None
