"""The README's and the docs' lists of method configs name exactly the shipped ones.

A method config added to ``gpcps_lightning/configs/methods`` without a line in the README, in
docs/configuration.md's list of ``--methods`` names and in docs/baselines.md's "Which method should I use?"
table fails here, and so does a name left in the docs after its config is gone.
"""

from __future__ import annotations

import re
from pathlib import Path

from gpcps_lightning.tools.provenance import load_method_config, shipped_method_names

REPO = Path(__file__).resolve().parents[1]


def _between(text: str, start: str, end: str) -> str:
    """The text after the first ``start`` up to the next ``end``, on one line (markdown wraps anywhere)."""
    flat = " ".join(text.split())
    begin = flat.index(start) + len(start)
    return flat[begin : flat.index(end, begin)]


def _listed_names(text: str) -> list[str]:
    """Backticked plain names outside parentheses: ``(also `gpcps_grad`)`` and the like are asides."""
    while True:
        stripped = re.sub(r"\([^()]*\)", "", text)
        if stripped == text:
            break
        text = stripped
    return re.findall(r"`(\w+)`", text)


def _fit_configs() -> set[str]:
    """The shipped configs that ``gpcps fit`` can train (ST++'s, with an ``stpp:`` block, cannot)."""
    return {name for name in shipped_method_names() if load_method_config(name).stpp is None}


def test_listed_names_skips_asides_and_options() -> None:
    text = "`a` (row II, also `b`), `c_1` (`d=8`; the authors' `e` (nested `f`)) and `g h`"
    assert _listed_names(text) == ["a", "c_1"]


def test_readme_lists_every_method_config() -> None:
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    paragraph = _between(
        readme, "`--config gpcps_lightning/configs/methods/<method>.yaml`", "`gpcps reproduce methods`"
    )
    fit_list = _listed_names(_between(paragraph, "one of", "."))
    assert len(fit_list) == len(set(fit_list)), fit_list
    # The sentence "one of ..." names what `gpcps fit --config` can train; the paragraph adds the rest.
    assert set(fit_list) == _fit_configs()
    assert set(_listed_names(paragraph)) == set(shipped_method_names())


def test_configuration_doc_lists_every_method_config() -> None:
    doc = (REPO / "docs" / "configuration.md").read_text(encoding="utf-8")
    listed = _listed_names(
        _between(doc, "reads the shipped config `gpcps_lightning/configs/methods/NAME.yaml`:", "Default:")
    )
    assert len(listed) == len(set(listed)), listed
    assert set(listed) == set(shipped_method_names())


def test_which_method_table_covers_every_method_config() -> None:
    doc = (REPO / "docs" / "baselines.md").read_text(encoding="utf-8")
    section = doc[doc.index("## Which method should I use?") :]
    section = section[: section.index("\n## ", 1)]
    rows = [line for line in section.splitlines() if line.startswith("| `")]
    listed = [name for row in rows for name in _listed_names(row.split("|")[1])]
    assert len(listed) == len(set(listed)), listed
    assert set(listed) == set(shipped_method_names())


def test_intervals_quoted_outside_results_are_those_of_its_generated_tables() -> None:
    """The README and the method guide quote results.md's intervals; a rerun that changes one shows here."""
    results = (REPO / "docs" / "results.md").read_text()
    generated = "".join(re.findall(r"<!-- begin generated.*?<!-- end generated", results, re.S))
    interval = re.compile(r"\[[+-]?\d+\.\d+, [+-]?\d+\.\d+\]")
    assert len(interval.findall(generated)) > 50
    stale = {
        name: [i for i in interval.findall((REPO / name).read_text()) if i not in generated]
        for name in ("README.md", "docs/baselines.md")
    }
    assert stale == {"README.md": [], "docs/baselines.md": []}
