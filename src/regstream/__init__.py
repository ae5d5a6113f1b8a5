"""regstream: validate mobile-banking registrations against T24 and stream every step live."""

__version__ = "0.1.0"
