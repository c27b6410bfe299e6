"""The LxN classifier (Umer et al., 2020, Figure (ii)) and the pieces a custom training step needs.

This module owns the architecture, the class-weighted loss of the paper's equation (1), the optimizer,
saving/loading and a FLOP count. It does not own the training loop: Keras 3 ``model.fit`` fails under
``tf.distribute.MultiWorkerMirroredStrategy`` with 2 workers (keras-team/keras#20585), so training uses a
custom step (``strategy.run``, ``tf.GradientTape``, ``optimizer.apply_gradients``). Everything here is
therefore plain functions over tensors, with a per-example loss the loop reduces itself with
``tf.nn.compute_average_loss``.

Keras 3 only (``import keras``, never ``tf.keras``): on Ray workers ``TF_USE_LEGACY_KERAS=1`` makes
``tf.keras`` a different library, and mixing the two in one program is a trap. Importing this module
builds nothing and does not import TensorFlow or Keras (each function does): processes that only need
:class:`ModelConfig` - a Tune trial, a Ray Train controller, a Ray Data task - skip a ~3 s import.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import keras
    import tensorflow as tf

# Figure (ii): four blocks of two 3x3 valid ReLU convolutions and a 2x2 max-pool, then Dense 512, Dense 1.
CONV_BLOCKS: tuple[int, ...] = (32, 64, 128, 256)
CONVS_PER_BLOCK = 2
KERNEL_SIZE = 3
POOL_SIZE = 2
DENSE_UNITS = 512
INPUT_CHANNELS = 3

# Grad-CAM reads the activations of this layer; the name is part of the saved-model contract.
LAST_CONV_LAYER = f"block{len(CONV_BLOCKS)}_conv{CONVS_PER_BLOCK}"
INPUT_NAME = "image"
OUTPUT_LAYER = "covid_probability"

# Probabilities are clipped this far from 0 and 1 before taking logs: a saturated float32 sigmoid returns
# exactly 0.0 or 1.0, and log(0) would turn one confident mistake into an infinite loss and NaN gradients.
PROBABILITY_EPSILON = 1e-7


def _stage_output(size: int) -> int:
    """Spatial side after one block: two valid 3x3 convolutions (-2 each) then a 2x2 pool (floor halve)."""
    return (size - CONVS_PER_BLOCK * (KERNEL_SIZE - 1)) // POOL_SIZE


def min_image_size() -> int:
    """Smallest input side for which every block still has at least one pixel to pool (76 for LxN).

    Worked backwards from a 1x1 map after the last pool: each block needs ``POOL_SIZE * s`` pixels after
    its convolutions, plus ``2 * (KERNEL_SIZE - 1)`` consumed by them.
    """
    size = 1
    for _ in CONV_BLOCKS:
        size = size * POOL_SIZE + CONVS_PER_BLOCK * (KERNEL_SIZE - 1)
    return size


ARCHITECTURES = ("lxn", "lxn-bn")
OPTIMIZERS = ("rmsprop", "adam", "adamw")
SCHEDULES = ("constant", "cosine")
PRECISIONS = ("auto", "float32", "bfloat16", "float16")


@dataclass(frozen=True)
class ModelConfig:
    """Shape of an LxN network. The defaults are the paper's; small values exist for fast tests.

    ``architecture``: ``lxn`` is exactly the paper's network; ``lxn-bn`` keeps its four blocks, adds batch
    normalisation after every convolution (Ioffe & Szegedy, 2015) and replaces Flatten + Dense 512 (8.4 M of
    LxN's 9.6 M parameters at 200 px) with global average pooling.
    """

    image_size: int = 200
    width: float = 1.0  # multiplies every conv/dense width (min 1 unit); 1.0 is the paper's network
    architecture: str = "lxn"
    # "valid" is the paper's. "auto" keeps it wherever it fits (>= 76 px) and pads ("same") below that,
    # so quick runs at e.g. 64 px still have all four blocks; the model card records what was used.
    padding: str = "auto"

    def __post_init__(self) -> None:
        # Checked at construction so a bad Tune/CLI config fails before any worker starts.
        if not isinstance(self.image_size, int) or isinstance(self.image_size, bool):
            raise ValueError(f"image_size must be an int, got {self.image_size!r}")
        if self.architecture not in ARCHITECTURES:
            raise ValueError(
                f"architecture must be one of {', '.join(ARCHITECTURES)}, got {self.architecture!r}"
            )
        if self.padding not in ("auto", "valid", "same"):
            raise ValueError(f"padding must be auto, valid or same, got {self.padding!r}")
        smallest = min_image_size() if self.conv_padding == "valid" else POOL_SIZE ** len(CONV_BLOCKS)
        if self.image_size < smallest:
            raise ValueError(
                f"image_size {self.image_size} is too small for LxN with {self.conv_padding} padding: "
                f"four blocks of two 3x3 convolutions and a 2x2 max-pool need at least "
                f"{smallest}x{smallest} pixels"
            )
        if not self.width > 0:
            raise ValueError(f"width must be positive, got {self.width!r}")

    @property
    def conv_padding(self) -> str:
        """The padding the convolutions use: the paper's "valid" unless too small and ``auto``."""
        if self.padding != "auto":
            return self.padding
        return "valid" if self.image_size >= min_image_size() else "same"

    def units(self, base: int) -> int:
        """Scaled layer width, never below one unit."""
        return max(1, round(base * self.width))


def build_lxn(config: ModelConfig = ModelConfig()) -> keras.Model:
    """Build LxN: ``(n, image_size, image_size, 3)`` float32 in [0, 1] -> P(positive), shape ``(n, 1)``.

    ``lxn-bn`` (see :class:`ModelConfig`): each convolution is linear and unbiased, then batch
    normalisation, then a ReLU layer that carries the convolution's name (``block4_conv2`` stays the
    rectified feature map Grad-CAM reads). Only built-in layers, so ``load_model(..., safe_mode=True)`` can
    rebuild either without executing code. The output layer is float32 under any mixed-precision policy.
    """
    import keras

    normalised = config.architecture == "lxn-bn"
    inputs = keras.Input(shape=(config.image_size, config.image_size, INPUT_CHANNELS), name=INPUT_NAME)
    x = inputs
    for block, filters in enumerate(CONV_BLOCKS, start=1):
        for conv in range(1, CONVS_PER_BLOCK + 1):
            name = f"block{block}_conv{conv}"
            if normalised:
                x = keras.layers.Conv2D(
                    config.units(filters),
                    KERNEL_SIZE,
                    padding=config.conv_padding,
                    use_bias=False,
                    name=f"{name}_linear",
                )(x)
                # Synchronized: batch statistics over the global batch (all Ray Train workers), so every
                # rank keeps the same moving statistics and scores validation identically.
                x = keras.layers.BatchNormalization(synchronized=True, name=f"{name}_bn")(x)
                x = keras.layers.ReLU(name=name)(x)
            else:
                x = keras.layers.Conv2D(
                    config.units(filters),
                    KERNEL_SIZE,
                    padding=config.conv_padding,
                    activation="relu",
                    name=name,
                )(x)
        x = keras.layers.MaxPooling2D(POOL_SIZE, name=f"block{block}_pool")(x)
    if normalised:
        x = keras.layers.GlobalAveragePooling2D(name="global_pool")(x)
    else:
        x = keras.layers.Flatten(name="flatten")(x)
        x = keras.layers.Dense(config.units(DENSE_UNITS), activation="relu", name="fc1")(x)
    # float32 output even under a mixed-precision policy: the loss clips and logs these values.
    outputs = keras.layers.Dense(1, activation="sigmoid", dtype="float32", name=OUTPUT_LAYER)(x)
    return keras.Model(inputs, outputs, name=config.architecture.replace("-", "_"))


def class_weights(positives: int, negatives: int) -> tuple[float, float]:
    """Equation (1): ``(w_pos, w_neg) = (|N| / (|P|+|N|), |P| / (|P|+|N|))``.

    Each class is weighted by the *other* class's share, so the minority class weighs more and both
    classes contribute equally to the summed loss (w_pos * |P| == w_neg * |N|). When positives are the
    majority, w_pos < w_neg.
    """
    if positives < 0 or negatives < 0:
        raise ValueError(
            f"class counts must be non-negative, got positives={positives}, negatives={negatives}"
        )
    if positives == 0 or negatives == 0:
        empty = "positive (COVID-19)" if positives == 0 else "negative"
        raise ValueError(
            f"the {empty} class is empty (positives={positives}, negatives={negatives}); "
            "a binary classifier cannot be trained or class-weighted without both classes"
        )
    total = positives + negatives
    return negatives / total, positives / total


def weighted_bce(labels, probabilities, w_pos: float, w_neg: float) -> tf.Tensor:
    """Per-example weighted binary cross-entropy, shape ``[batch]``, float32.

    ``-(w_pos * y * log(p) + w_neg * (1 - y) * log(1 - p))``. Per example (not reduced) so that the
    distributed step can divide by the *global* batch size with ``tf.nn.compute_average_loss``; a mean
    here would be a per-replica mean and scale gradients wrongly across workers. ``labels`` may be
    ``[batch]`` or ``[batch, 1]``, any numeric dtype; ``probabilities`` is the model output.
    """
    import tensorflow as tf

    probabilities = tf.reshape(tf.cast(probabilities, tf.float32), [-1])
    labels = tf.reshape(tf.cast(labels, tf.float32), [-1])
    probabilities = tf.clip_by_value(probabilities, PROBABILITY_EPSILON, 1.0 - PROBABILITY_EPSILON)
    positive_term = w_pos * labels * tf.math.log(probabilities)
    negative_term = w_neg * (1.0 - labels) * tf.math.log(1.0 - probabilities)
    return -(positive_term + negative_term)


@dataclass(frozen=True)
class OptimizerConfig:
    """The optimizer and its learning-rate schedule (every field is recorded in the model card).

    ``rmsprop`` is the paper's. ``cosine``: linear warm-up from 0 over ``warmup_steps``, then cosine decay
    to 0 over the remaining steps (Loshchilov & Hutter, 2017; Goyal et al., 2017 for the warm-up).
    ``weight_decay`` is AdamW's decoupled decay (Loshchilov & Hutter, 2019); the others ignore it.
    """

    name: str = "rmsprop"
    learning_rate: float = 1e-4
    schedule: str = "constant"
    total_steps: int = 1  # optimizer steps of the whole run (the cosine's length)
    warmup_steps: int = 0
    weight_decay: float = 1e-4

    def __post_init__(self) -> None:
        if self.name not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {', '.join(OPTIMIZERS)}, got {self.name!r}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {', '.join(SCHEDULES)}, got {self.schedule!r}")
        if not self.learning_rate > 0:
            raise ValueError(f"learning_rate must be positive, got {self.learning_rate!r}")
        if self.total_steps < 1 or not 0 <= self.warmup_steps <= self.total_steps:
            raise ValueError(f"need 0 <= warmup_steps <= total_steps and total_steps >= 1: {self}")
        if self.weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay!r}")


