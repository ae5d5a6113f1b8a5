"""The operator's pages, served by the same app: server-rendered shells, data from the API.

Each page is a Jinja2 template with no personal data in it: the page's ES module reads the
registration(s) from the REST API (which returns masked values) and listens to the stream through
the ``@regstream/client`` package (``clients/js``, served as ``/static/client/``; configured for
the pages by ``static/js/stream.js``). So a page's HTML is the same for every person and every
registration. Pages come in three routers by who may open them (``public``: sign-in;
``viewer_pages``; ``admin_pages``); ``app.py`` includes each with the matching page-role
dependency from ``api/auth.py`` (a signed-out visitor is sent to ``/login?next=…``), and the
data behind them is checked again by the API.

No build step, no CDN, no external fonts: ``/static`` is this package's ``static/`` folder.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, Request
from fastapi import Path as PathParam
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates

HERE = Path(__file__).resolve().parent
STATIC_DIR = HERE / "static"
TEMPLATES_DIR = HERE / "templates"

templates = Jinja2Templates(directory=str(TEMPLATES_DIR))
public = APIRouter(include_in_schema=False)
viewer_pages = APIRouter(include_in_schema=False)
admin_pages = APIRouter(include_in_schema=False)

_HEADERS = {
    "Cache-Control": "no-store",
    "Content-Security-Policy": (
        "default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; "
        "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'"
    ),
    "Referrer-Policy": "same-origin",
    "X-Content-Type-Options": "nosniff",
}


def static_files() -> StaticFiles:
    """The ``/static`` mount (``app.py`` mounts it).

    ``static/client`` is a symbolic link to ``clients/js/src``, the ``@regstream/client``
    package's ES modules, which the pages import as they are (no build step). A wheel holds a copy
    of those files (setuptools copies what a link points to), an editable install serves the
    repository's; ``follow_symlink`` lets StaticFiles serve files reached through that link.
    """
    return StaticFiles(directory=str(STATIC_DIR), follow_symlink=True)


def _page(request: Request, template: str, title: str, **context: object) -> HTMLResponse:
    return templates.TemplateResponse(
        request, template, {"title": title, "nav": template, **context}, headers=_HEADERS
    )


@public.get("/")
async def home() -> Response:
    return RedirectResponse("/registrations", status_code=303)


@viewer_pages.get("/registrations", response_class=HTMLResponse)
async def registration_list(request: Request) -> HTMLResponse:
    return _page(request, "registrations.html", "Registrations")


@viewer_pages.get("/registrations/{registration_id}", response_class=HTMLResponse)
async def registration_detail(
    request: Request, registration_id: Annotated[int, PathParam(ge=1, le=2**53)]
) -> HTMLResponse:
    return _page(
        request,
        "registration.html",
        f"Registration #{registration_id}",
        registration_id=registration_id,
    )


@admin_pages.get("/admin", response_class=HTMLResponse)
async def admin_dashboard(request: Request) -> HTMLResponse:
    return _page(request, "admin.html", "Live dashboard")


@admin_pages.get("/admin/audit", response_class=HTMLResponse)
async def audit_log(request: Request) -> HTMLResponse:
    return _page(request, "audit.html", "Audit log")


@public.get("/login", response_class=HTMLResponse)
async def login(request: Request) -> HTMLResponse:
    next_path = request.query_params.get("next", "/registrations")[:500]
    failed = request.query_params.get("error") == "invalid"
    return _page(request, "login.html", "Sign in", next_path=next_path, failed=failed)
