"""``db/compiled.py``: a parameter the caller did not give takes only a literal the statement
was built with, never a silent NULL."""

from __future__ import annotations

import pytest
from sqlalchemy import Executable, bindparam, create_engine, literal, select

from regstream.db import compiled


def test_a_missing_value_is_refused_and_a_built_in_literal_is_used() -> None:
    statement: Executable = select(bindparam("phone"), literal(False, literal_execute=False))
    dialect = create_engine("postgresql+asyncpg://", module=None).dialect  # never connects
    sql, names, held = compiled._compiled(statement, dialect)
    assert len(names) == 2 and "$1" in sql
    given = {"phone": "+254700000000"}
    assert [given[n] if n in given else compiled._held(held, n) for n in names] == [
        "+254700000000",
        False,
    ]
    with pytest.raises(KeyError, match="phone"):
        compiled._held(held, "phone")
