"""The README says which pip extra each feature needs before its own-model snippet uses
one: a new user who runs the snippet right after the quick start must not stop at an
uninstalled Captum."""

from __future__ import annotations

import re
from pathlib import Path

import tomllib

from sanity_cli.cli import LAUNCHER_EXTRAS
from sanity_cli.methods.external import EXTRAS

ROOT = Path(__file__).resolve().parents[1]


def _before_the_snippet() -> tuple[str, str]:
    """The own-model section's text before its first code block, and that code block."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text.split("## Check your own model and method", 1)[1].split("\n## ", 1)[0]
    prose, rest = section.split("```bash", 1)
    return prose, rest.split("```", 1)[0]


def test_every_feature_with_an_extra_names_it_before_the_snippet():
    prose, _ = _before_the_snippet()
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    needed = {kind: extra for kind, (_, extra) in EXTRAS.items()}
    needed |= {f"hydra/launcher={name}": extra for name, (extra, _) in LAUNCHER_EXTRAS.items()}
    for feature, extra in needed.items():
        assert extra in declared, extra
        assert re.search(rf"`{re.escape(feature if '/' in feature else 'method=' + feature)}[` ].*\.\[{extra}\]",
                         prose), f"{feature} ({extra}) is not in the README's table of extras"


def test_the_snippets_extras_are_installed_before_it():
    prose, snippet = _before_the_snippet()
    used = {extra for kind, (_, extra) in EXTRAS.items() if re.search(rf"\b{kind}\b", snippet)}
    assert used == {"captum", "lrp"}, used  # the snippet plugs a Captum and a zennit method
    installs = set().union(*(set(m.split(",")) for m in re.findall(r'pip install -e "\.\[([a-z,]+)\]"', prose)))
    last = " ".join(prose.strip().splitlines()[-2:])  # the sentence right before the snippet
    assert used <= installs and f'pip install -e ".[{",".join(sorted(used))}]"' in last, last