def make_optimizer(config: OptimizerConfig | float) -> keras.optimizers.Optimizer:
    """The Keras optimizer of ``config`` (a bare float: the paper's RMSprop at that learning rate).

    Create it inside ``strategy.scope()`` so its slots are mirrored. Its ``variables`` (iteration count,
    slots) are what a checkpoint keeps to resume exactly (:func:`optimizer_state`).
    """
    import keras

    if not isinstance(config, OptimizerConfig):
        config = OptimizerConfig(learning_rate=float(config))
    learning_rate: Any = config.learning_rate
    if config.schedule == "cosine":
        warm = config.warmup_steps > 0
        learning_rate = keras.optimizers.schedules.CosineDecay(
            initial_learning_rate=0.0 if warm else config.learning_rate,
            decay_steps=max(1, config.total_steps - config.warmup_steps),
            warmup_target=config.learning_rate if warm else None,
            warmup_steps=config.warmup_steps,
        )
    if config.name == "adam":
        return keras.optimizers.Adam(learning_rate=learning_rate)
    if config.name == "adamw":
        return keras.optimizers.AdamW(learning_rate=learning_rate, weight_decay=config.weight_decay)
    return keras.optimizers.RMSprop(learning_rate=learning_rate)


def _state_keys(optimizer: keras.optimizers.Optimizer) -> list[str]:
    """``NNN:path`` per optimizer variable, in order, without the optimizer's own instance name (Keras
    numbers those per process: ``adam``, ``adam_1``, ...)."""
    return [f"{i:03d}:{v.path.split('/', 1)[-1]}" for i, v in enumerate(optimizer.variables)]


