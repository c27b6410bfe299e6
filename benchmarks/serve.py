"""Serving benchmark: LxN through the Ray Serve HTTP endpoint against the same model in this process.

    python benchmarks/serve.py [--storage /tmp/store [--model champion|VERSION]] [--requests 200]
                               [--image PATH] [--replicas 1] [--cpus-per-replica CORES]
                               [--max-batch-size 16] [--batch-wait-timeout-s 0.02] [--port 8000]
                               [--ingress proxy,haproxy]

Serves the model ``--model`` of ``--storage`` (the champion by default). Without ``--storage`` it makes a
store of its own in a temp dir with the jobs a user runs (``common.own_store``, a few minutes): the shared
data's bundle at snapshot 2020-06-22 ingested, and LxN trained on it at 128 px for 2 epochs in the
precision ``auto`` picks (bfloat16 on a CPU with AVX512-BF16) - its speed, not its accuracy, is measured.
In one run it measures:
- the in-process ceiling: the model loaded here exactly as a replica loads it (lxn_ray.serving.serve's traced
  forward pass, in the precision the model was validated in: bfloat16 for a model trained in it), at the
  replica's batch size: forward pass only, and preprocessing + forward pass (the per-image work a
  replica does) two ways - the whole film decoded, one image after another (lxn_ray before scaled
  decoding: the baseline), and a JPEG decoded at the smallest DCT scale the model needs, the batch's
  images on a thread per core (as a replica's requests are); and the same weights in float32 (its
  "twin"), with the largest probability difference, so a bfloat16 model's speed-up and cost are
  measured side by side,
- the largest probability difference between the scaled and the full decode over the first 200 films of
  the model's test split (real films: the tolerance the scaled decode is held to),
- requests/s and p50/p99 latency of ``POST /predict`` (raw image body) through each ``--ingress`` - Serve's
  Python proxy, then HAProxy (Ray Serve's HAProxy ingress, each on a Ray instance of its own) - at
  concurrency 1, 8 and 32 (that many keep-alive connections on one asyncio loop, ``--requests`` requests
  per level after a warm-up of twice the concurrency at that level), with a fixed number of replicas so
  autoscaling does not move the numbers,
- the ratio of each HTTP rate to the in-process batched forward rate (the model's ceiling) and to the
  in-process preprocessing + forward rate (the same per-image work a replica does, run sequentially).
The image defaults to a synthetic 1024x1024 JPEG radiograph. The client runs on the same machine as the
server, so on a small machine it takes CPU from the replica (the least a Python client can: one loop).
Append the printed table to benchmarks/RESULTS.md with the machine it came from.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import platform
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from common import own_store  # benchmarks/common.py: this folder is on sys.path
from PIL import Image

from lxn_ray import registry
from lxn_ray.evaluation import predict
from lxn_ray.images.decode import decode_image
from lxn_ray.images.preprocess import as_model_input, preprocess_bytes, preprocess_decoded
from lxn_ray.infra import cluster
from lxn_ray.infra.storage import Storage
from lxn_ray.serving import auth
from lxn_ray.serving.model import load_model_version
from lxn_ray.serving.serve import deploy
from lxn_ray.serving.settings import ServeSettings

CONCURRENCY = (1, 8, 32)
INGRESSES = {"proxy": "Serve's proxy", "haproxy": "HAProxy"}


def synthetic_radiograph(side: int = 1024, seed: int = 0) -> bytes:
    """A chest-film-like JPEG (two bright lung fields, ribs, noise): realistic decode and resize cost."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:side, 0:side] / side
    image = 40 + 60 * np.exp(-((x - 0.5) ** 2) / 0.02)
    for centre in (0.3, 0.7):
        image += 110 * np.exp(-(((x - centre) / 0.14) ** 2 + ((y - 0.5) / 0.3) ** 2))
    image += 20 * np.sin(2 * np.pi * 9 * y) + rng.normal(0, 6, image.shape)
    buffer = io.BytesIO()
    Image.fromarray(np.clip(image, 0, 255).astype(np.uint8), mode="L").save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def full_decode_input(data: bytes, loaded) -> np.ndarray:
    """The model input as lxn_ray made it before scaled decoding: the whole film decoded, then the same
    preprocessing (the baseline of the "preprocess" rows and of the prediction check)."""
    pixels = preprocess_decoded(decode_image(data), loaded.image_size, loaded.preprocessing, loaded.lungs)
    return as_model_input(pixels)


