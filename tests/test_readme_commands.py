"""The README's install and test commands are the ones CI runs."""
import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parent.parent


def test_ci_runs_the_readme_commands():
    """Invariant: .ci/run installs and tests exactly as the README tells a new user to."""
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    install = re.search(r"^pip install .*$", ci, re.M).group(0)
    test = re.search(r"^pytest.*$", ci, re.M).group(0)
    first_block = readme.split("```")[1]
    assert install in first_block, f"README's first block lacks CI's install command: {install}"
    assert test in readme.split("```")[3], f"README's second block lacks CI's test command: {test}"
