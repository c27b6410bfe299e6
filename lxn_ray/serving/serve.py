"""The LxN endpoint on Ray Serve: the replica (:class:`LxnServer`: batched inference, hot model and key
reload, metrics and summaries) and its deployment (:func:`application`, :func:`build_app` for
``serve deploy``, :func:`deploy` for ``jobs/serve.py``). Research use only - not a diagnostic device.

The endpoint's parts, bottom to top: :mod:`~lxn_ray.serving.settings` (what a deployment is given),
:mod:`~lxn_ray.serving.model` (a model version ready to answer), :mod:`~lxn_ray.serving.uploads` (what a
request body may be), :mod:`~lxn_ray.serving.auth` (API keys), this module (a replica) and
:mod:`~lxn_ray.serving.app` (the HTTP routes, built on each replica by ``serve.ingress``).

``POST /predict`` (one film - PNG, JPEG or DICOM - as the raw body or multipart field ``file``),
``POST /predict/batch`` (multipart, fields ``files`` or ``file``, answers in order), ``POST /explain``
(Grad-CAM overlay PNG), ``GET /model`` (the model card) - each behind an API key (``Authorization: Bearer
KEY``, :mod:`lxn_ray.serving.auth`) - and, open, ``GET /healthz`` for probes, the page at ``/`` to try a
film, and the OpenAPI docs at ``/docs``.

Why it is built this way:

- **One preprocessing path.** Every image goes through :func:`lxn_ray.images.preprocess.preprocess_bytes` at
  the side the loaded model was built for (its input shape), so serving sees the pixels evaluation saw.
- **Batching.** Requests' bytes meet in ``@serve.batch``; a batch decodes its films on a thread per CPU the
  replica reserves (decoding releases the GIL), then one traced forward pass scores them all, off the
  event loop, which keeps accepting requests (and filling the next batch) meanwhile. Two batches run at
  once, so one decodes while the other's forward pass runs. Decoding each request on its own and
  batching the arrays made a batch's 20 ms wait run out on the stragglers' decodes, so batches left with
  fewer films: ~8% fewer requests/s at concurrency 32 on 2 cores (benchmarks/RESULTS.md).
- **Hot reload without dropping a request.** When serving ``champion``, each replica polls the registry's
  champion pointer every ``poll_seconds``. A new champion is loaded, traced and warmed in a thread, then
  the replica's model reference is replaced in one assignment. A batch holds the reference it started
  with, and every answer names the ``model_version`` that computed it. Polling needs no coordinator and
  works the same under ``python jobs/serve.py`` and ``serve deploy``. A pinned version never moves.
- **Uploads are judged by their bytes.** Clients label files every which way (``image/jpg``,
  ``application/octet-stream``, no type, a part carrying the outer ``multipart/form-data``), so declared
  types are ignored: the magic number says PNG, JPEG or DICOM, and only bytes that are none of them get
  415 (:mod:`lxn_ray.serving.uploads`).
- **Hostile input is a 4xx, never a crash.** The API key is checked first (401), then the declared
  Content-Length (413) before reading, and the body is capped while it streams in (chunked uploads, 413).
  Decoding uses :mod:`lxn_ray.images.decode`'s guards (50-megapixel cap checked from the header: 413; empty,
  truncated or corrupt bytes: 400; a DICOM object that is not a chest film: 422). Every error body is
  ``{"error": "..."}`` and counted by reason.
- **Monitored, without keeping patients' data.** Each replica exports Prometheus metrics through
  ``ray.serve.metrics`` (requests by route and status, predictions by label, a histogram of the calibrated
  probability, the input statistics) and summarises every film it scores - format, size, mean intensity,
  film fraction, the answer; no image, name or header field - in batch files under storage for the drift
  job (:mod:`lxn_ray.serving.summaries`, :mod:`lxn_ray.serving.drift`), measured on the film decoded once
  for the model.
- **Safe loading.** Models load with Keras safe mode through :meth:`lxn_ray.registry.ModelRef.load`;
  nothing from a request or the store is ever unpickled or evaluated.

Importing this module imports neither Ray, TensorFlow nor FastAPI; replicas and the deploy path import
them where they are used. ``serve_config.yaml`` names :func:`build_app` as
``lxn_ray.serving.serve:build_app``.
"""

