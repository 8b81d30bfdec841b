"""Files for the Batch API (OpenAI's /v1/files): uploaded inputs and batch results.

The bytes live on the `gateway_files` storage backend (settings.STORAGES; the local
filesystem under var/files by default, any Django storage such as S3 works); rows
say whose they are. A file belongs to the key that uploaded it (or, for a batch's
results, the key that created the batch) and to that key's owner user: it is
visible to that key, to the owner's other keys, and to keys owned by an admin of
the team. Anyone else, in the team or not, gets the same 404 as for a file that
does not exist. Batches follow the same rule (`visible_q`).
"""

from __future__ import annotations

import hashlib
import secrets
from datetime import datetime
from typing import IO, TYPE_CHECKING, Any

from django.conf import settings
from django.core.files.base import ContentFile
from django.core.files.storage import Storage, storages
from django.core.files.uploadedfile import UploadedFile
from django.db.models import Q, QuerySet
from django.utils import timezone

from accounts.selectors import user_is_team_admin
from core.errors import GatewayError, invalid_request
from gateway.models import FilePurpose, StoredFile

if TYPE_CHECKING:
    from accounts.auth import KeyPrincipal

UPLOAD_PURPOSES = (FilePurpose.BATCH,)


def visible_q(principal: KeyPrincipal) -> Q:
    """The files and batches a key may see, as a filter on StoredFile or Batch."""
    team = Q(team_id=principal.team_id)
    if principal.owner_id is not None and user_is_team_admin(
        user_id=principal.owner_id, team_id=principal.team_id
    ):
        return team
    mine = Q(key_id=principal.key_id)
    if principal.owner_id is not None:
        mine |= Q(owner_id=principal.owner_id)
    return team & mine


def storage() -> Storage:
    return storages["gateway_files"]


def file_not_found(file_id: str) -> GatewayError:
    return GatewayError(
        f"No such File object: {file_id}", 404, "invalid_request_error", "file_not_found", "id"
    )


def too_large(size: int) -> GatewayError:
    return GatewayError(
        f"The file is {size} bytes; the limit is {settings.GATEWAY_FILE_MAX_BYTES} bytes. "
        "Split it into several batches.",
        413,
        "invalid_request_error",
        "file_too_large",
        "file",
    )


def _storage_name(team_id: int, public_id: str) -> str:
    # Never the client's file name: it could hold path separators.
    return f"team-{team_id}/{public_id}.jsonl"


def file_create(
    *, principal: KeyPrincipal, purpose: str, upload: UploadedFile[bytes]
) -> StoredFile:
    if purpose not in UPLOAD_PURPOSES:
        raise invalid_request(
            f"Invalid purpose {purpose!r}: this gateway accepts files with purpose 'batch'.",
            param="purpose",
        )
    size = int(upload.size or 0)
    if size > settings.GATEWAY_FILE_MAX_BYTES:
        raise too_large(size)
    if size == 0:
        raise invalid_request("The file is empty.", param="file")
    public_id = "file-" + secrets.token_hex(12)
    name = storage().save(_storage_name(principal.team_id, public_id), upload)
    return StoredFile.objects.create(
        public_id=public_id,
        team_id=principal.team_id,
        key_id=principal.key_id,
        owner_id=principal.owner_id,
        purpose=purpose,
        filename=(upload.name or "upload.jsonl").rsplit("/", 1)[-1][:255],
        bytes=size,
        storage_name=name,
    )


def file_write_result(
    *,
    team_id: int,
    key_id: int | None,
    owner_id: int | None,
    seed: str,
    filename: str,
    content: bytes,
) -> StoredFile:
    """A batch's output or error file. Idempotent per `seed`: rewriting replaces it."""
    public_id = "file-" + hashlib.sha256(seed.encode()).hexdigest()[:24]
    name = _storage_name(team_id, public_id)
    backend = storage()
    if backend.exists(name):
        backend.delete(name)
    saved = backend.save(name, ContentFile(content))
    row, _ = StoredFile.objects.update_or_create(
        public_id=public_id,
        defaults={
            "team_id": team_id,
            "key_id": key_id,
            "owner_id": owner_id,
            "purpose": FilePurpose.BATCH_OUTPUT,
            "filename": filename,
            "bytes": len(content),
            "storage_name": saved,
        },
    )
    return row


def file_get(*, principal: KeyPrincipal, file_id: str) -> StoredFile:
    row = (
        StoredFile.objects.filter(visible_q(principal))
        .filter(public_id=file_id, deleted_at__isnull=True)
        .first()
    )
    if row is None:
        raise file_not_found(file_id)
    return row


def file_open(row: StoredFile) -> IO[bytes]:
    return storage().open(row.storage_name, "rb")


def file_read(row: StoredFile) -> bytes:
    with file_open(row) as handle:
        return bytes(handle.read())


def file_list(
    *,
    principal: KeyPrincipal,
    purpose: str | None = None,
    after: str | None = None,
    limit: int = 100,
    newest_first: bool = True,
) -> tuple[list[StoredFile], bool]:
    visible: QuerySet[StoredFile] = StoredFile.objects.filter(visible_q(principal))
    rows = visible.filter(deleted_at__isnull=True)
    if purpose:
        rows = rows.filter(purpose=purpose)
    if after:
        anchor = visible.filter(public_id=after).first()
        if anchor is not None:
            rows = rows.filter(id__lt=anchor.id) if newest_first else rows.filter(id__gt=anchor.id)
    rows = rows.order_by("-id" if newest_first else "id")
    page = list(rows[: limit + 1])
    return page[:limit], len(page) > limit


def file_delete(*, principal: KeyPrincipal, file_id: str) -> StoredFile:
    row = file_get(principal=principal, file_id=file_id)
    row.deleted_at = timezone.now()
    row.save(update_fields=["deleted_at"])
    backend = storage()
    if backend.exists(row.storage_name):
        backend.delete(row.storage_name)
    return row


def _ts(moment: datetime | None) -> int | None:
    return int(moment.timestamp()) if moment else None


def file_out(row: StoredFile) -> dict[str, Any]:
    """The OpenAI File object."""
    return {
        "id": row.public_id,
        "object": "file",
        "bytes": row.bytes,
        "created_at": _ts(row.created_at),
        "expires_at": None,
        "filename": row.filename,
        "purpose": row.purpose,
        "status": "processed",
        "status_details": None,
    }
