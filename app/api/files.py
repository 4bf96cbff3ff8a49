"""OpenAI-compatible Files for the Batch API: POST/GET /v1/files, GET/DELETE /v1/files/{id}, GET .../content."""
from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, File, Form, Request, UploadFile
from fastapi.responses import Response
from starlette.concurrency import run_in_threadpool

from app.api.batch_schemas import FileDeleted, FileList, FileObject
from app.api.keys import KEY_OPTIONAL, Caller, KeyDep
from app.api.v1 import ERRORS, NO_422
from app.api.v1_errors import OpenAIRoute
from app.batch.service import BatchService

router = APIRouter(prefix="/v1", tags=["batch"], route_class=OpenAIRoute)
NOBODY = "-"  # the one owner while DMP_API_KEYS is off


def owner(caller: Caller) -> str:
    """Whose files and batches these are: the API key's id (a key sees only its own)."""
    return caller.key.id if caller.key is not None else NOBODY


def batches_of(request: Request) -> BatchService:
    return request.app.state.batches


@router.post("/files", response_model=FileObject, responses=ERRORS | NO_422, openapi_extra=KEY_OPTIONAL,
             summary="Upload a batch input file (JSONL; at most DMP_BATCH_MAX_FILE_BYTES)")
async def upload_file(request: Request, caller: KeyDep, file: Annotated[UploadFile, File()],
                      purpose: Annotated[str, Form(max_length=32)]):
    data = await file.read()
    return await run_in_threadpool(batches_of(request).upload, owner(caller), file.filename or "", purpose, data)


@router.get("/files", response_model=FileList, responses=ERRORS | NO_422, openapi_extra=KEY_OPTIONAL,
            summary="This key's files")
async def list_files(request: Request, caller: KeyDep):
    return FileList(data=await run_in_threadpool(batches_of(request).files, owner(caller)))


@router.get("/files/{file_id}", response_model=FileObject, responses=ERRORS | NO_422, openapi_extra=KEY_OPTIONAL,
            summary="A file's description")
async def get_file(file_id: str, request: Request, caller: KeyDep):
    return await run_in_threadpool(batches_of(request).file, owner(caller), file_id)


@router.get("/files/{file_id}/content", response_class=Response, responses=ERRORS | NO_422 | {
    200: {"content": {"application/jsonl": {"schema": {"type": "string"}}}, "description": "The file's bytes"}},
    openapi_extra=KEY_OPTIONAL, summary="A file's bytes (a batch's input, output or error JSONL)")
async def file_content(file_id: str, request: Request, caller: KeyDep):
    data = await run_in_threadpool(batches_of(request).file_content, owner(caller), file_id)
    return Response(data, media_type="application/jsonl")


@router.delete("/files/{file_id}", response_model=FileDeleted, responses=ERRORS | NO_422, openapi_extra=KEY_OPTIONAL,
               summary="Delete a file")
async def delete_file(file_id: str, request: Request, caller: KeyDep):
    await run_in_threadpool(batches_of(request).delete_file, owner(caller), file_id)
    return FileDeleted(id=file_id, deleted=True)
