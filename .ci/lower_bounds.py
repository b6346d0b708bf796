"""Print pip constraints that pin every dependency of pyproject.toml to its lower bound (`>=X` -> `==X`).

CI installs with these constraints and runs the fast tests, so the ranges we publish are ranges we ran.
"""

import re
import sys
import tomllib
from pathlib import Path

project = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())["project"]
for requirement in project["dependencies"]:
    match = re.match(r"^([A-Za-z0-9_.\-]+)\s*(?:\[[^\]]*\])?\s*.*?>=\s*([^,;\s]+)", requirement)
    if not match:
        sys.exit(f"pyproject.toml: {requirement!r} has no lower bound")
    print(f"{match.group(1)}=={match.group(2)}")
