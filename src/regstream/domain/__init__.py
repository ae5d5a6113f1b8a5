"""Pure domain: enums, value objects, rules and error codes. No I/O here."""