import asyncio
import dataclasses
import functools
import logging
import math
from collections.abc import Awaitable, Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from lxn_ray import registry
from lxn_ray.images.decode import ImageRejected
from lxn_ray.infra.storage import Storage
from lxn_ray.serving import auth
from lxn_ray.serving.app import create_api
from lxn_ray.serving.model import POSITIVE_LABEL, RESEARCH_NOTE, LoadedModel, load_model_version
from lxn_ray.serving.settings import ServeSettings
from lxn_ray.serving.summaries import FilmStatistics, SummaryWriter, statistics_of, summary_row
from lxn_ray.serving.uploads import InputError, rejected_image

logger = logging.getLogger("ray.serve")


# Histogram buckets (upper bounds) of the metrics: the calibrated probability, and the input statistics of
# lxn_ray.serving.summaries.film_statistics (megapixels: width x height / 1e6).
PROBABILITY_BUCKETS = [0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95]
INTENSITY_BUCKETS = [32.0, 64.0, 96.0, 112.0, 128.0, 144.0, 160.0, 192.0, 224.0]
FILM_FRACTION_BUCKETS = [0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99]
MEGAPIXEL_BUCKETS = [0.01, 0.05, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0]
# Request routes counted by name; anything else (unknown paths, static files) is counted as "other".
COUNTED_ROUTES = frozenset({"/predict", "/predict/batch", "/explain", "/model", "/healthz", "/"})


@dataclass(frozen=True)
class _Scored:
    """What a batch answers for one film: its probability, the model that computed it, and the film's
    statistics (None if they could not be measured)."""

    probability: float
    model: LoadedModel
    statistics: FilmStatistics | None


