"""The LxN endpoint on Ray Serve: one FastAPI ingress deployment, batched inference, hot model reload.

``POST /predict`` (one film - PNG, JPEG or DICOM - as the raw body or multipart field ``file``),
``POST /predict/batch`` (multipart, fields ``files`` or ``file``, answers in order), ``POST /explain``
(Grad-CAM overlay PNG), ``GET /model`` (the model card) - each behind an API key (``Authorization: Bearer
KEY``, :mod:`lxn_ray.serving.auth`) - and, open, ``GET /healthz`` for probes, the page at ``/`` to try a
film, and
the OpenAPI docs at ``/docs``. Research use only - not a diagnostic device.

Why it is built this way:

- **One preprocessing path.** Every image goes through :func:`lxn_ray.images.preprocess.preprocess_bytes` at
  the side the loaded model was built for (its input shape), so serving sees the pixels evaluation saw.
- **Batching.** Requests are decoded concurrently in threads, then their arrays meet in ``@serve.batch``
  so one traced forward pass serves many requests; the forward pass runs off the event loop, which keeps
  accepting requests (and filling the next batch) meanwhile.
- **Hot reload without dropping a request.** When serving ``champion``, each replica polls the registry's
  champion pointer every ``poll_seconds``. A new champion is loaded, traced and warmed in a thread, then
  the replica's model reference is replaced in one assignment. A batch holds the reference it started
  with, and every answer names the ``model_version`` that computed it. Polling needs no coordinator and
  works the same under ``python jobs/serve.py`` and ``serve deploy``. A pinned version never moves.
- **Uploads are judged by their bytes.** Clients label files every which way (``image/jpg``,
  ``application/octet-stream``, no type, a part carrying the outer ``multipart/form-data``), so declared
  types are ignored: the magic number says PNG, JPEG or DICOM, and only bytes that are none of them get
  415.
- **Hostile input is a 4xx, never a crash.** The API key is checked first (401), then the declared
  Content-Length (413) before reading, and the body is capped while it streams in (chunked uploads, 413).
  Decoding uses :mod:`lxn_ray.images.decode`'s guards (50-megapixel cap checked from the header: 413; empty,
  truncated or corrupt bytes: 400; a DICOM object that is not a chest film: 422). Every error body is
  ``{"error": "..."}`` and counted by reason.
- **Safe loading.** Models load with Keras safe mode through :meth:`lxn_ray.registry.ModelRef.load`;
  nothing from a request or the store is ever unpickled or evaluated.

Importing this module imports neither Ray, TensorFlow nor FastAPI; replicas and the deploy path import
them where they are used. (No ``from __future__ import annotations`` here: FastAPI resolves route
annotations at runtime, and the routes are built inside :func:`create_api`.)
"""

import asyncio
import dataclasses
import email.message
import functools
import logging
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from lxn_ray import registry
from lxn_ray.evaluation.metrics import no_better_than_chance
from lxn_ray.images.decode import NOT_AN_IMAGE, ImageRejected, image_format
from lxn_ray.infra.storage import Storage
from lxn_ray.serving import auth
from lxn_ray.serving.settings import ServeSettings

logger = logging.getLogger("ray.serve")

RESEARCH_NOTE = "research use only - not a diagnostic device"
POSITIVE_LABEL = "COVID-19"
NEGATIVE_LABEL = "negative"
# The types /docs offers for a raw body; any other label is accepted too, and ignored (judged by bytes).
RAW_IMAGE_TYPES = ("image/png", "image/jpeg", "application/dicom")
MULTIPART_TYPE = "multipart/form-data"
SINGLE_FIELD = "file"
DOCS_ASSETS = "/static/docs"  # where the app serves Swagger UI's and ReDoc's own files
BATCH_FIELDS = ("files", "file")


# -- the loaded model ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class LoadedModel:
    """A model ready to answer: traced forward pass, Grad-CAM, and what a response reports about it."""

    version: str | None
    card: dict[str, Any]
    threshold: float
    image_size: int
    preprocessing: Any  # lxn_ray.images.preprocess.PreprocessConfig, the card's: as trained and validated
    forward: Callable[[np.ndarray], np.ndarray]  # (n, s, s, 3) float32 -> (n,) probabilities
    explainer: Any  # lxn_ray.model.gradcam.GradCam, built once here rather than per request
    loaded_at: str = field(default_factory=lambda: datetime.now(timezone.utc).isoformat(timespec="seconds"))

    def prediction(self, probability: float) -> dict[str, Any]:
        return {
            "probability": probability,
            "label": label_for(probability, self.threshold, self.card.get("label_names")),
            "threshold": self.threshold,
            "model_version": self.version,
            "task": registry.card_task_name(self.card),
        }


