"""The OpenAI Batch API's JSON shapes: the batch object, and the lines of its output and
error files."""

from __future__ import annotations

from datetime import datetime
from typing import Any

import orjson

from gateway.models import Batch, BatchLine, BatchLineStatus

EXPIRED_ERROR = {
    "code": "batch_expired",
    "message": "This request could not be executed before the completion window expired.",
}


def _ts(moment: datetime | None) -> int | None:
    return int(moment.timestamp()) if moment else None


def batch_out(batch: Batch) -> dict[str, Any]:
    return {
        "id": batch.public_id,
        "object": "batch",
        "endpoint": batch.endpoint,
        "errors": {"object": "list", "data": batch.errors} if batch.errors else None,
        "input_file_id": batch.input_file.public_id,
        "completion_window": batch.completion_window,
        "status": batch.status,
        "output_file_id": batch.output_file.public_id if batch.output_file else None,
        "error_file_id": batch.error_file.public_id if batch.error_file else None,
        "created_at": _ts(batch.created_at),
        "in_progress_at": _ts(batch.in_progress_at),
        "expires_at": _ts(batch.expires_at),
        "finalizing_at": _ts(batch.finalizing_at),
        "completed_at": _ts(batch.completed_at),
        "failed_at": _ts(batch.failed_at),
        "expired_at": _ts(batch.expired_at),
        "cancelling_at": _ts(batch.cancelling_at),
        "cancelled_at": _ts(batch.cancelled_at),
        "request_counts": {
            "total": batch.total,
            "completed": batch.completed,
            "failed": batch.failed,
        },
        "metadata": batch.metadata,
    }


def line_output(line: BatchLine) -> bytes:
    """A line of the output file (answered) or the error file (failed or expired)."""
    if line.status == BatchLineStatus.EXPIRED:
        item: dict[str, Any] = {
            "id": line.request_id,
            "custom_id": line.custom_id,
            "response": None,
            "error": line.error or EXPIRED_ERROR,
        }
    elif line.error is not None and line.status_code is None:
        item = {
            "id": line.request_id,
            "custom_id": line.custom_id,
            "response": None,
            "error": line.error,
        }
    else:
        item = {
            "id": line.request_id,
            "custom_id": line.custom_id,
            "response": {
                "status_code": line.status_code,
                "request_id": line.request_id,
                "body": line.response_body,
            },
            "error": None,
        }
    return orjson.dumps(item) + b"\n"
