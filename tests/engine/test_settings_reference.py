"""The README's settings reference lists every setting of the run's config with its default: a
setting added, renamed or given a new default without its line there fails here."""
import dataclasses
import re

from conftest import REPO
from engine.config import RunConfig

# Row of the reference table: | `key` | `default` | what it sets |
ROW = re.compile(r"^\| `([a-z_.]+)` \| `([^`]*)` \| (.+) \|$")
# Internal fields that are no setting (unknown schedule keys are collected there to be refused).
NOT_SETTINGS = {"schedule.extra"}


def settings(config, prefix=""):
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if dataclasses.is_dataclass(value):
            yield from settings(value, f"{prefix}{f.name}.")
        elif prefix + f.name not in NOT_SETTINGS:
            yield prefix + f.name, value


def as_written(value) -> str:
    """A default as the table writes it."""
    if value is None or value == "" or value == [] or value == {}:
        return "(empty)"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):
        return "[" + ", ".join(map(str, value)) + "]"
    return str(value)


def test_every_setting_is_in_the_readme_reference_with_its_default():
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    documented = {m.group(1): m.group(2) for line in readme.splitlines() if (m := ROW.match(line))}
    expected = {key: as_written(value) for key, value in settings(RunConfig())}
    assert len(expected) > 70   # the walk reached every section
    missing = sorted(set(expected) - set(documented))
    assert not missing, f"settings missing from README.md's settings reference: {missing}"
    unknown = sorted(set(documented) - set(expected))
    assert not unknown, f"README.md's settings reference lists settings that do not exist: {unknown}"
    wrong = {key: (documented[key], expected[key]) for key in expected if documented[key] != expected[key]}
    assert not wrong, f"README.md's settings reference: default (written, actual) differs: {wrong}"