def label_for(probability: float, threshold: float, names: dict[str, str] | None = None) -> str:
    """The same rule as evaluation (``probability >= threshold`` is positive), in the model's task's label
    names (``label_names`` of its card; a card made before tasks existed is covid-vs-rest)."""
    names = names or {"1": POSITIVE_LABEL, "0": NEGATIVE_LABEL}
    return names["1"] if probability >= threshold else names["0"]


def load_model_version(storage: Storage, reference: str, task: str | None = None) -> LoadedModel:
    """Resolve, load (safe mode), trace and warm one model. Blocking: call it off the event loop.

    Raises ValueError when ``task`` is given and the model was trained for another (a card made before
    tasks existed is covid-vs-rest)."""
    import tensorflow as tf

    from lxn_ray.evaluation import predict
    from lxn_ray.model.gradcam import GradCam

    loaded = predict.load(storage, reference, task)
    model, size = loaded.model, loaded.image_size

    # One traced graph for any batch size (the batch dimension is left open), so batches of 1..max never
    # retrace; called from one batch at a time.
    @tf.function(input_signature=[tf.TensorSpec([None, size, size, 3], tf.float32)])
    def graph(images):
        return tf.reshape(tf.cast(model(images, training=False), tf.float32), [-1])

    def forward(images: np.ndarray) -> np.ndarray:
        return np.asarray(graph(tf.convert_to_tensor(images, dtype=tf.float32)))

    explainer = GradCam(model)
    warm = np.zeros((1, size, size, 3), dtype=np.float32)
    forward(warm)  # trace now, not in the first request
    explainer(warm[0])
    return LoadedModel(
        version=loaded.version,
        card=loaded.card,
        threshold=loaded.threshold,
        image_size=size,
        preprocessing=loaded.preprocessing,
        forward=forward,
        explainer=explainer,
    )


# -- input handling -----------------------------------------------------------------------------------
class InputError(Exception):
    """A request the endpoint refuses: HTTP status, a short reason for the metrics, a message for people."""

    def __init__(self, status: int, reason: str, message: str) -> None:
        super().__init__(message)
        self.status, self.reason, self.message = status, reason, message


def media_type(content_type: str | None) -> str:
    return (content_type or "").split(";", 1)[0].strip().lower()


def rejected_image(error: ImageRejected, where: str = "") -> InputError:
    """Map :class:`ImageRejected` to a status: too many pixels or bytes 413, bytes that are no image format
    415, a DICOM object that is not a chest film 422 (its reason), anything else 400."""
    from lxn_ray.images.dicom import UnsupportedDicom

    message = str(error)
    prefix = f"{where}: " if where else ""
    if isinstance(error, UnsupportedDicom):
        return InputError(422, error.reason, prefix + message)
    if "pixel cap" in message or "decompression bomb" in message:
        return InputError(413, "too_many_pixels", prefix + message)
    if "byte cap" in message:
        return InputError(413, "too_large", prefix + message)
    if message == "empty file":
        return InputError(400, "empty", prefix + message)
    if message == NOT_AN_IMAGE:
        return InputError(415, "unsupported_media_type", prefix + message)
    return InputError(400, "corrupt_image", prefix + message)


@dataclass(frozen=True)
class Part:
    """One part of a multipart/form-data body."""

    name: str | None
    filename: str | None
    content_type: str | None
    data: bytes


