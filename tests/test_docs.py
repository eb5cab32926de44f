"""The front door stays true: the README's configuration table names every setting the service reads."""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path

from service.settings import ENV_PREFIX, ServiceSettings

README = Path(__file__).resolve().parents[1] / "README.md"


def test_the_readme_configuration_table_lists_every_variable():
    rows = {line.split("|")[1].strip().strip("`") for line in README.read_text().splitlines() if line.startswith("| `")}
    variables = {ENV_PREFIX + field.name.upper() for field in fields(ServiceSettings)}
    assert variables - rows == set()
