"""README's tables of channels and fusion rules state each parameter's default; the code's must be the same."""

import re
from pathlib import Path

import pytest

from fedllm.channels import CHANNELS
from fedllm.strategies import FUSION_RULES

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()
NUMBER = re.compile(r"`(\w+)` \((-?[\d.]+(?:e-?\d+)?)[,;:) ]")


def _documented(registry) -> list[tuple[str, str, float]]:
    """(name, key, default) for every numeric default in a table row that starts with registered names."""
    found = []
    for line in README.splitlines():
        cells = [c.strip() for c in line.split("|")[1:-1]]
        if len(cells) < 2:
            continue
        names = [n for n in re.findall(r"`(\w+)`", cells[0]) if n in registry]
        if not names or re.sub(r"[`,\s]", "", cells[0]) != "".join(names):
            continue
        for name in names:
            fields = registry.params_model(name).model_fields
            found += [(name, key, float(value)) for key, value in NUMBER.findall(cells[-1]) if key in fields]
    return found


CASES = [("channel", *c) for c in _documented(CHANNELS)] + [("strategy", *c) for c in _documented(FUSION_RULES)]


def test_the_tables_document_defaults_of_both_kinds():
    kinds = {kind for kind, *_ in CASES}
    assert kinds == {"channel", "strategy"} and len(CASES) > 30


@pytest.mark.parametrize(("kind", "name", "key", "documented"), CASES, ids=[f"{c[1]}.{c[2]}" for c in CASES])
def test_a_documented_default_is_the_codes(kind, name, key, documented):
    registry = CHANNELS if kind == "channel" else FUSION_RULES
    default = registry.params_model(name).model_fields[key].default
    assert default == pytest.approx(documented), f"README says {kind} {name}.{key} defaults to {documented}, code {default}"
