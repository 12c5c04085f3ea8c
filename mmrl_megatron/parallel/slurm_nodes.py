"""Expand Slurm's compressed node lists without `scontrol` (absent on login-less or test machines)."""
import re
from typing import List


def _split_top_level(nodelist: str) -> List[str]:
    parts, depth, start = [], 0, 0
    for index, char in enumerate(nodelist):
        depth += char == "["
        depth -= char == "]"
        if char == "," and depth == 0:
            parts.append(nodelist[start:index])
            start = index + 1
    parts.append(nodelist[start:])
    return [p for p in parts if p]


def expand_nodelist(nodelist: str) -> List[str]:
    """'gpu-[07-08],cpu1' -> ['gpu-07', 'gpu-08', 'cpu1'] (zero padding kept)."""
    hosts = []
    for part in _split_top_level(nodelist):
        match = re.fullmatch(r"([^\[]*)\[([^\]]+)\](.*)", part)
        if not match:
            hosts.append(part)
            continue
        prefix, ranges, suffix = match.groups()
        for item in ranges.split(","):
            low, _, high = item.partition("-")
            high = high or low
            for number in range(int(low), int(high) + 1):
                hosts.extend(prefix + str(number).zfill(len(low)) + tail for tail in expand_nodelist(suffix) or [""])
    return hosts