def scaled_decode_input(data: bytes, loaded) -> np.ndarray:
    """The model input as a replica makes it now: a JPEG decoded at the smallest DCT scale the model
    needs (lxn_ray.images.preprocess.decode_side)."""
    return preprocess_bytes(data, loaded.image_size, preprocessing=loaded.preprocessing, lungs=loaded.lungs)


def in_process(storage: Storage, model: str, data: bytes, batch: int, seconds: float = 3.0, repeats: int = 3):
    """Images/s of forward only, and of preprocessing + forward at ``batch``: the full decode one image
    after another (before), and the scaled decode across the batch on a thread per core (a replica
    preprocesses each request in its own thread; Pillow releases the GIL while decoding). After a
    warm-up; the best of ``repeats`` windows, so a burst of other work on the machine does not set the
    ceiling."""
    loaded = load_model_version(storage, model)
    images = np.stack([scaled_decode_input(data, loaded)] * batch)
    for _ in range(3):
        loaded.forward(images)

    def rate(step) -> float:
        best = 0.0
        for _ in range(repeats):
            started, done = time.perf_counter(), 0
            while time.perf_counter() - started < seconds:
                step()
                done += batch
            best = max(best, done / (time.perf_counter() - started))
        return best

    forward_only = rate(lambda: loaded.forward(images))
    before = rate(lambda: loaded.forward(np.stack([full_decode_input(data, loaded) for _ in range(batch)])))
    with ThreadPoolExecutor(max_workers=os.cpu_count()) as pool:
        after = rate(
            lambda: loaded.forward(
                np.stack(list(pool.map(scaled_decode_input, [data] * batch, [loaded] * batch)))
            )
        )
    twin = float32_twin(storage, model)
    twin(images)
    difference = float(np.max(np.abs(twin(images) - loaded.forward(images))))
    return loaded, forward_only, before, after, rate(lambda: twin(images)), difference


def scaled_decode_difference(storage: Storage, loaded, films: int = 200) -> tuple[int, int, float]:
    """(films compared, JPEGs among them that decoded at a reduced scale, the largest |probability
    difference| between the scaled and the full decode) over the first ``films`` test-split films of the
    model's dataset version - the real films the tolerance is stated for."""
    from lxn_ray.data import dataset
    from lxn_ray.images.preprocess import decode_side

    keys = dataset.read_split(storage, loaded.card["dataset_version"], "test").column("image_key").to_pylist()
    blobs = [storage.read_bytes(key) for key in keys[:films]]
    side = decode_side(loaded.image_size, loaded.preprocessing)
    reduced = sum(
        1
        for data in blobs
        if side and decode_image(data, min_side=side).image.size[0] < decode_image(data).width
    )
    full = loaded.forward(np.stack([full_decode_input(data, loaded) for data in blobs]))
    scaled = loaded.forward(np.stack([scaled_decode_input(data, loaded) for data in blobs]))
    return len(blobs), reduced, float(np.max(np.abs(full - scaled)))


def float32_twin(storage: Storage, model: str):
    """The same weights in float32 - the baseline for a model validated and served in bfloat16 (a float32
    model's twin is itself): a traced forward ``(n, s, s, 3)`` -> ``(n,)`` like the replica's."""
    import tensorflow as tf

    from lxn_ray.training.config import TrainConfig
    from lxn_ray.training.publish import build_in_precision

    reference = registry.resolve(storage, model)
    keras_model = predict.load_keras(reference)
    twin = build_in_precision(TrainConfig.from_dict(reference.card["config"]).model, "float32")
    twin.set_weights(keras_model.get_weights())
    graph = tf.function(lambda images: tf.reshape(twin(images, training=False), [-1]))
    return lambda images: np.asarray(graph(tf.convert_to_tensor(images, dtype=tf.float32)))


