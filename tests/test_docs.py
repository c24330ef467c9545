"""The README stays true to the code: every setting and every close code is documented."""

from __future__ import annotations

from tests.service import REPO
from tidings.config import config_fields, env_name, markdown_rows
from workers.errors import ALL_CLOSE_REASONS, ReplyCode

README = (REPO / "README.md").read_text()


def test_every_setting_is_in_the_readme() -> None:
    missing = [env_name(f.name) for f in config_fields() if f"`{env_name(f.name)}`" not in README]
    assert not missing
    stale = [row for row in markdown_rows() if row not in README]
    assert not stale, "README configuration table is out of date: regenerate it from markdown_rows()"


def test_every_close_code_and_reply_code_is_in_the_readme() -> None:
    assert not [r.code for r in ALL_CLOSE_REASONS if f"| {r.code} |" not in README]
    assert not [c.value for c in ReplyCode if f"`{c.value}`" not in README]


def test_exactly_two_commands_for_a_newcomer() -> None:
    block = README.split("## Two commands", 1)[1].split("```sh", 1)[1].split("```", 1)[0]
    assert [line.split("#")[0].strip() for line in block.strip().splitlines()] == ["make run", "make test"]