# -- the replica --------------------------------------------------------------------------------------
class LxnServer:
    """One replica's state and request logic; :func:`lxn_ray.serving.app.create_api` routes HTTP to it.

    Not a Ray or FastAPI class itself, so importing this module stays cheap; :func:`build_app` wraps it
    with ``serve.ingress`` and ``serve.deployment``.
    """

    def __init__(self, settings: ServeSettings) -> None:
        from ray import serve
        from ray.serve.metrics import Counter, Histogram

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
        self._requests = Counter(
            "lxn_requests",
            description="HTTP requests answered, by route and status code.",
            tag_keys=("route", "status"),
        )
        self._probability = Histogram(
            "lxn_probability",
            description="The calibrated probability answered for each film scored, by model version.",
            boundaries=PROBABILITY_BUCKETS,
            tag_keys=("model_version",),
        )
        self._formats = Counter(
            "lxn_input_format", description="Films scored, by file format.", tag_keys=("format",)
        )
        self._megapixels = Histogram(
            "lxn_input_megapixels",
            description="Films scored, by decoded size in megapixels.",
            boundaries=MEGAPIXEL_BUCKETS,
        )
        self._intensity = Histogram(
            "lxn_input_mean_intensity",
            description="Films scored, by mean grey level (0-255) of the decoded grayscale film.",
            boundaries=INTENSITY_BUCKETS,
        )
        self._film_fraction = Histogram(
            "lxn_input_film_fraction",
            description="Films scored, by the share of the image left after border trimming.",
            boundaries=FILM_FRACTION_BUCKETS,
        )
        self.summaries = (
            SummaryWriter(
                self.storage, settings.summary_rows, settings.summary_seconds, settings.summary_files
            )
            if settings.summaries
            else None
        )
        self._writes: set[asyncio.Task] = set()  # summary batches being written (kept until done)
        # A batch decodes its films on a thread per CPU the replica reserves (one for 0 or a fraction),
        # then runs one forward pass; two batches at once, so that one decodes while the other's forward
        # pass runs.
        self._decoders = ThreadPoolExecutor(
            max_workers=max(1, math.ceil(settings.cpus_per_replica)), thread_name_prefix="decode"
        )
        self._batched = serve.batch(
            max_batch_size=settings.max_batch_size,
            batch_wait_timeout_s=settings.batch_wait_timeout_s,
            # two where the replica takes two batches' requests at once (Serve warns otherwise)
            max_concurrent_batches=max(1, min(2, settings.max_ongoing_requests // settings.max_batch_size)),
        )(self._score_batch)
        self._poller: asyncio.Task | None = None
        try:
            loop = asyncio.get_running_loop()  # Serve runs constructors on the replica's event loop
        except RuntimeError:
            loop = None
        if loop is not None:
            self._poller = loop.create_task(self._poll())
        # At INFO: `jobs/serve.py` prints its own start-up lines (its WARNING included) and runs Serve at
        # WARNING; under `serve run` / `serve deploy` this line, warning and all, is in the replica's log.
        logger.info(
            "lxn: serving model %s (%s); auth %s, %d keys%s",
            self.current.version,
            settings.model,
            "on" if settings.auth else "OFF",
            len(self.keys),
            f"; WARNING: {self.current.warning}" if self.current.warning else "",
        )

    def __del__(self) -> None:
        poller = getattr(self, "_poller", None)
        if poller is not None:
            poller.cancel()
        decoders = getattr(self, "_decoders", None)
        if decoders is not None:
            decoders.shutdown(wait=False)
        writer = getattr(self, "summaries", None)
        rows = writer.drain() if writer is not None else None
        if rows:  # Serve calls this at a graceful shutdown: keep what is buffered
            try:
                writer.write(rows)
            except Exception:
                logger.exception("lxn: could not write %d buffered summaries", len(rows))

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
                if self.summaries is not None and (rows := self.summaries.due()) is not None:
                    self._write_summaries(rows)
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
        if loaded.warning:
            logger.warning("lxn: %s", loaded.warning)
        return True

    # -- inference ----------------------------------------------------------------------------------
    async def _score_batch(self, films: list[bytes]) -> list[_Scored | Exception]:
        """``@serve.batch`` target: every waiting film decoded and preprocessed in parallel
        (:meth:`_prepare`, a thread per CPU the replica reserves: decoding releases the GIL), then one
        forward pass for those that decoded, all with the model current when the batch started. A film
        that did not decode gets its exception back (ImageRejected, or anything unexpected, logged), to
        fail its own request only - after the batch's forward pass."""
        model = self.current

        def run() -> list[_Scored | Exception]:
            prepared = list(self._decoders.map(lambda data: self._try_prepare(data, model), films))
            good = [p for p in prepared if not isinstance(p, Exception)]
            probabilities = model.forward(np.stack([image for image, _ in good])) if good else []
            scored = iter(
                _Scored(float(p), model, statistics)
                for p, (_, statistics) in zip(probabilities, good, strict=True)
            )
            return [p if isinstance(p, Exception) else next(scored) for p in prepared]

        return await asyncio.to_thread(run)

    def _try_prepare(
        self, data: bytes, model: LoadedModel
    ) -> tuple[np.ndarray, FilmStatistics | None] | Exception:
        """:meth:`_prepare`, or the exception it raised (unexpected ones logged): one film's failure is
        its own request's, not its batch's."""
        try:
            return self._prepare(data, model)
        except ImageRejected as error:
            return error
        except Exception as error:
            logger.exception("lxn: could not prepare a film")
            return error

    def _prepare(self, data: bytes, model: LoadedModel) -> tuple[np.ndarray, FilmStatistics | None]:
        """The model input and the film's statistics (None if they could not be measured), from one
        decode. Blocking; raises ImageRejected for bad bytes."""
        from lxn_ray.images.decode import decode_image
        from lxn_ray.images.preprocess import as_model_input, decode_side, preprocess_decoded

        decoded = decode_image(data, self.limits, decode_side(model.image_size, model.preprocessing))
        image = as_model_input(
            preprocess_decoded(decoded, model.image_size, model.preprocessing, model.lungs)
        )
        try:
            statistics = statistics_of(decoded)
        except Exception:  # the film decoded for the model: a failure here must not refuse it
            logger.exception("lxn: could not measure a film's statistics")
            statistics = None
        return image, statistics

    async def predict_bytes(self, data: bytes, where: str = "") -> dict[str, Any]:
        """Join a batch, which decodes the film and scores it (:meth:`_score_batch`); raises InputError for
        bad bytes and the film's own unexpected error otherwise. Each film scored is counted in the metrics
        and summarised (:meth:`observe`)."""
        scored = await self._batched(data)
        if isinstance(scored, ImageRejected):
            raise rejected_image(scored, where)
        if isinstance(scored, Exception):
            raise scored
        answer = scored.model.prediction(scored.probability)
        self._predictions.inc(tags={"label": answer["label"], "model_version": str(scored.model.version)})
        self.observe(scored.statistics, answer)
        return answer

    # -- monitoring ---------------------------------------------------------------------------------
    def observe(self, statistics: FilmStatistics | None, answer: dict[str, Any]) -> None:
        """Record one scored film: the probability and input histograms, and its summary row (written in
        a batch once the buffer is full: :class:`~lxn_ray.serving.summaries.SummaryWriter`)."""
        self._probability.observe(answer["probability"], tags={"model_version": str(answer["model_version"])})
        if statistics is None:
            return
        self._formats.inc(tags={"format": statistics.format})
        self._megapixels.observe(statistics.width * statistics.height / 1e6)
        self._intensity.observe(statistics.mean_intensity)
        self._film_fraction.observe(statistics.film_fraction)
        if self.summaries is not None and (rows := self.summaries.add(summary_row(statistics, answer))):
            self._write_summaries(rows)

    def _write_summaries(self, rows: list[dict[str, Any]]) -> None:
        """Write a batch of summary rows in a thread, off the event loop; a failure is logged, not raised
        (the rows are lost: monitoring must never refuse a request)."""

        async def write() -> None:
            try:
                await asyncio.to_thread(self.summaries.write, rows)
            except Exception:
                logger.exception("lxn: could not write %d summaries", len(rows))

        task = asyncio.get_running_loop().create_task(write())
        self._writes.add(task)
        task.add_done_callback(self._writes.discard)

    def count_request(self, path: str | None, status: int) -> None:
        """Count one answered HTTP request in ``lxn_requests`` by route (``other`` for a path that is
        not one of the routes) and status code."""
        route = path if path in COUNTED_ROUTES else "other"
        self._requests.inc(tags={"route": route, "status": str(status)})

    def explain_bytes(self, data: bytes) -> tuple[bytes, dict[str, Any], Any]:
        """Grad-CAM overlay PNG, the prediction it shows and the overlay's
        :class:`lxn_ray.model.gradcam.OverlayLayout`. Blocking (run in a thread)."""
        from lxn_ray.images.preprocess import preprocess_for_explanation
        from lxn_ray.model.gradcam import overlay_layout, render_overlay

        model = self.current
        try:
            # The overlay covers what the model saw: the film after its border trimming and lung crop, if
            # any, with the lung fields outlined where a segmenter is at hand.
            image, radiograph, lungs = preprocess_for_explanation(
                data, model.image_size, self.limits, model.preprocessing, model.segmenter
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
        if model.no_better_than_chance:
            caption += "\nNO BETTER THAN CHANCE on its test split: do not act on this label"
        layout = overlay_layout(radiograph.size, caption)
        png = render_overlay(radiograph, explanation.heatmap, caption, layout=layout, lungs=lungs)
        return png, answer, layout

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
            "no_better_than_chance": model.no_better_than_chance,
            "warning": model.warning,
            "card": model.card,
        }

    # -- HTTP ---------------------------------------------------------------------------------------
    def authorise(self, request) -> None:
        """Refuse a request without a known API key, unless auth is off (``--no-auth``); the protected
        routes' FastAPI dependency calls this before the route runs.

        Raises :class:`InputError` (401, ``unauthorised``) for a missing, malformed or unknown key."""
        if self.settings.auth and self.keys.name_of(request.headers.get("authorization")) is None:
            reason = "no API key is configured yet" if not len(self.keys) else "missing or unknown API key"
            raise InputError(
                401,
                "unauthorised",
                f"{reason}: send 'Authorization: Bearer KEY' (mint a key: python jobs/serve.py "
                "--storage URI --mint-key NAME)",
            )

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
        """The JSON response ``{"error": message}`` for ``error``, with its status (and
        ``WWW-Authenticate: Bearer`` on 401), counted in ``lxn_rejected_inputs`` by reason and status."""
        from fastapi.responses import JSONResponse

        self._rejections.inc(tags={"reason": error.reason, "status": str(error.status)})
        headers = {"WWW-Authenticate": "Bearer"} if error.status == 401 else None
        return JSONResponse({"error": error.message}, status_code=error.status, headers=headers)


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
    """Application builder for ``serve deploy`` / ``serve run`` (``import_path:
    lxn_ray.serving.serve:build_app``), with the config file's ``args`` as :class:`ServeSettings` fields
    (``storage`` is required). Raises ValueError for an unknown or invalid setting."""
    return application(ServeSettings.from_mapping(dict(args)))


def deploy(settings: ServeSettings) -> dict[str, Any]:
    """Start Serve's HTTP proxy (if needed) and run the application; returns what is being served (url,
    docs url, app name, model reference and the loaded version, threshold and input size in pixels, the
    settings with key digests replaced by their count). Blocks until a replica has loaded its model and
    answered (a timeout error after 120 s)."""
    from ray import serve

    from lxn_ray.infra import cluster, quiet

    cluster.connect()
    quiet.setup_driver()  # again: importing ray.serve set its driver-side logger back to INFO
    # Serve's controller, proxy and replicas log at INFO to the driver (~40 lines per start-up); a job's
    # own summary says what is served, so by default they log warnings only (--verbose: everything).
    logs = None if quiet.verbose() else {"log_level": "WARNING"}
    serve.start(
        proxy_location=settings.proxy_location,
        http_options={"host": settings.host, "port": settings.port},
        logging_config=logs,
    )
    handle = serve.run(
        application(settings),
        name=settings.app_name,
        route_prefix=settings.route_prefix,
        logging_config=logs,
    )
    described = handle.describe.remote().result(timeout_s=120)
    return {
        "url": settings.url,
        "docs": f"{settings.url}/docs",
        "app_name": settings.app_name,
        "model": settings.model,
        "model_version": described["model_version"],
        "threshold": described["threshold"],
        "image_size": described["image_size"],
        "no_better_than_chance": described["no_better_than_chance"],
        "warning": described["warning"],
        # the report is stored: key digests are replaced by their count
        "settings": {**dataclasses.asdict(settings), "api_key_digests": len(settings.api_key_digests)},
        "note": RESEARCH_NOTE,
    }


def check_model(storage: Storage, reference: str) -> None:
    """Refuse a deployment whose replicas could not load a model, without downloading the model here.

    Raises FileNotFoundError when ``reference`` is ``champion`` and the store has none, or names a model
    version that is not published."""
    if reference == "champion":
        if registry.champion(storage) is None:
            raise FileNotFoundError(f"no champion model in {storage.uri}: train or promote one first")
    elif not (reference.endswith(".keras") and Path(reference).expanduser().is_file()):
        registry.read_card(storage, reference)  # raises for a version that is not published
