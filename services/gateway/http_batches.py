"""OpenAI's batch API on the gateway's HTTP face, over the background jobs (services/gateway/jobs):

    POST /v1/files (multipart: file, purpose=batch)   GET /v1/files   GET /v1/files/{id}
    GET /v1/files/{id}/content   DELETE /v1/files/{id}
    POST /v1/batches   GET /v1/batches   GET /v1/batches/{id}   POST /v1/batches/{id}/cancel

A batch's input file is JSONL, one request per line ({"custom_id", "method": "POST", "url", "body"}) to
/v1/chat/completions or /v1/completions; every line is checked when the batch is created (a 400 names the first
bad one, its body read as the endpoint reads it). Its results are read as files: `output_file_id` (the answered lines) and `error_file_id` (the failed,
cancelled and expired ones), each line {"id", "custom_id", "response": {"status_code", "request_id", "body"},
"error"}, by input order. Strata's additions go in the body's "strata" object: `webhook_url` and `webhook_secret`
(see SubmitJob); an `Idempotency-Key` header makes a retried create return the same batch.
"""

from __future__ import annotations

from typing import Any

from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import Request as HttpRequest
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from services.common.errors import InvalidArgumentError, NotFoundError
from services.gateway.http import HttpError, http_error, request_bearer, request_client
from services.gateway.jobs.batch_lines import BATCH_ENDPOINTS, batch_items
from services.gateway.jobs.store import Job, JobState, JobStore
from services.gateway.keys import ApiKey
from services.gateway.service import Gateway

OUT, ERR = "file-out-", "file-err-"         # a batch's result files: these prefixes and the batch's id
_STATUS = {JobState.QUEUED: "validating", JobState.IN_PROGRESS: "in_progress", JobState.CANCELLING: "cancelling",
           JobState.COMPLETED: "completed", JobState.CANCELLED: "cancelled", JobState.EXPIRED: "expired"}


def batch_object(j: Job) -> dict[str, Any]:
    final = j.state.final
    ended = int(j.finished) or None
    return {
        "id": j.id, "object": "batch", "endpoint": j.endpoint, "errors": None, "input_file_id": j.input_file_id,
        "completion_window": f"{round((j.expires - j.created) / 3600)}h", "status": _STATUS[j.state],
        "output_file_id": OUT + j.id if final and j.completed else None,
        "error_file_id": ERR + j.id if final and j.failed + j.cancelled + j.expired else None,
        "created_at": int(j.created), "in_progress_at": int(j.started) or None, "expires_at": int(j.expires),
        "finalizing_at": ended, "completed_at": ended if j.state is JobState.COMPLETED else None, "failed_at": None,
        "expired_at": ended if j.state is JobState.EXPIRED else None,
        "cancelling_at": int(j.cancel_requested) or None, "cancelled_at": ended if j.state is JobState.CANCELLED else None,
        "request_counts": {"total": j.total, "completed": j.completed, "failed": j.failed + j.expired},
        "metadata": j.metadata or None}


def _file_object(meta: dict[str, Any]) -> dict[str, Any]:
    return {"id": meta["id"], "object": "file", "bytes": meta["bytes"], "created_at": meta["created_at"],
            "filename": meta["filename"], "purpose": meta["purpose"], "status": "processed"}


def _window_s(value: Any) -> int:
    """OpenAI's completion_window ("24h"; Strata also takes other hours, "1h" to "720h")."""
    if not isinstance(value, str) or not value.endswith("h") or not value[:-1].isdigit() or not 1 <= int(value[:-1]) <= 720:
        raise InvalidArgumentError("'completion_window' must be hours, as \"24h\" (1h to 720h)")
    return int(value[:-1]) * 3600


