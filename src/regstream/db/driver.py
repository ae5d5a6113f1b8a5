"""Kept only for ``pipeline/persist.py``'s ``from regstream.db.driver import Bound``: the
hand-written driver statements are gone (issue 17), the hot statements are SQLAlchemy Core in
``registrations`` and ``users``. Import ``Bound`` from ``regstream.db.registrations``; delete
this module when nothing imports it."""

from regstream.db.registrations import Bound

__all__ = ["Bound"]