def optimizer_state(optimizer: keras.optimizers.Optimizer) -> dict[str, np.ndarray]:
    """Every optimizer variable (step count, moving averages, a loss scale) as arrays, by
    :func:`_state_keys` - what a checkpoint keeps so a resumed run continues exactly."""
    return {
        key: np.asarray(variable.numpy())
        for key, variable in zip(_state_keys(optimizer), optimizer.variables, strict=True)
    }


def restore_optimizer_state(
    optimizer: keras.optimizers.Optimizer, model: keras.Model, state: dict[str, np.ndarray]
) -> None:
    """Build ``optimizer`` for ``model`` and load :func:`optimizer_state`; raises ValueError when the saved
    variables do not match (another optimizer or architecture)."""
    optimizer.build(model.trainable_variables)
    keys = _state_keys(optimizer)
    if keys != sorted(state):
        missing, extra = sorted(set(keys) - set(state)), sorted(set(state) - set(keys))
        raise ValueError(f"optimizer state does not match: missing {missing[:3]}, unexpected {extra[:3]}")
    for key, variable in zip(keys, optimizer.variables, strict=True):
        variable.assign(state[key])


# -- precision ------------------------------------------------------------------------------------------
CPU_BFLOAT16_FLAGS = ("avx512_bf16", "amx_bf16")  # /proc/cpuinfo flags of native bfloat16 arithmetic


