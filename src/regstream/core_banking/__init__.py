"""Core-banking adapter: the ``CoreBanking`` seam, the T24 REST client and its errors.

Only this package speaks HTTP to T24. The pipeline depends on ``CoreBanking`` and catches
``CoreBankingError``; the simulator lives in ``regstream.core_banking.simulator`` and is
imported on demand (it pulls in Starlette and uvicorn).
"""

from regstream.core_banking.client import CoreBanking, T24Client, T24ClientConfig
from regstream.core_banking.errors import (
    CircuitOpen,
    CoreAuthError,
    CoreBankingError,
    CoreMaintenance,
    CoreProtocolError,
    CoreRequestError,
    CoreTimeout,
    CoreTlsError,
    CoreUnavailable,
    CustomerNotFound,
)

__all__ = [
    "CircuitOpen",
    "CoreAuthError",
    "CoreBanking",
    "CoreBankingError",
    "CoreMaintenance",
    "CoreProtocolError",
    "CoreRequestError",
    "CoreTimeout",
    "CoreTlsError",
    "CoreUnavailable",
    "CustomerNotFound",
    "T24Client",
    "T24ClientConfig",
]