class BatchRoutes:
    def __init__(self, gateway: Gateway, jobs: JobStore) -> None:
        self.gateway, self.jobs = gateway, jobs

    def routes(self) -> list[Route]:
        return [Route("/v1/files", self._guard(self.upload), methods=["POST"]),
                Route("/v1/files", self._guard(self.list_files), methods=["GET"]),
                Route("/v1/files/{file_id}", self._guard(self.get_file), methods=["GET"]),
                Route("/v1/files/{file_id}", self._guard(self.delete_file), methods=["DELETE"]),
                Route("/v1/files/{file_id}/content", self._guard(self.content), methods=["GET"]),
                Route("/v1/batches", self._guard(self.create), methods=["POST"]),
                Route("/v1/batches", self._guard(self.list_batches), methods=["GET"]),
                Route("/v1/batches/{batch_id}", self._guard(self.get_batch), methods=["GET"]),
                Route("/v1/batches/{batch_id}/cancel", self._guard(self.cancel), methods=["POST"])]

    def _guard(self, handler):
        """The caller's key checked first; every error as OpenAI's body and status."""
        async def endpoint(http: HttpRequest) -> Response:
            try:
                key = await self.gateway.authenticator.authenticate(request_bearer(http), request_client(http))
                return await handler(http, key)
            except StarletteHTTPException as exc:     # a malformed multipart body
                return HttpError(exc.status_code, "invalid_request_error", str(exc.detail)).response()
            except Exception as exc:  # noqa: BLE001 - answered as OpenAI's error
                return http_error(exc).response()
        return endpoint

    # --- files

    async def upload(self, http: HttpRequest, key: ApiKey) -> Response:
        limit = self.jobs.config.max_file_bytes
        if int(http.headers.get("content-length") or 0) > limit + (1 << 16):
            raise HttpError(413, "invalid_request_error", f"the file is larger than {limit} bytes")
        if not http.headers.get("content-type", "").startswith("multipart/form-data"):
            raise InvalidArgumentError("the body must be multipart/form-data with 'file' and 'purpose'")
        async with http.form(max_files=1, max_fields=4) as form:
            purpose, upload = form.get("purpose"), form.get("file")
            if purpose != "batch":
                raise InvalidArgumentError("'purpose' must be \"batch\" (the only files this gateway keeps)")
            if upload is None or isinstance(upload, str):
                raise InvalidArgumentError("'file' must be a file")
            content = await upload.read(limit + 1)
            meta = await self.jobs.put_file(key.key_id, upload.filename or "upload.jsonl", content, purpose)
        return JSONResponse(_file_object(meta))

    async def list_files(self, http: HttpRequest, key: ApiKey) -> Response:
        files = await self.jobs.files(key.key_id)
        return JSONResponse({"object": "list", "data": [_file_object(m) for m in files], "has_more": False})

    async def get_file(self, http: HttpRequest, key: ApiKey) -> Response:
        file_id = http.path_params["file_id"]
        if file_id.startswith((OUT, ERR)):
            job, lines = await self._result_file(key, file_id)
            return JSONResponse({"id": file_id, "object": "file", "bytes": sum(len(x) + 1 for x in lines),
                                 "created_at": int(job.finished), "filename": f"{file_id}.jsonl",
                                 "purpose": "batch_output", "status": "processed"})
        return JSONResponse(_file_object((await self.jobs.file(key.key_id, file_id))[0]))

    async def content(self, http: HttpRequest, key: ApiKey) -> Response:
        file_id = http.path_params["file_id"]
        if file_id.startswith((OUT, ERR)):
            _, lines = await self._result_file(key, file_id)
            data = b"".join(x + b"\n" for x in lines)
        else:
            _, data = await self.jobs.file(key.key_id, file_id, content=True)
        return Response(data, media_type="application/jsonl")

    async def delete_file(self, http: HttpRequest, key: ApiKey) -> Response:
        file_id = http.path_params["file_id"]
        await self.jobs.delete_file(key.key_id, file_id)
        return JSONResponse({"id": file_id, "object": "file", "deleted": True})

    async def _result_file(self, key: ApiKey, file_id: str) -> tuple[Job, list[bytes]]:
        """A batch's output (answered) or error lines, by input order; NotFoundError until the batch has ended."""
        ok = file_id.startswith(OUT)
        job = await self.jobs.get(key.key_id, file_id[len(OUT if ok else ERR):])
        if job.format != "openai" or not job.state.final:
            raise NotFoundError(f"no file {file_id!r} for this API key")
        flag = b"1" if ok else b"0"
        return job, [v[1:] for _, v in await self.jobs.all_results(job) if v[:1] == flag]

    # --- batches

    async def create(self, http: HttpRequest, key: ApiKey) -> Response:
        try:
            body = await http.json()
        except ValueError:
            raise InvalidArgumentError("the body is not JSON") from None
        if not isinstance(body, dict):
            raise InvalidArgumentError("the body must be a JSON object")
        unknown = sorted(set(body) - {"input_file_id", "endpoint", "completion_window", "metadata", "strata"})
        if unknown:
            raise HttpError(400, "invalid_request_error", f"unknown field {unknown[0]!r}", unknown[0])
        endpoint = body.get("endpoint")
        if endpoint not in BATCH_ENDPOINTS:
            raise InvalidArgumentError(f"'endpoint' must be one of {', '.join(BATCH_ENDPOINTS)}")
        window = _window_s(body.get("completion_window", "24h"))
        metadata = body.get("metadata") or {}
        strata = body.get("strata") or {}
        if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
            raise InvalidArgumentError("'metadata' must be an object of strings")
        if (not isinstance(strata, dict) or set(strata) - {"webhook_url", "webhook_secret"}
                or not all(isinstance(v, str) for v in strata.values())):
            raise InvalidArgumentError("'strata' takes webhook_url and webhook_secret, both strings")
        file_id = body.get("input_file_id")
        if not isinstance(file_id, str):
            raise InvalidArgumentError("'input_file_id' must be a file id")
        _, data = await self.jobs.file(key.key_id, file_id, content=True)
        items = batch_items(data, endpoint, file_id)
        job, secret = await self.jobs.submit(
            key.key_id, key.tenant, items, "openai", idempotency_key=http.headers.get("idempotency-key", ""),
            webhook_url=strata.get("webhook_url", ""), webhook_secret=strata.get("webhook_secret", ""),
            window_s=window, metadata=metadata, endpoint=endpoint, input_file_id=file_id)
        out = batch_object(job)
        if secret:
            out["strata"] = {"webhook_secret": secret}
        return JSONResponse(out)

    async def get_batch(self, http: HttpRequest, key: ApiKey) -> Response:
        return JSONResponse(batch_object(await self._batch(key, http.path_params["batch_id"])))

    async def cancel(self, http: HttpRequest, key: ApiKey) -> Response:
        job = await self._batch(key, http.path_params["batch_id"])
        return JSONResponse(batch_object(await self.jobs.cancel(key.key_id, job.id)))

    async def list_batches(self, http: HttpRequest, key: ApiKey) -> Response:
        try:
            limit = int(http.query_params.get("limit", "20"))
        except ValueError:
            raise InvalidArgumentError("'limit' must be an integer") from None
        jobs, more = await self.jobs.list(key.key_id, limit, http.query_params.get("after", ""), fmt="openai")
        data = [batch_object(j) for j in jobs]
        return JSONResponse({"object": "list", "data": data, "first_id": data[0]["id"] if data else None,
                             "last_id": data[-1]["id"] if data else None, "has_more": more})

    async def _batch(self, key: ApiKey, batch_id: str) -> Job:
        job = await self.jobs.get(key.key_id, batch_id)
        if job.format != "openai":
            raise NotFoundError(f"no batch {batch_id!r} for this API key (a gRPC job: GetJob reads it)")
        return job

