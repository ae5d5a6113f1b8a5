"""Kept only for ``pipeline/runner.py``'s ``from regstream.db.driver import Bound`` while that
module is being split (issue 17): the hand-written driver statements are gone, the hot
statements are SQLAlchemy Core in ``registrations`` and ``users``. Import ``Bound`` from
``regstream.db.registrations``; delete this module when nothing imports it."""

from regstream.db.registrations import Bound

__all__ = ["Bound"]
