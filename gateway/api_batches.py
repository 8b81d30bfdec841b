"""OpenAI's Files and Batch APIs under /v1: what `client.files.*` and `client.batches.*` call.

Thin: authenticate the virtual key, parse, call gateway.files / gateway.batches,
shape the OpenAI object. Everything is scoped to what the key may see (its own, its
owner's, or its team's if the owner is a team admin; gateway.files.visible_q): any
other file or batch is a 404, exactly like one that does not exist.
"""

from __future__ import annotations

from typing import Any

from django.http import FileResponse, HttpRequest, HttpResponse
from django.http.response import HttpResponseBase
from ninja import Router

from accounts.auth import authenticate
from core.db import run_db_atomic
from core.errors import invalid_request
from core.http import json_response
from gateway import batch_shapes, batches, files
from gateway import http as edge
from gateway.routing import routing_tables

router = Router(tags=["Batch API (OpenAI-compatible)"])

_UPLOAD_DOC = {
    "requestBody": {
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "properties": {
                        "file": {"type": "string", "format": "binary"},
                        "purpose": {"type": "string", "enum": ["batch"]},
                    },
                    "required": ["file", "purpose"],
                }
            }
        },
        "required": True,
    }
}
_BODY_DOC = {
    "requestBody": {
        "content": {"application/json": {"schema": {"type": "object"}}},
        "required": True,
        "description": "The OpenAI request body, as the official SDK sends it.",
    }
}


def _limit(request: HttpRequest, default: int, most: int) -> int:
    raw = request.GET.get("limit")
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise invalid_request("'limit' must be a whole number.", param="limit") from None
    if not 1 <= value <= most:
        raise invalid_request(f"'limit' must be between 1 and {most}.", param="limit")
    return value


def _page(items: list[dict[str, Any]], has_more: bool) -> dict[str, Any]:
    return {
        "object": "list",
        "data": items,
        "first_id": items[0]["id"] if items else None,
        "last_id": items[-1]["id"] if items else None,
        "has_more": has_more,
    }


# --- files ---------------------------------------------------------------------------------------


@router.post("/files", openapi_extra=_UPLOAD_DOC, summary="Upload a file (purpose 'batch')")
async def file_create(request: HttpRequest) -> HttpResponse:
    principal = await authenticate(request)
    if not (request.content_type or "").startswith("multipart/form-data"):
        raise invalid_request(
            "Upload the file as multipart/form-data with fields 'file' and 'purpose'.",
            param="file",
        )
    upload = request.FILES.get("file")
    if upload is None:
        raise invalid_request("The 'file' field is missing.", param="file")
    purpose = request.POST.get("purpose") or ""
    row = await run_db_atomic(
        files.file_create,
        principal=principal,
        purpose=purpose,
        upload=upload,
    )
    return json_response(files.file_out(row))


@router.get("/files", summary="List the team's files")
async def file_list(request: HttpRequest) -> HttpResponse:
    principal = await authenticate(request)
    order = request.GET.get("order", "desc")
    if order not in ("asc", "desc"):
        raise invalid_request("'order' must be 'asc' or 'desc'.", param="order")
    rows, more = await run_db_atomic(
        files.file_list,
        principal=principal,
        purpose=request.GET.get("purpose") or None,
        after=request.GET.get("after") or None,
        limit=_limit(request, 100, 10_000),
        newest_first=order == "desc",
    )
    return json_response(_page([files.file_out(r) for r in rows], more))


@router.get("/files/{file_id}", summary="Describe a file")
async def file_get(request: HttpRequest, file_id: str) -> HttpResponse:
    principal = await authenticate(request)
    row = await run_db_atomic(files.file_get, principal=principal, file_id=file_id)
    return json_response(files.file_out(row))


@router.delete("/files/{file_id}", summary="Delete a file")
async def file_delete(request: HttpRequest, file_id: str) -> HttpResponse:
    principal = await authenticate(request)
    row = await run_db_atomic(files.file_delete, principal=principal, file_id=file_id)
    return json_response({"id": row.public_id, "object": "file", "deleted": True})


@router.get("/files/{file_id}/content", summary="Download a file's content")
async def file_content(request: HttpRequest, file_id: str) -> HttpResponseBase:
    principal = await authenticate(request)
    row = await run_db_atomic(files.file_get, principal=principal, file_id=file_id)
    handle = await run_db_atomic(files.file_open, row)
    response = FileResponse(handle, content_type="application/octet-stream")
    response["content-disposition"] = f'attachment; filename="{row.filename}"'
    return response


# --- batches -------------------------------------------------------------------------------------


@router.post("/batches", openapi_extra=_BODY_DOC, summary="Create a batch")
async def batch_create(request: HttpRequest) -> HttpResponse:
    principal = await authenticate(request)
    body = edge.parse_json_body(request)
    table = await routing_tables.get()
    batch = await run_db_atomic(
        batches.batch_create,
        principal=principal,
        table=table,
        input_file_id=body.get("input_file_id"),
        endpoint=body.get("endpoint"),
        completion_window=body.get("completion_window"),
        metadata=body.get("metadata"),
    )
    found = await run_db_atomic(batches.batch_get, principal=principal, batch_id=batch.public_id)
    return json_response(batch_shapes.batch_out(found))


@router.get("/batches", summary="List the team's batches, newest first")
async def batch_list(request: HttpRequest) -> HttpResponse:
    principal = await authenticate(request)
    rows, more = await run_db_atomic(
        batches.batch_list,
        principal=principal,
        after=request.GET.get("after") or None,
        limit=_limit(request, 20, 100),
    )
    return json_response(_page([batch_shapes.batch_out(r) for r in rows], more))


@router.get("/batches/{batch_id}", summary="Retrieve a batch")
async def batch_get(request: HttpRequest, batch_id: str) -> HttpResponse:
    principal = await authenticate(request)
    batch = await run_db_atomic(batches.batch_get, principal=principal, batch_id=batch_id)
    return json_response(batch_shapes.batch_out(batch))


@router.post("/batches/{batch_id}/cancel", summary="Cancel a batch")
async def batch_cancel(request: HttpRequest, batch_id: str) -> HttpResponse:
    principal = await authenticate(request)
    batch = await run_db_atomic(batches.batch_cancel, principal=principal, batch_id=batch_id)
    return json_response(batch_shapes.batch_out(batch))
