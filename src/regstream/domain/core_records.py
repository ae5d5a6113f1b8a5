"""What the core banking system tells us about a customer, independent of the wire format."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import date


@dataclass(frozen=True, slots=True)
class LegalId:
    legal_id: str
    document_name: str  # T24 LEGAL.DOC.NAME, e.g. "NATIONAL.ID", "PASSPORT"


@dataclass(frozen=True, slots=True)
class CoreCustomer:
    customer_id: str
    names: tuple[str, ...]
    date_of_birth: date | None
    customer_status: str  # bank code table; "1" = active in the model bank
    posting_restrict: str  # empty = none
    kyc_complete: bool
    legal_ids: tuple[LegalId, ...] = field(default_factory=tuple)
    phones: tuple[str, ...] = field(default_factory=tuple)
    emails: tuple[str, ...] = field(default_factory=tuple)


@dataclass(frozen=True, slots=True)
class CoreAccount:
    account_id: str
    arrangement_id: str
    arrangement_status: str  # AUTH, UNAUTH, CLOSE, ...
    dormancy_status: str  # empty = active
    iban: str = ""
    product_id: str = ""
    currency_id: str = ""

    @property
    def is_active(self) -> bool:
        return self.arrangement_status == "AUTH" and not self.dormancy_status
