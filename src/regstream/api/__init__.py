"""HTTP API: routers per resource, schemas, dependencies, the SSE stream endpoint."""