def parse_multipart(body: bytes, content_type: str) -> list[Part]:
    """A small RFC 7578 parser (stdlib only, so no python-multipart dependency); parts in body order.

    Only what uploads need: a boundary, per-part headers, and bytes taken verbatim (no transfer encodings).
    """
    header = email.message.Message()
    header["content-type"] = content_type
    boundary = header.get_param("boundary")
    if not isinstance(boundary, str) or not boundary or len(boundary) > 200:
        raise InputError(400, "malformed_multipart", "multipart body without a valid boundary parameter")
    delimiter = b"\r\n--" + boundary.encode("latin-1")
    sections = (b"\r\n" + body).split(delimiter)
    if len(sections) < 2:
        raise InputError(400, "malformed_multipart", "multipart body has no parts")
    parts: list[Part] = []
    for section in sections[1:]:
        if section.startswith(b"--"):  # the close delimiter: the rest is epilogue
            return parts
        head, separator, data = section.partition(b"\r\n\r\n")
        if not separator:
            raise InputError(400, "malformed_multipart", "multipart part without a header block")
        headers = email.message.Message()
        for line in head.split(b"\r\n")[1:]:  # the first line is the delimiter line's padding
            name, colon, value = line.decode("latin-1").partition(":")
            if colon:
                headers[name.strip()] = value.strip()
        disposition = headers.get("content-disposition")
        part_name = filename = None
        if disposition:
            holder = email.message.Message()
            holder["content-disposition"] = disposition
            part_name = holder.get_param("name", header="content-disposition")
            filename = holder.get_param("filename", header="content-disposition")
        parts.append(
            Part(
                name=part_name if isinstance(part_name, str) else None,
                filename=filename if isinstance(filename, str) else None,
                content_type=headers.get("content-type"),
                data=data,
            )
        )
    raise InputError(400, "malformed_multipart", "multipart body is truncated (no closing boundary)")


async def read_body(request, limit: int) -> bytes:
    """The request body, refused with 413 past ``limit``: by Content-Length before reading, and while
    reading (a chunked upload declares no length)."""
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            length = int(declared)
        except ValueError:
            raise InputError(400, "bad_content_length", f"invalid Content-Length {declared!r}") from None
        if length > limit:
            raise InputError(413, "too_large", f"body is {length} bytes, over the {limit}-byte limit")
    chunks, total = [], 0
    async for chunk in request.stream():
        total += len(chunk)
        if total > limit:
            raise InputError(413, "too_large", f"body is over the {limit}-byte limit")
        chunks.append(chunk)
    return b"".join(chunks)


@dataclass(frozen=True)
class _Item:
    """One image waiting for a batch: its bytes (to redo preprocessing if the model changed meanwhile)
    and the model version it was preprocessed for."""

    data: bytes
    image: np.ndarray
    prepared_for: LoadedModel


