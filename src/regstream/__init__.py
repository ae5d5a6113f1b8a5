"""regstream: validate mobile-banking registrations against T24 and stream every step live.

``regstream.RegistrationPubSub`` is the seed's publisher (``realtime/publisher.py``), imported on
first use: ``import regstream`` stays light (the CLI, ``__version__``) and free of import cycles
(every ``regstream.*`` module imports this package first).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from regstream.realtime.publisher import RegistrationPubSub

__version__ = "0.1.0"
__all__ = ["RegistrationPubSub", "__version__"]


def __getattr__(name: str) -> Any:
    if name == "RegistrationPubSub":
        from regstream.realtime.publisher import RegistrationPubSub

        return RegistrationPubSub
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
