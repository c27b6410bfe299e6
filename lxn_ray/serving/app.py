"""The endpoint's HTTP API (:func:`create_api`): the FastAPI app a replica serves, its routes, its
OpenAPI document and its JSON errors.

``POST /predict``, ``POST /predict/batch``, ``POST /explain`` and ``GET /model`` declare the API key check
as a FastAPI dependency (:func:`create_api`'s ``authorised``), so it runs before the route reads a byte of
the body; ``GET /healthz``, the page at ``/`` and the OpenAPI docs at ``/docs`` stay open. The routes hold
no state: they reach the replica serving them (:class:`lxn_ray.serving.serve.LxnServer`) through Serve's
replica context. (No ``from __future__ import annotations`` here: FastAPI resolves route annotations at
runtime, and the routes are built inside :func:`create_api`.)
"""

import asyncio
import functools
from typing import Annotated, Any

from lxn_ray.serving.model import RESEARCH_NOTE
from lxn_ray.serving.uploads import InputError, read_images

# The types /docs offers for a raw body; any other label is accepted too, and ignored (judged by bytes).
RAW_IMAGE_TYPES = ("image/png", "image/jpeg", "application/dicom")
DOCS_ASSETS = "/static/docs"  # where the app serves Swagger UI's and ReDoc's own files


def _binary(description: str) -> dict[str, Any]:
    return {"type": "string", "format": "binary", "description": description}


def _image_body(many: bool) -> dict[str, Any]:
    """OpenAPI request body for /docs: our routes read the raw request, so FastAPI cannot infer it."""
    film = "PNG, JPEG or DICOM (told by its bytes)"
    multipart = (
        {"type": "object", "properties": {"files": {"type": "array", "items": _binary(film)}}}
        if many
        else {"type": "object", "properties": {"file": _binary(film)}, "required": ["file"]}
    )
    content: dict[str, Any] = {"multipart/form-data": {"schema": multipart}}
    if not many:
        content.update({kind: {"schema": _binary(film)} for kind in RAW_IMAGE_TYPES})
    return {"requestBody": {"required": True, "content": content}}


class CountRequests:
    """ASGI middleware: after each HTTP request, ``count(route, status)`` with the path of the route that
    answered it (None when no route matched) and the response's status code (500 when none was sent).
    Plain ASGI rather than Starlette's BaseHTTPMiddleware, so request bodies still stream to the routes."""

    def __init__(self, app, count) -> None:
        self.app, self.count = app, count

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500

        async def sending(message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, sending)
        finally:
            # FastAPI puts the matched route in the request's scope (the same dict passed down the stack)
            self.count(getattr(scope.get("route"), "path", None), status)


@functools.cache
def page_html() -> str:
    """The page at ``/`` (``lxn_ray/serving/static/index.html``): plain HTML and a little JavaScript."""
    from importlib.resources import files

    return files("lxn_ray.serving").joinpath("static", "index.html").read_text(encoding="utf-8")