def http_level(
    url: str, data: bytes, concurrency: int, requests_total: int, key: str
) -> tuple[float, np.ndarray]:
    """(requests/s, latencies in ms) for ``requests_total`` POSTs of ``data`` to ``url``/predict from
    ``concurrency`` connections kept alive, on one asyncio loop (aiohttp, which Ray depends on): the
    client shares the machine's cores with the server, and a loop costs less CPU per request than a
    thread per connection (~0.25 against ~0.85 ms with requests). Raises RuntimeError if any answer is
    not 200."""
    import asyncio

    import aiohttp

    latencies: list[float] = []
    errors: list[str] = []
    headers = {"Content-Type": "image/jpeg", "Authorization": f"Bearer {key}"}

    async def run() -> float:
        remaining = iter(range(requests_total))
        connector = aiohttp.TCPConnector(limit=concurrency)
        timeout = aiohttp.ClientTimeout(total=300)
        async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:

            async def client() -> None:
                while next(remaining, None) is not None:  # one loop: no lock needed
                    started = time.perf_counter()
                    async with session.post(url + "/predict", data=data, headers=headers) as response:
                        body = await response.read()
                    latencies.append((time.perf_counter() - started) * 1000)
                    if response.status != 200:
                        errors.append(f"{response.status} {body[:200]!r}")

            started = time.perf_counter()
            await asyncio.gather(*(client() for _ in range(concurrency)))
            return time.perf_counter() - started

    wall = asyncio.run(run())
    if errors:
        raise RuntimeError(f"{len(errors)} requests failed, e.g. {errors[0]}")
    return requests_total / wall, np.asarray(latencies)


def _ingresses(text: str) -> str:
    """``--ingress``: a comma-separated list of :data:`INGRESSES` names, checked before anything runs."""
    unknown = set(text.split(",")) - set(INGRESSES)
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown ingress {sorted(unknown)}; known: {', '.join(INGRESSES)}")
    return text


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--storage", default=None, help="a store with a model (default: make one, see above)")
    parser.add_argument("--model", default="champion", help="champion or a model version id")
    parser.add_argument("--requests", type=int, default=200, help="requests per concurrency level")
    parser.add_argument("--image", type=Path, help="a PNG/JPEG to send (default: synthetic 1024x1024 JPEG)")
    parser.add_argument("--replicas", type=int, default=1, help="fixed replica count (min = max)")
    parser.add_argument(
        "--cpus-per-replica",
        type=float,
        default=None,
        help="Ray CPUs reserved per replica (default: the machine's, shared by the replicas, as the "
        "in-process rates use them all; a replica decodes on a thread per CPU it reserves)",
    )
    parser.add_argument("--max-batch-size", type=int, default=ServeSettings(storage="-").max_batch_size)
    parser.add_argument(
        "--batch-wait-timeout-s", type=float, default=ServeSettings(storage="-").batch_wait_timeout_s
    )
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument(
        "--ingress",
        default="proxy,haproxy",
        type=_ingresses,
        help="comma-separated HTTP ingresses to measure, each on a Ray instance of its own: proxy (Serve's "
        "Python proxy actor), haproxy (Serve's HAProxy ingress: ServeSettings.ingress)",
    )
    args = parser.parse_args()
    if args.cpus_per_replica is None:
        args.cpus_per_replica = (os.cpu_count() or 1) / args.replicas

    with contextlib.ExitStack() as stack:
        if args.storage is None:
            work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="lxn-serve-bench-")))
            args.storage = own_store(work, ["--image-size", "128", "--epochs", "2", "--precision", "auto"])
            args.model = registry.list_versions(Storage.open(args.storage))[-1]
        run(args)


