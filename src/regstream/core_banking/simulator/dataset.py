"""The simulator's customers, scripted faults and the demo applicants that go with them.

Everything here is invented and deterministic: accounts, arrangement ids and balances come from
a ``random.Random`` seeded with the CIF (string seeds hash with SHA-512, so the data does not
depend on ``PYTHONHASHSEED`` or on the simulator's fault ``seed``). Values are obviously fake
and unique (phones ``+2547000000NN``, national ids ``300000NN``) so tests can scan logs, events
and stored data for them as canaries.

Seeded CIFs (DOMAIN.md section 5):

=======  ==============================  =================================================
CIF      case                            wire behaviour
=======  ==============================  =================================================
100100   approved                        2 active accounts + 1 dormant
100110   completed_update (demo)         approved-like; demo pre-enrols it with old email
100120   duplicate (demo)                approved-like; demo pre-enrols it unchanged
100200   approved_many_accounts          60 accounts (55 active) -> 3 pages of 25
100300   kyc_mismatch                    core DOB differs from the demo applicant's
100400   restricted                      ``postingRestrict`` set
100410   inactive customer               ``customerStatus`` "2"
100500   no_active_accounts              only DORMANT / CLOSE / UNAUTH arrangements
100510   no records                      arrangements: "No records were found ..."
100520   empty accounts                  arrangements: 200 with an empty ``body``
100600   slow                            every call answers after 1.5 s
100700   timeout                         every call sleeps 30 s (bounded; cut on disconnect)
100800   core error                      500 ``TGVCP-001`` (no response from Transact)
100810   bad gateway                     502
100820   gateway timeout                 504
100830   maintenance                     503 + ``Retry-After: 1``
100840   COB                             500 ``TGVCP-001`` "... close of business (COB) ..."
100900   auth error                      401 ``TGVCP-011``
100910   forbidden                       403 ``TGVCP-002`` SECURITY VIOLATION
100920   bad request                     400 ``TGVCP-003``
100930   garbage                         200 ``text/html``
100940   schema drift                    200 JSON without ``body``
100950   flaky                           calls 1 and 2 of every 3 (per CIF): 500 ``TGVCP-001``
100960   brief maintenance               odd calls (per CIF): 503 + ``Retry-After: 1``
100999   unknown CIF                     absent: 404 ``TGVCP-002`` RECORD MISSING
7nnnnnnnnn  load customers (``LOAD_CIF``)   generated approved-like customers, for benchmarks
=======  ==============================  =================================================

Load customers: any ten-digit CIF starting with 7 is a generated customer (``load_customer``) whose
registration (``load_applicant``) validates to APPROVED with 2 active accounts, so a benchmark can
run the full happy path for as many distinct people as it needs.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass, field, replace
from datetime import date, timedelta
from enum import StrEnum
from typing import Any

__all__ = [
    "CUSTOMERS",
    "DEMO_APPLICANTS",
    "SCRIPTS",
    "UNKNOWN_CIF",
    "DemoApplicant",
    "Fault",
    "Script",
    "SimAccount",
    "SimCustomer",
]

COMPANY = "GB0010001"
UNKNOWN_CIF = "100999"


class Fault(StrEnum):
    SLOW = "slow"
    TIMEOUT = "timeout"
    SYSTEM_ERROR = "system_error"
    BAD_GATEWAY = "bad_gateway"
    GATEWAY_TIMEOUT = "gateway_timeout"
    MAINTENANCE = "maintenance"
    COB_SYSTEM_ERROR = "cob_system_error"
    UNAUTHORIZED = "unauthorized"
    FORBIDDEN = "forbidden"
    BAD_REQUEST = "bad_request"
    GARBAGE = "garbage"
    NO_BODY = "no_body"
    NO_RECORDS = "no_records"
    FLAKY = "flaky"
    BRIEF_MAINTENANCE = "brief_maintenance"


ALL_ENDPOINTS = frozenset({"customer", "arrangements", "holdings"})
LIST_ENDPOINTS = frozenset({"arrangements", "holdings"})


@dataclass(frozen=True, slots=True)
class Script:
    """A scripted behaviour for one CIF on the listed endpoints."""

    fault: Fault
    endpoints: frozenset[str] = ALL_ENDPOINTS


@dataclass(frozen=True, slots=True)
class SimAccount:
    account_id: str
    arrangement_id: str
    product_id: str
    product_description: str
    category_id: str
    currency_id: str
    working_balance: float
    opening_date: date
    arrangement_status: str = "AUTH"
    dormancy_status: str = ""

    def to_wire(self, customer_id: str) -> dict[str, object]:
        """An arrangement item; its keys all exist in the holdings v4 ``products`` schema."""
        return {
            "arrangementId": self.arrangement_id,
            "accountId": self.account_id,
            "customerId": customer_id,
            "productId": self.product_id,
            "productDescription": self.product_description,
            "categoryId": self.category_id,
            "currencyId": self.currency_id,
            "workingBalance": self.working_balance,
            "availableBalance": self.working_balance,
            "openingDate": self.opening_date.isoformat(),
            "arrangementStatus": self.arrangement_status,
            "dormancyStatus": self.dormancy_status,
            "companyCode": COMPANY,
            "accountIBAN": f"KE00SIMB{self.account_id:0>14}",
        }


@dataclass(frozen=True, slots=True)
class SimCustomer:
    customer_id: str
    mnemonic: str
    name: str
    date_of_birth: date
    national_id: str
    phone: str  # as stored in the core (not always E.164-clean)
    email: str
    customer_status: str = "1"
    posting_restrict: str = ""
    accounts: tuple[SimAccount, ...] = field(default_factory=tuple)

    def to_wire(self) -> dict[str, object]:
        return {
            "customerId": self.customer_id,
            "customerMnemonic": self.mnemonic,
            "customerNames": [{"customerName": self.name}],
            "dateOfBirth": self.date_of_birth.isoformat(),
            "nationalityId": "KE",
            "customerStatus": self.customer_status,
            "postingRestrict": self.posting_restrict,
            "kycComplete": "YES",
            "legalDetails": [
                {
                    "legalId": self.national_id,
                    "legalDocumentName": "NATIONAL.ID",
                    "legalExpiredDate": "2034-12-31",
                }
            ],
            "communicationDevices": [{"phoneNumber": self.phone, "email": self.email}],
        }


_PRODUCTS = (
    ("NEGOTIABLE.ACCOUNT", "Current Account", "1001", "KES"),
    ("SAVINGS.ACCOUNT", "Savings Account", "6001", "KES"),
    ("SAVINGS.ACCOUNT", "Dollar Savings Account", "6001", "USD"),
)


def _accounts(cif: str, statuses: list[tuple[str, str]]) -> tuple[SimAccount, ...]:
    """Accounts for ``cif``, one per ``(arrangementStatus, dormancyStatus)``, deterministic."""
    rng = random.Random(f"regstream-sim-{cif}")
    accounts = []
    for index, (status, dormancy) in enumerate(statuses):
        product_id, description, category, currency = _PRODUCTS[index % len(_PRODUCTS)]
        opened = date(2015, 1, 1) + timedelta(days=rng.randrange(3000))
        suffix = "".join(rng.choice("ABCDEFGHJKLMNPQRSTUVWXYZ23456789") for _ in range(5))
        accounts.append(
            SimAccount(
                account_id=f"1{cif[-4:]}{index:02d}",
                arrangement_id=f"AA{opened:%y}{opened.timetuple().tm_yday:03d}{suffix}",
                product_id=product_id,
                product_description=description,
                category_id=category,
                currency_id=currency,
                working_balance=round(rng.uniform(10, 250_000), 2),
                opening_date=opened,
                arrangement_status=status,
                dormancy_status=dormancy,
            )
        )
    return tuple(accounts)


_ACTIVE = ("AUTH", "")
_TWO_ACTIVE_ONE_DORMANT = [_ACTIVE, _ACTIVE, ("AUTH", "DORMANT")]
_MANY = [("AUTH", "DORMANT") if i % 12 == 11 else _ACTIVE for i in range(60)]
_NONE_ACTIVE = [("AUTH", "DORMANT"), ("CLOSE", ""), ("UNAUTH", ""), ("AUTH", "INACTIVE")]


def _person(cif: str, nn: int, name: str, dob: date, **changes: Any) -> SimCustomer:
    customer = SimCustomer(
        customer_id=cif,
        mnemonic="".join(part[:4] for part in name.upper().split())[:10],
        name=name,
        date_of_birth=dob,
        national_id=f"300000{nn:02d}",
        phone=f"+2547000000{nn:02d}",
        email=f"sim.customer{nn:02d}@example.test",
        accounts=_accounts(cif, _TWO_ACTIVE_ONE_DORMANT),
    )
    return replace(customer, **changes)


#: Every customer the simulator knows, keyed by CIF.
CUSTOMERS: dict[str, SimCustomer] = {
    c.customer_id: c
    for c in (
        _person("100100", 1, "OTIENO Amani", date(1988, 4, 2)),
        _person("100110", 9, "Wanjiru Njeri Kamau", date(1985, 7, 19)),
        _person("100120", 10, "Baraka Mwangi", date(1979, 11, 23)),
        _person(
            "100200",
            2,
            "Zoë Brontë-Kariuki",
            date(1992, 2, 29),
            phone="00254 700 000 002",
            accounts=_accounts("100200", _MANY),
        ),
        _person("100300", 3, "Halima Ochieng", date(1990, 1, 15)),
        _person("100400", 5, "Jabari Kiprono", date(1983, 6, 30), posting_restrict="1"),
        _person("100410", 11, "Neema Achieng", date(1975, 3, 8), customer_status="2"),
        _person(
            "100500",
            6,
            "Imani Wekesa",
            date(1995, 12, 1),
            accounts=_accounts("100500", _NONE_ACTIVE),
        ),
        _person("100510", 12, "Tumaini Chebet", date(1987, 9, 14), accounts=()),
        _person("100520", 13, "Faraji Mutua", date(1991, 5, 5), accounts=()),
        _person("100600", 14, "Zawadi Akinyi", date(1986, 8, 21)),
        _person("100700", 7, "Juma Barasa", date(1980, 10, 10)),
        _person("100800", 8, "Nia Wairimu", date(1993, 4, 17)),
        _person("100950", 15, "Kito Langat", date(1984, 1, 28)),
        _person("100960", 16, "Subira Nyambura", date(1989, 12, 12)),
    )
}

#: Scripted behaviours keyed by CIF (faults win over the customer's data).
SCRIPTS: dict[str, Script] = {
    "100510": Script(Fault.NO_RECORDS, LIST_ENDPOINTS),
    "100600": Script(Fault.SLOW),
    "100700": Script(Fault.TIMEOUT),
    "100800": Script(Fault.SYSTEM_ERROR),
    "100810": Script(Fault.BAD_GATEWAY),
    "100820": Script(Fault.GATEWAY_TIMEOUT),
    "100830": Script(Fault.MAINTENANCE),
    "100840": Script(Fault.COB_SYSTEM_ERROR),
    "100900": Script(Fault.UNAUTHORIZED),
    "100910": Script(Fault.FORBIDDEN),
    "100920": Script(Fault.BAD_REQUEST),
    "100930": Script(Fault.GARBAGE),
    "100940": Script(Fault.NO_BODY),
    "100950": Script(Fault.FLAKY),
    "100960": Script(Fault.BRIEF_MAINTENANCE),
}


LOAD_CIF = re.compile(r"^7\d{9}$")
_LOAD_DOB = date(1990, 1, 1)


def _load_letters(number: int) -> str:
    """A name part from a number (names take letters only): 0 -> "Aaaaaaa", 1 -> "Baaaaaa"."""
    letters = []
    for _ in range(7):
        number, digit = divmod(number, 26)
        letters.append("abcdefghijklmnopqrstuvwxyz"[digit])
    return "".join(letters).capitalize()


def load_customer(cif: str) -> SimCustomer | None:
    """The generated customer of a load CIF (``LOAD_CIF``), None for any other CIF."""
    if not LOAD_CIF.fullmatch(cif):
        return None
    n = int(cif[1:])
    return SimCustomer(
        customer_id=cif,
        mnemonic=f"LOAD{n % 1_000_000:06d}",
        name=f"Load {_load_letters(n)}",
        date_of_birth=_LOAD_DOB,
        national_id=f"7{n:09d}",
        phone=f"+2548{n % 100_000_000:08d}",
        email=f"load{n}@example.test",
        accounts=_accounts(cif, [_ACTIVE, _ACTIVE]),
    )


def load_applicant(n: int) -> dict[str, str]:
    """The registration (REST API fields) that validates to APPROVED against load customer
    ``n`` (0 <= n < 10**9; phones repeat every 10**8, so people below 10**8 are all distinct)."""
    cif = f"7{n:09d}"
    return {
        "customerNumber": cif,
        "firstName": "Load",
        "lastName": _load_letters(n),
        "dateOfBirth": _LOAD_DOB.isoformat(),
        "nationalId": f"7{n:09d}",
        "idType": "NATIONAL.ID",
        "phone": f"+2548{n % 100_000_000:08d}",
        "email": f"load{n}@example.test",
    }


@dataclass(frozen=True, slots=True)
class DemoApplicant:
    """One demo registration and the outcome the pipeline must reach for it.

    ``enrolled`` asks the demo loader to pre-enrol a MobileUser with the same identity (CIF,
    date of birth, national id, phone); ``enrolled_email``/``enrolled_device_id`` are the
    enrolled user's values when they differ from the registration's (``None`` = same).
    """

    scenario: str
    expected_status: str
    expected_code: str | None
    customer_number: str
    first_name: str
    last_name: str
    date_of_birth: str
    national_id: str
    id_type: str
    phone: str
    email: str
    account_number: str | None
    device_id: str
    enrolled: bool = False
    enrolled_email: str | None = None
    enrolled_device_id: str | None = None


def _demo(
    scenario: str,
    status: str,
    code: str | None,
    cif: str,
    nn: int,
    name: tuple[str, str],
    dob: str,
    **changes: Any,
) -> DemoApplicant:
    applicant = DemoApplicant(
        scenario=scenario,
        expected_status=status,
        expected_code=code,
        customer_number=cif,
        first_name=name[0],
        last_name=name[1],
        date_of_birth=dob,
        national_id=f"300000{nn:02d}",
        id_type="NATIONAL.ID",
        phone=f"+2547000000{nn:02d}",
        email=f"demo.{scenario.replace('_', '.')}@example.test",
        account_number=None,
        device_id=f"demo-device-{nn:02d}",
    )
    return replace(applicant, **changes)


#: One registration per demo scenario, matching the seeded customers above.
DEMO_APPLICANTS: list[DemoApplicant] = [
    _demo("approved", "APPROVED", None, "100100", 1, ("Amani", "Otieno"), "1988-04-02",
          account_number=CUSTOMERS["100100"].accounts[0].account_id),
    _demo("approved_many_accounts", "APPROVED", None, "100200", 2, ("Zoe", "Bronte Kariuki"),
          "1992-02-29"),
    _demo("kyc_mismatch", "FAILED", "KYC_MISMATCH", "100300", 3, ("Halima", "Ochieng"),
          "1990-01-16"),
    _demo("not_found", "FAILED", "CUSTOMER_NOT_FOUND", UNKNOWN_CIF, 4, ("Pendo", "Muthoni"),
          "1994-06-06"),
    _demo("restricted", "FAILED", "CUSTOMER_RESTRICTED", "100400", 5, ("Jabari", "Kiprono"),
          "1983-06-30"),
    _demo("no_active_accounts", "FAILED", "NO_ACTIVE_ACCOUNTS", "100500", 6, ("Imani", "Wekesa"),
          "1995-12-01"),
    _demo("core_timeout", "FAILED", "CORE_TIMEOUT", "100700", 7, ("Juma", "Barasa"),
          "1980-10-10"),
    _demo("core_error", "FAILED", "CORE_UNAVAILABLE", "100800", 8, ("Nia", "Wairimu"),
          "1993-04-17"),
    _demo("completed_update", "COMPLETED", None, "100110", 9, ("Wanjiru Njeri", "Kamau"),
          "1985-07-19", enrolled=True, enrolled_email="old.wanjiru.kamau@example.test",
          enrolled_device_id="demo-device-09-old"),
    _demo("duplicate", "DUPLICATE", None, "100120", 10, ("Baraka", "Mwangi"), "1979-11-23",
          enrolled=True),
]  # fmt: skip
