"""The API's own documentation, for viewers: ``/openapi.json`` and ``/docs`` (Swagger UI).

FastAPI's open defaults are switched off in ``app.create_api``; these serve the same behind the
viewer role. Neither is in the document itself.
"""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse, JSONResponse

from regstream.api.auth import ViewerPrincipal

router = APIRouter(tags=["auth"])


@router.get("/openapi.json", include_in_schema=False)
async def openapi_document(request: Request, _: ViewerPrincipal) -> JSONResponse:
    return JSONResponse(request.app.openapi())


@router.get("/docs", include_in_schema=False)
async def api_docs(_: ViewerPrincipal) -> HTMLResponse:
    return get_swagger_ui_html(openapi_url="/openapi.json", title="regstream API")