# -- the replica --------------------------------------------------------------------------------------
class LxnServer:
    """One replica's state and request logic; :func:`create_api` routes HTTP to it.

    Not a Ray or FastAPI class itself, so importing this module stays cheap; :func:`build_app` wraps it
    with ``serve.ingress`` and ``serve.deployment``.
    """

    def __init__(self, settings: ServeSettings) -> None:
        from ray import serve
        from ray.serve.metrics import Counter

        self.settings = settings
        self.storage = Storage.open(settings.storage)
        self.limits = settings.image_limits
        self.following = settings.model == "champion"
        # once, at start-up
        self.current: LoadedModel = load_model_version(self.storage, settings.model, settings.task)
        self._failed_version: str | None = None
        self.keys = self._load_keys()
        self._predictions = Counter(
            "lxn_predictions",
            description="Images classified, by predicted label and model version.",
            tag_keys=("label", "model_version"),
        )
        self._rejections = Counter(
            "lxn_rejected_inputs",
            description="Requests refused, by reason and HTTP status.",
            tag_keys=("reason", "status"),
        )
        self._reloads = Counter(
            "lxn_model_reloads",
            description="Champion changes this replica moved to, by new model version.",
            tag_keys=("model_version",),
        )
        self._batched = serve.batch(
            max_batch_size=settings.max_batch_size, batch_wait_timeout_s=settings.batch_wait_timeout_s
        )(self._forward_batch)
        self._poller: asyncio.Task | None = None
        try:
            loop = asyncio.get_running_loop()  # Serve runs constructors on the replica's event loop
        except RuntimeError:
            loop = None
        if loop is not None:
            self._poller = loop.create_task(self._poll())
        logger.info(
            "lxn: serving model %s (%s); auth %s, %d keys",
            self.current.version,
            settings.model,
            "on" if settings.auth else "OFF",
            len(self.keys),
        )

    def __del__(self) -> None:
        poller = getattr(self, "_poller", None)
        if poller is not None:
            poller.cancel()

    def check_health(self) -> None:
        """Serve's health check: a replica without a model is unhealthy (and replaced)."""
        if self.current is None:
            raise RuntimeError("no model loaded")

    # -- hot reload: the champion and the API keys --------------------------------------------------
    def _load_keys(self) -> auth.KeyRing:
        return auth.KeyRing.load(self.storage, dict.fromkeys(self.settings.api_key_digests, auth.ENV_KEYS))

    async def _poll(self) -> None:
        """Every ``poll_seconds``: re-read the key file (minted and revoked keys apply without a restart),
        then, when following, the champion pointer."""
        while True:
            await asyncio.sleep(self.settings.poll_seconds)
            try:
                if self.settings.auth:
                    self.keys = await asyncio.to_thread(self._load_keys)
                if self.following:
                    await self.reload_if_changed()
            except asyncio.CancelledError:
                raise
            except Exception:  # a broken store or model must not stop the replica from answering
                logger.exception("lxn: poll failed; still serving %s", self.current.version)

    async def reload_if_changed(self) -> bool:
        """Load the champion when it moved; the swap is one reference assignment after a full load."""
        version = await asyncio.to_thread(registry.champion, self.storage)
        if version is None or version in (self.current.version, self._failed_version):
            return False
        try:
            loaded = await asyncio.to_thread(load_model_version, self.storage, version, self.settings.task)
        except Exception:
            self._failed_version = version  # retried when the pointer moves again, not every poll
            raise
        previous, self.current = self.current.version, loaded
        self._failed_version = None
        self._reloads.inc(tags={"model_version": str(loaded.version)})
        logger.info("lxn: champion moved from %s to %s", previous, loaded.version)
        return True

    # -- inference ----------------------------------------------------------------------------------
    def _preprocess(self, data: bytes, model: LoadedModel) -> np.ndarray:
        """The model's own preprocessing (its card's input size and settings), as in its validation."""
        from lxn_ray.images.preprocess import preprocess_bytes

        return preprocess_bytes(data, model.image_size, self.limits, preprocessing=model.preprocessing)

    async def _forward_batch(self, items: list[_Item]) -> list[tuple[float, LoadedModel]]:
        """``@serve.batch`` target: one forward pass for every waiting image, with the model it used."""
        model = self.current

        def run() -> np.ndarray:
            arrays = [
                item.image
                if item.prepared_for is model
                # preprocessed for a model swapped out meanwhile (another input size or preprocessing)
                else self._preprocess(item.data, model)
                for item in items
            ]
            return model.forward(np.stack(arrays))

        probabilities = await asyncio.to_thread(run)
        return [(float(p), model) for p in probabilities]

    async def predict_bytes(self, data: bytes, where: str = "") -> dict[str, Any]:
        """Decode and preprocess in a thread, then join a batch; raises InputError for bad bytes."""
        try:
            model = self.current
            image = await asyncio.to_thread(self._preprocess, data, model)
        except ImageRejected as error:
            raise rejected_image(error, where) from None
        probability, model = await self._batched(_Item(data, image, model))
        answer = model.prediction(probability)
        self._predictions.inc(tags={"label": answer["label"], "model_version": str(model.version)})
        return answer

    def explain_bytes(self, data: bytes) -> tuple[bytes, dict[str, Any], Any]:
        """Grad-CAM overlay PNG, the prediction it shows and the overlay's
        :class:`lxn_ray.model.gradcam.OverlayLayout`. Blocking (run in a thread)."""
        from lxn_ray.images.preprocess import preprocess_for_explanation
        from lxn_ray.model.gradcam import overlay_layout, render_overlay

        model = self.current
        try:
            # The overlay covers what the model saw: the film after its border trimming, if it trims.
            image, radiograph = preprocess_for_explanation(
                data, model.image_size, self.limits, model.preprocessing
            )
        except ImageRejected as error:
            raise rejected_image(error) from None
        explanation = model.explainer(image)
        answer = model.prediction(explanation.probability)
        positive = (model.card.get("label_names") or {}).get("1", POSITIVE_LABEL)
        caption = (
            f"P({positive}) {answer['probability']:.3f}, threshold {answer['threshold']:.3f}: "
            f"{answer['label']}\nmodel {answer['model_version']} - {RESEARCH_NOTE}"
        )
        layout = overlay_layout(radiograph.size, caption)
        return render_overlay(radiograph, explanation.heatmap, caption, layout=layout), answer, layout

    def describe(self) -> dict[str, Any]:
        """What ``GET /model`` shows: the loaded model's card and how this replica serves it."""
        model = self.current
        return {
            "model_version": model.version,
            "serving": "champion" if self.following else "pinned",
            "image_size": model.image_size,
            "threshold": model.threshold,
            "loaded_at": model.loaded_at,
            "intended_use": RESEARCH_NOTE,
            "no_better_than_chance": no_better_than_chance(model.card.get("test", {}).get("auc_ci")),
            "card": model.card,
        }

    # -- HTTP ---------------------------------------------------------------------------------------
    def authorise(self, request) -> None:
        """Refuse (401) a request without a known API key, unless auth is off (``--no-auth``)."""
        if self.settings.auth and self.keys.name_of(request.headers.get("authorization")) is None:
            reason = "no API key is configured yet" if not len(self.keys) else "missing or unknown API key"
            raise InputError(
                401,
                "unauthorised",
                f"{reason}: send 'Authorization: Bearer KEY' (mint a key: python jobs/serve.py "
                "--storage URI --mint-key NAME)",
            )

    async def read_images(self, request, many: bool) -> list[tuple[str, bytes]]:
        """``(name, bytes)`` of the request's images; raw bodies are one image, multipart may be several.

        A multipart/form-data request is parsed into parts; any other body is one image, whatever its
        Content-Type says. Each image's type is then judged by its magic number (415 when it is not PNG,
        JPEG or DICOM); declared types, the request's or a part's, are ignored."""
        content_type = request.headers.get("content-type")
        body = await read_body(request, self.settings.max_body_bytes)
        if not body:
            raise InputError(400, "empty", "empty body")
        if media_type(content_type) != MULTIPART_TYPE:
            return [_judged("body", body)]
        fields = BATCH_FIELDS if many else (SINGLE_FIELD,)
        parts = [part for part in parse_multipart(body, content_type or "") if part.name in fields]
        if not parts:
            raise InputError(400, "missing_file", f"multipart body has no {' or '.join(fields)} field")
        if not many and len(parts) > 1:
            raise InputError(400, "too_many_images", "one image per /predict; use /predict/batch for several")
        if len(parts) > self.settings.max_batch_images:
            raise InputError(
                413, "too_many_images", f"{len(parts)} images, over {self.settings.max_batch_images}"
            )
        images = []
        for index, part in enumerate(parts):
            name = f"image {index} ({part.filename or part.name})"
            if not part.data:
                raise InputError(400, "empty", f"{name}: empty file")
            images.append(_judged(name, part.data))
        return images

    async def answer(self, work: Callable[[], Awaitable[Any]]):
        """Run a route's work; InputError becomes its JSON error, anything else a counted 500."""
        from fastapi.responses import JSONResponse

        try:
            return await work()
        except InputError as error:
            return self.refuse(error)
        except Exception as error:
            logger.exception("lxn: request failed")
            self._rejections.inc(tags={"reason": "internal", "status": "500"})
            return JSONResponse({"error": f"internal error: {type(error).__name__}"}, status_code=500)

    def refuse(self, error: InputError):
        from fastapi.responses import JSONResponse

        self._rejections.inc(tags={"reason": error.reason, "status": str(error.status)})
        headers = {"WWW-Authenticate": "Bearer"} if error.status == 401 else None
        return JSONResponse({"error": error.message}, status_code=error.status, headers=headers)