def create_api():
    """The FastAPI app, built on each replica after its constructor (``serve.ingress`` builder form).

    Returns a ``fastapi.FastAPI`` (``fastapi_offline.FastAPIOffline``). Every error it answers is JSON
    ``{"error": "..."}``; a refused API key is 401 with ``WWW-Authenticate: Bearer``."""
    from fastapi import Depends, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import HTMLResponse, JSONResponse, Response
    from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
    from fastapi_offline import FastAPIOffline
    from pydantic import BaseModel
    from ray import serve
    from starlette.exceptions import HTTPException

    from lxn_ray import __version__

    class Prediction(BaseModel):
        probability: float  # calibrated on the model's validation split (Platt scaling)
        calibrated: bool  # false only for a model whose card predates calibration
        label: str
        threshold: float
        model_version: str | None
        task: str
        no_better_than_chance: bool  # the model's test AUC interval includes 0.5 (or it has none)
        warning: str | None  # a sentence saying so when no_better_than_chance, else null

    class Error(BaseModel):
        error: str

    errors = {status: {"model": Error} for status in (400, 401, 413, 415, 422, 500)}
    # FastAPIOffline: FastAPI whose /docs and /redoc load Swagger UI and ReDoc from files this app serves
    # (under the route prefix), not from a CDN - a hospital network may have no internet.
    app = FastAPIOffline(
        title="LxN COVID-19 chest X-ray classifier",
        version=__version__,
        static_url=DOCS_ASSETS,
        description=(
            f"**{RESEARCH_NOTE}.** P(COVID-19) for a frontal chest radiograph (PNG, JPEG or DICOM - told "
            "by its bytes -, at most 20 MB and 50 megapixels) from LxN, calibrated by Platt scaling, "
            "with the decision threshold chosen on the model's validation split. Prediction, explanation and "
            'model routes need `Authorization: Bearer KEY`. Errors are JSON `{"error": "..."}`.'
        ),
    )
    # Declares the Bearer scheme in the OpenAPI document (the Authorize button of /docs). auto_error=False:
    # the replica judges the key itself, so a missing key is the endpoint's JSON 401, not FastAPI's.
    bearer = HTTPBearer(auto_error=False, description="an API key from jobs/serve.py --mint-key")

    def server():
        """The :class:`lxn_ray.serving.serve.LxnServer` of the replica serving this request."""
        return serve.get_replica_context().servable_object

    async def authorised(
        request: Request, _: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]
    ) -> None:
        """The protected routes' dependency: raises InputError (401) without a known API key."""
        server().authorise(request)

    protected = [Depends(authorised)]
    app.add_middleware(CountRequests, count=lambda route, status: server().count_request(route, status))

    async def images(request: Request, many: bool) -> list[tuple[str, bytes]]:
        settings = server().settings
        return await read_images(request, many, settings.max_body_bytes, settings.max_batch_images)

    @app.exception_handler(InputError)
    async def refused(request: Request, error: InputError) -> JSONResponse:
        return server().refuse(error)  # raised by a dependency (401); routes answer theirs in replica.answer

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, error: HTTPException) -> JSONResponse:
        return JSONResponse({"error": str(error.detail)}, status_code=error.status_code)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, error: RequestValidationError) -> JSONResponse:
        return JSONResponse({"error": str(error.errors())[:500]}, status_code=422)

    @app.post(
        "/predict",
        response_model=Prediction,
        responses=errors,
        openapi_extra=_image_body(many=False),
        dependencies=protected,
    )
    async def predict(request: Request):
        """Classify one radiograph (raw image body or multipart field `file`)."""
        replica = server()

        async def work():
            ((name, data),) = await images(request, many=False)
            answer = await replica.predict_bytes(data)
            return JSONResponse(answer, headers={"X-Model-Version": str(answer["model_version"])})

        return await replica.answer(work)

    @app.post(
        "/predict/batch",
        response_model=list[Prediction],
        responses=errors,
        openapi_extra=_image_body(many=True),
        dependencies=protected,
    )
    async def predict_batch(request: Request):
        """Classify several radiographs (multipart fields `files`); answers in the order sent.
        One bad image refuses the whole request, naming it."""
        replica = server()

        async def work():
            sent = await images(request, many=True)
            answers = await asyncio.gather(*(replica.predict_bytes(data, name) for name, data in sent))
            return JSONResponse(list(answers))

        return await replica.answer(work)

    @app.post(
        "/explain",
        response_class=Response,
        responses={200: {"content": {"image/png": {}}}, **errors},
        openapi_extra=_image_body(many=False),
        dependencies=protected,
    )
    async def explain(request: Request):
        """Grad-CAM heat map of the COVID-19 score over the radiograph, as a PNG."""
        replica = server()

        async def work():
            ((name, data),) = await images(request, many=False)
            png, answer, layout = await asyncio.to_thread(replica.explain_bytes, data)
            headers = {
                "X-Model-Version": str(answer["model_version"]),
                "X-Probability": f"{answer['probability']:.6f}",
                "X-Calibrated": "true" if answer["calibrated"] else "false",
                "X-Label": answer["label"],
                "X-Threshold": f"{answer['threshold']:.6f}",
                "X-No-Better-Than-Chance": "true" if answer["no_better_than_chance"] else "false",
                # where the film is in the picture (x, y, width, height): below the caption, left of the
                # colour bar
                "X-Film-Box": f"0,{layout.caption_height},{layout.film[0]},{layout.film[1]}",
            }
            return Response(png, media_type="image/png", headers=headers)

        return await replica.answer(work)

    @app.get("/healthz")
    async def healthz():
        """200 once this replica has a model loaded."""
        model = server().current
        if model is None:
            return JSONResponse({"error": "no model loaded"}, status_code=503)
        return {"status": "ok", "model_version": model.version}

    @app.get("/model", responses=errors, dependencies=protected)
    async def model_card():
        """The loaded model's card, threshold and input size, and whether it follows the champion."""
        replica = server()

        async def work():
            return replica.describe()

        return await replica.answer(work)

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page():
        """A page to try a film: pick or drop one, see the probability, the label and the Grad-CAM."""
        return HTMLResponse(page_html())

    return app
