"""Bodies of the Files and Batches routes, shaped as the `openai` client's types (openai.types.Batch, FileObject)."""
from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, StrictStr

BatchStatus = Literal["validating", "failed", "in_progress", "finalizing", "completed", "expired", "cancelling",
                      "cancelled"]


class FileObject(BaseModel):
    id: str
    object: Literal["file"] = "file"
    bytes: int
    created_at: int
    filename: str
    purpose: Literal["batch", "batch_output"]
    status: Literal["uploaded", "processed", "error"]
    expires_at: int | None = Field(description="When the file is deleted (DMP_BATCH_TTL after upload)")
    status_details: str | None = None


class FileList(BaseModel):
    object: Literal["list"] = "list"
    data: list[FileObject]
    has_more: bool = False


class FileDeleted(BaseModel):
    id: str
    object: Literal["file"] = "file"
    deleted: bool


class BatchRequest(BaseModel):
    """openai `batches.create` parameters."""

    model_config = ConfigDict(extra="forbid")

    input_file_id: StrictStr = Field(max_length=64, description="A file uploaded with purpose batch")
    endpoint: Literal["/v1/images/generations"] = Field(description="The only endpoint served in batches")
    completion_window: Literal["24h"] = Field(description="OpenAI's only window: lines not run by then expire")
    metadata: dict[StrictStr, StrictStr] | None = Field(None, max_length=16, description="Up to 16 pairs "
                                                        "(keys up to 64 characters, values up to 512)")
    output_expires_after: dict | None = Field(None, description="Accepted and ignored: outputs live DMP_BATCH_TTL")


class BatchErrorItem(BaseModel):
    code: str | None
    message: str | None
    param: str | None = None
    line: int | None = None


class BatchErrors(BaseModel):
    object: Literal["list"] = "list"
    data: list[BatchErrorItem]


class RequestCounts(BaseModel):
    total: int
    completed: int
    failed: int


class BatchObject(BaseModel):
    model_config = ConfigDict(protected_namespaces=())

    id: str
    object: Literal["batch"] = "batch"
    endpoint: str
    errors: BatchErrors | None
    input_file_id: str
    completion_window: str
    status: BatchStatus
    output_file_id: str | None
    error_file_id: str | None
    created_at: int
    in_progress_at: int | None
    expires_at: int | None
    finalizing_at: int | None
    completed_at: int | None
    failed_at: int | None
    expired_at: int | None
    cancelling_at: int | None
    cancelled_at: int | None
    model: str | None
    metadata: dict[str, str] | None
    request_counts: RequestCounts


class BatchList(BaseModel):
    object: Literal["list"] = "list"
    data: list[BatchObject]
    first_id: str | None
    last_id: str | None
    has_more: bool


class Delivery(BaseModel):
    event_id: str
    type: str
    attempt: int
    at: int
    url: str
    outcome: Literal["delivered", "retry", "failed"]
    status_code: int | None = None
    error: str | None = None
    sender: str | None = Field(None, description="The replica that made the attempt (hostname-pid)")


class DeliveryList(BaseModel):
    object: Literal["list"] = "list"
    data: list[Delivery]