def _judged(name: str, data: bytes) -> tuple[str, bytes]:
    """``(name, data)`` when the bytes are PNG, JPEG or DICOM by their magic number; else 415."""
    if image_format(data) is None:
        raise InputError(
            415,
            "unsupported_media_type",
            ("" if name == "body" else f"{name}: ") + f"{NOT_AN_IMAGE} (judged by its bytes, not its label)",
        )
    return name, data


# -- the HTTP API -------------------------------------------------------------------------------------
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


@functools.cache
def page_html() -> str:
    """The page at ``/`` (``lxn_ray/serving/static/index.html``): plain HTML and a little JavaScript."""
    from importlib.resources import files

    return files("lxn_ray.serving").joinpath("static", "index.html").read_text(encoding="utf-8")


def create_api():
    """The FastAPI app, built on each replica after its constructor (``serve.ingress`` builder form)."""
    from fastapi import Depends, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import HTMLResponse, JSONResponse, Response
    from fastapi.security import HTTPBearer
    from fastapi_offline import FastAPIOffline
    from pydantic import BaseModel
    from ray import serve
    from starlette.exceptions import HTTPException

    from lxn_ray import __version__

    class Prediction(BaseModel):
        probability: float
        label: str
        threshold: float
        model_version: str | None

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
            "by its bytes -, at most 20 MB and 50 megapixels) from LxN, with the decision threshold chosen "
            "on the model's validation split. Prediction, explanation and model routes need "
            '`Authorization: Bearer KEY`. Errors are JSON `{"error": "..."}`.'
        ),
    )
    # Declares the Bearer scheme in the OpenAPI document (the Authorize button of /docs); the replica
    # checks the key itself, so a missing key is the endpoint's JSON 401, not FastAPI's.
    bearer = [Depends(HTTPBearer(auto_error=False, description="an API key from jobs/serve.py --mint-key"))]

    def server() -> LxnServer:
        return serve.get_replica_context().servable_object

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
        dependencies=bearer,
    )
    async def predict(request: Request):
        """Classify one radiograph (raw image body or multipart field `file`)."""
        replica = server()

        async def work():
            replica.authorise(request)
            ((name, data),) = await replica.read_images(request, many=False)
            answer = await replica.predict_bytes(data)
            return JSONResponse(answer, headers={"X-Model-Version": str(answer["model_version"])})

        return await replica.answer(work)

    @app.post(
        "/predict/batch",
        response_model=list[Prediction],
        responses=errors,
        openapi_extra=_image_body(many=True),
        dependencies=bearer,
    )
    async def predict_batch(request: Request):
        """Classify several radiographs (multipart fields `files`); answers in the order sent.
        One bad image refuses the whole request, naming it."""
        replica = server()

        async def work():
            replica.authorise(request)
            images = await replica.read_images(request, many=True)
            answers = await asyncio.gather(*(replica.predict_bytes(data, name) for name, data in images))
            return JSONResponse(list(answers))

        return await replica.answer(work)

    @app.post(
        "/explain",
        response_class=Response,
        responses={200: {"content": {"image/png": {}}}, **errors},
        openapi_extra=_image_body(many=False),
        dependencies=bearer,
    )
    async def explain(request: Request):
        """Grad-CAM heat map of the COVID-19 score over the radiograph, as a PNG."""
        replica = server()

        async def work():
            replica.authorise(request)
            ((name, data),) = await replica.read_images(request, many=False)
            png, answer, layout = await asyncio.to_thread(replica.explain_bytes, data)
            headers = {
                "X-Model-Version": str(answer["model_version"]),
                "X-Probability": f"{answer['probability']:.6f}",
                "X-Label": answer["label"],
                "X-Threshold": f"{answer['threshold']:.6f}",
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

    @app.get("/model", responses=errors, dependencies=bearer)
    async def model_card(request: Request):
        """The loaded model's card, threshold and input size, and whether it follows the champion."""
        replica = server()

        async def work():
            replica.authorise(request)
            return replica.describe()

        return await replica.answer(work)

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page():
        """A page to try a film: pick or drop one, see the probability, the label and the Grad-CAM."""
        return HTMLResponse(page_html())

    return app


# -- deploying ----------------------------------------------------------------------------------------
@functools.cache
def _ingress_class():
    """The replica class wrapped by ``serve.ingress`` once per process (the wrapper is a new class)."""
    from ray import serve

    return serve.ingress(create_api)(LxnServer)


def application(settings: ServeSettings):
    """The Serve application for ``settings`` (bound, not yet running)."""
    from ray import serve

    return serve.deployment(_ingress_class(), **settings.deployment_options()).bind(settings)


def build_app(args: Mapping[str, Any]):
    """Application builder for ``serve deploy`` / ``serve run``: ``import_path:
    lxn_ray.serving.serve:build_app``
    with the config file's ``args`` as :class:`ServeSettings` fields (``storage`` is required)."""
    return application(ServeSettings.from_mapping(dict(args)))


def deploy(settings: ServeSettings) -> dict[str, Any]:
    """Start Serve's HTTP proxy (if needed) and run the application; returns what is being served."""
    from ray import serve

    from lxn_ray.infra import cluster

    cluster.connect()
    serve.start(http_options={"host": settings.host, "port": settings.port})
    handle = serve.run(application(settings), name=settings.app_name, route_prefix=settings.route_prefix)
    described = handle.describe.remote().result(timeout_s=120)
    return {
        "url": settings.url,
        "docs": f"{settings.url}/docs",
        "app_name": settings.app_name,
        "model": settings.model,
        "model_version": described["model_version"],
        "threshold": described["threshold"],
        "image_size": described["image_size"],
        # the report is stored: key digests are replaced by their count
        "settings": {**dataclasses.asdict(settings), "api_key_digests": len(settings.api_key_digests)},
        "note": RESEARCH_NOTE,
    }


def check_model(storage: Storage, reference: str) -> None:
    """Refuse a deployment whose replicas could not load a model, without downloading the model here."""
    if reference == "champion":
        if registry.champion(storage) is None:
            raise FileNotFoundError(f"no champion model in {storage.uri}: train or promote one first")
    elif not (reference.endswith(".keras") and Path(reference).expanduser().is_file()):
        registry.read_card(storage, reference)  # raises for a version that is not published