def cpu_supports_bfloat16(cpuinfo: str | None = None) -> bool:
    """True when this CPU computes bfloat16 natively: Linux's ``/proc/cpuinfo`` lists ``avx512_bf16``
    (AVX-512 BF16, Cooper Lake and later) or ``amx_bf16`` (AMX, Sapphire Rapids and later). Elsewhere (no
    such file) False: TensorFlow would emulate bfloat16, slower than float32."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text(errors="replace")
        except OSError:
            return False
    flags: set[str] = set()
    for line in cpuinfo.splitlines():
        if line.startswith("flags"):
            flags.update(line.partition(":")[2].split())
    return any(flag in flags for flag in CPU_BFLOAT16_FLAGS)


def resolve_precision(requested: str, on_gpu: bool, cpuinfo: str | None = None) -> str:
    """The compute precision a run uses: ``auto`` is float16 on GPUs, bfloat16 on CPUs that have it
    (:func:`cpu_supports_bfloat16`), float32 otherwise; anything else is taken as asked. Raises ValueError
    for an unknown name, or for float16 on a CPU (TensorFlow's CPU kernels do not run it fast)."""
    if requested not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {requested!r}")
    if requested == "auto":
        return "float16" if on_gpu else "bfloat16" if cpu_supports_bfloat16(cpuinfo) else "float32"
    if requested == "float16" and not on_gpu:
        raise ValueError("precision float16 needs GPU workers; on CPUs use bfloat16 or float32")
    return requested


def precision_policy(precision: str) -> str:
    """The Keras dtype policy of a resolved precision: variables stay float32 in every one."""
    return {"float32": "float32", "bfloat16": "mixed_bfloat16", "float16": "mixed_float16"}[precision]


def save_model(model: keras.Model, path: str | Path) -> Path:
    """Save as a native ``.keras`` archive (config JSON + weights; no pickled code)."""
    path = Path(path)
    if path.suffix != ".keras":
        raise ValueError(f"models are saved as .keras archives, got {path}")
    path.parent.mkdir(parents=True, exist_ok=True)
    model.save(path)
    return path


def load_model(path: str | Path) -> keras.Model:
    """Load a ``.keras`` archive with ``safe_mode=True``.

    Safe mode refuses to deserialize Lambda layers or other embedded bytecode, so loading a model file
    (e.g. a candidate pulled from shared storage into the serving replica) cannot execute code. It also
    keeps us honest: LxN uses built-in layers only. ``compile=False``: the loop supplies its own loss and
    optimizer, and inference needs neither.
    """
    import keras

    return keras.models.load_model(Path(path), compile=False, safe_mode=True)


def flops_per_image(config: ModelConfig = ModelConfig()) -> float:
    """Forward-pass FLOPs for one image (2 x multiply-accumulates of convolutions and dense layers).

    Bias adds, ReLU and pooling are left out (well under 1%). LxN at 200 px: ~3.18e9; a training step
    (forward + backward) is roughly 3x that.
    """
    size, channels, macs = config.image_size, INPUT_CHANNELS, 0
    for filters in CONV_BLOCKS:
        out_channels = config.units(filters)
        for _ in range(CONVS_PER_BLOCK):
            if config.conv_padding == "valid":
                size -= KERNEL_SIZE - 1
            macs += size * size * KERNEL_SIZE * KERNEL_SIZE * channels * out_channels
            channels = out_channels
        size //= POOL_SIZE
    if config.architecture == "lxn-bn":  # global average pooling, then Dense 1
        return 2.0 * (macs + channels)
    dense = config.units(DENSE_UNITS)
    macs += size * size * channels * dense + dense * 1
    return 2.0 * macs


def predict_probabilities(model: keras.Model, images, batch_size: int = 32) -> np.ndarray:
    """P(positive) for a sequence of preprocessed ``(s, s, 3)`` arrays, in batches; float32 ``(n,)``."""
    scores = [
        np.asarray(model.predict_on_batch(np.stack(images[start : start + batch_size]))).reshape(-1)
        for start in range(0, len(images), batch_size)
    ]
    return np.concatenate(scores) if scores else np.zeros(0, dtype=np.float32)
