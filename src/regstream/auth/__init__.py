"""Who may do what: operators, roles, passwords, API tokens, sessions, CSRF, limits, stream tickets.

The design (details and reasons in ``docs/security.md``):

* **Credentials.** Browsers sign in with a password (argon2id) and get a server-side session: the
  cookie holds 256 random bits, the database holds their SHA-256 and the expiry, so sign-out and
  ``users disable`` revoke at once. Machines send ``Authorization: Bearer rst_…`` API tokens,
  also stored as SHA-256 only. EventSource clients that can send neither may trade either for a
  single-use stream ticket (``?ticket=rstk_…``) that lives ``REGSTREAM_STREAM_TICKET_TTL``
  seconds, opens exactly one stream and is accepted nowhere else.
* **Roles.** ``viewer`` < ``operator`` < ``admin`` (``principal.Role``).
* **CSRF.** Cookie-authenticated unsafe requests must carry the session's CSRF token
  (``X-CSRF-Token`` header or ``csrf_token`` form field); any unsafe request whose ``Origin``
  (or ``Sec-Fetch-Site``) says cross-site is refused before routing. Bearer requests are exempt:
  browsers never attach ``Authorization`` on their own.
* **Limits.** Body size; per-user streams, ``process`` and sign-in rates counted fleet-wide in
  Redis (``limits``, ``stream_slots``), per process while Redis is down; fair argon2 turns.

Layering: this package sits between ``api``/``web`` (which use it) and ``db``/``realtime``/
``domain``/``config`` (which it uses); it never imports ``api``.
"""

from regstream.auth.principal import Principal, Role

__all__ = ["Principal", "Role"]