def run(args: argparse.Namespace) -> None:
    import ray
    from ray import serve

    storage = Storage.open(args.storage)
    version = registry.resolve(storage, args.model).version or args.model
    data = args.image.read_bytes() if args.image else synthetic_radiograph()
    with Image.open(io.BytesIO(data)) as probe:
        described = f"{probe.format} {probe.size[0]}x{probe.size[1]} {probe.mode}, {len(data) / 1024:.0f} KiB"

    loaded, forward_rate, before_rate, local_rate, twin_rate, difference = in_process(
        storage, version, data, args.max_batch_size
    )
    compared, reduced, decode_difference = scaled_decode_difference(storage, loaded)
    precision = (loaded.card.get("precision") or {}).get("inference", "float32")
    key = auth.new_key()  # API keys on, as served: a key known to this run only, nothing written to storage
    settings = ServeSettings(
        storage=storage.uri,
        api_key_digests=(auth.digest(key),),
        model=version,
        port=args.port,
        min_replicas=args.replicas,
        max_replicas=args.replicas,
        cpus_per_replica=args.cpus_per_replica,
        max_batch_size=args.max_batch_size,
        batch_wait_timeout_s=args.batch_wait_timeout_s,
        max_ongoing_requests=max(32, args.max_batch_size),
    )
    levels = {}
    for ingress in args.ingress.split(","):  # a Ray instance each: the ingress is read when Ray starts
        with cluster.serve_ingress(ingress):
            ray.init(
                address="local",
                num_cpus=os.cpu_count(),
                include_dashboard=False,
                logging_level="ERROR",
                log_to_driver=False,
            )
            try:
                deploy(settings)
                for c in CONCURRENCY:
                    http_level(settings.url, data, c, 2 * c, key)  # warm-up at the level: its first batches
                    levels[(ingress, c)] = http_level(settings.url, data, c, args.requests, key)
            finally:
                serve.shutdown()
                ray.shutdown()

    print(
        f"machine: {platform.node()} {platform.machine()}, {os.cpu_count()} cores, "
        f"Python {platform.python_version()}"
    )
    print(
        f"model {version}: LxN {loaded.image_size} px; image {described}; {args.replicas} replica(s) x "
        f"{args.cpus_per_replica} CPU, max batch {args.max_batch_size}, "
        f"batch wait {settings.batch_wait_timeout_s * 1000:.0f} ms; {args.requests} requests per level"
    )
    print(
        f"served in {precision} (the card's inference precision); max |probability difference| against "
        f"the float32 twin: {difference:.2e}; {precision} forward is {forward_rate / twin_rate:.2f}x float32"
    )
    print(
        f"scaled decode: preprocess + forward {local_rate / before_rate:.2f}x the full decode's; over "
        f"{compared} test-split films of the model's dataset ({reduced} decoded at a reduced scale), max "
        f"|probability difference| against the full decode {decode_difference:.2e}"
    )
    print("| path | concurrency | images/s | p50 ms | p99 ms | vs forward | vs preprocess + forward |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    batch = args.max_batch_size
    print(
        f"| in-process forward, float32 twin of the model, batch {batch} | - | {twin_rate:.1f} | - | - | "
        f"{twin_rate / forward_rate:.2f}x | - |"
    )
    print(f"| in-process forward ({precision}), batch {batch} | - | {forward_rate:.1f} | - | - | 1.00x | - |")
    print(
        f"| in-process preprocess (full decode, one at a time: before) + forward, batch {batch} | - | "
        f"{before_rate:.1f} | - | - | {before_rate / forward_rate:.2f}x | {before_rate / local_rate:.2f}x |"
    )
    print(
        f"| in-process preprocess (scaled decode, a thread per core) + forward, batch {batch} | - | "
        f"{local_rate:.1f} | - | - | {local_rate / forward_rate:.2f}x | 1.00x |"
    )
    for (ingress, concurrency), (rate, latencies) in levels.items():
        p50, p99 = np.percentile(latencies, [50, 99])
        print(
            f"| HTTP POST /predict through {INGRESSES[ingress]} | {concurrency} | {rate:.1f} | {p50:.0f} | "
            f"{p99:.0f} | {rate / forward_rate:.2f}x | {rate / local_rate:.2f}x |"
        )


if __name__ == "__main__":
    main()
