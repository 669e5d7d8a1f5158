"""Engines: uint8 N×C×64×64 in, float32 probabilities out. ONNX Runtime runs everywhere and is every version's
floor; OpenVINO competes with it on CPUs; TensorRT runs on NVIDIA GPUs.

`Engine` is the small interface every backend implements: ONNX Runtime and OpenVINO here (on a CPU host optimize
lets them compete on the same graphs, `competing_engines`), TensorRT in `models.tensorrt`. Sessions are expensive
to create and safe to call from several threads, so a process creates one per model file and shares it: `threads`
is what one call uses, `callers` how many threads call it at once (the screen flow's shard tasks), so that
`threads × callers` cores are busy.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import math
import os
import statistics
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Protocol, TypeVar

import numpy as np

from models.contract import IMAGE_SIZE, INPUT_NAME
from screenline.files import atomic_write_bytes

T = TypeVar("T")


class Engine(Protocol):
    """What screening needs from a model: scores for a uint8 batch."""

    name: str
    precision: str

    def infer(self, pixels: np.ndarray) -> np.ndarray:
        """float32 probabilities (N,) for uint8 pixels (N, C, 64, 64)."""
        ...


ENGINES = ("auto", "onnxruntime", "openvino", "tensorrt")
"""What a user may ask for: auto picks TensorRT where a GPU and the `gpu` extra are present, else the fastest CPU
engine the version ships that this host can run (OpenVINO or ONNX Runtime)."""


class EngineUnavailable(RuntimeError):
    """An engine asked for by name that this host cannot run."""


def openvino_missing() -> str | None:
    """Why OpenVINO cannot run here (None when it can)."""
    try:
        import openvino  # noqa: F401
    except ImportError:
        return "OpenVINO is not installed (pip install openvino)"
    return None


def resolve_engine(requested: str = "auto") -> str:
    """The engine family to use for `requested` on this host: tensorrt, or a CPU engine (onnxruntime for auto, which
    `competing_engines` widens to every CPU engine here). An engine this host cannot run fails with one clear line."""
    if requested not in ENGINES:
        raise ValueError(f"engine must be one of {', '.join(ENGINES)}, got {requested!r}")
    if requested == "onnxruntime":
        return requested
    if requested == "openvino":
        if (why := openvino_missing()) is not None:
            raise EngineUnavailable(f"engine=openvino: {why}")
        return requested
    from models import tensorrt

    if requested == "tensorrt":
        tensorrt.require()
        return requested
    return "tensorrt" if tensorrt.missing() is None else "onnxruntime"


def runnable_engines(requested: str = "auto") -> tuple[str, ...]:
    """The engines this host can run for `requested`, in the order screening prefers them: TensorRT (a GPU), then
    OpenVINO (installed), then ONNX Runtime (always)."""
    engine = resolve_engine(requested)
    if requested != "auto":
        return (engine,)
    return (("tensorrt",) if engine == "tensorrt" else ()) + \
        (("openvino",) if openvino_missing() is None else ()) + ("onnxruntime",)


def competing_engines(requested: str = "auto") -> tuple[str, ...]:
    """The engines whose candidates optimize measures against each other on this host; the fastest passing ships.

    auto on a CPU host: ONNX Runtime and, where it is installed, OpenVINO (the same graphs, each engine's own scores,
    threshold and knee). TensorRT on a GPU host (its ONNX Runtime candidates are the CPU fallback). An engine asked
    for by name competes alone."""
    engine = resolve_engine(requested)
    if engine == "tensorrt" or requested != "auto":
        return (engine,)
    return ("onnxruntime",) + (("openvino",) if openvino_missing() is None else ())


def default_threads() -> int:
    """Intra-op threads: the cores this process may use."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - non-Linux
        return os.cpu_count() or 1


ENGINE_CACHE_ENV = "SCREENLINE_ENGINE_CACHE"
ENGINE_CACHE_DAYS = 30  # a cached engine not imported for this long is deleted when another is stored


def engine_cache() -> Path | None:
    """Where this host keeps the OpenVINO engines it compiled (`OpenVinoEngine(cache=…)`): $SCREENLINE_ENGINE_CACHE
    ("off": nowhere), else ~/.cache/screenline/engines (under $XDG_CACHE_HOME when set). On the host, not in the
    lake: what is there is trusted as the installed code is, and whoever can write the lake cannot swap it."""
    value = os.environ.get(ENGINE_CACHE_ENV)
    if value == "off":
        return None
    if value:
        return Path(value).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "screenline" / "engines"


def cpu_info() -> tuple[str, str]:
    """This CPU's model name ("unknown cpu" where neither /proc/cpuinfo nor the platform names it) and its instruction
    set flags, sorted: where a knee was measured (registry.host_fingerprint) and what a compiled engine may depend
    on (`cache_key`)."""
    import platform

    model = flags = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and not model:
                model = value.strip()
            elif key.strip() == "flags" and not flags:
                flags = " ".join(sorted(value.split()))
    except OSError:
        pass
    return model or platform.processor() or "unknown cpu", flags or platform.machine()


class OrtEngine:
    """An ONNX Runtime CPU session behind `Engine`.

    Spinning is off: on a shared or busy CPU, spinning threads burn the cores the reader and other shards need.
    Concurrent calls run side by side (each on its caller's thread with one intra-op thread), so `callers` needs no
    setting here.
    """

    name = "onnxruntime"

    def __init__(self, model_path: Path, precision: str = "fp32", threads: int | None = None, callers: int = 1):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.intra_op_num_threads = threads or default_threads()
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.add_session_config_entry("session.inter_op.allow_spinning", "0")
        self.session = ort.InferenceSession(str(model_path), options, providers=["CPUExecutionProvider"])
        self.precision = precision
        self.threads = options.intra_op_num_threads
        shape = self.session.get_inputs()[0].shape
        self.channels = int(shape[1])

    def infer(self, pixels: np.ndarray) -> np.ndarray:
        if pixels.dtype != np.uint8 or pixels.ndim != 4 or pixels.shape[2:] != (IMAGE_SIZE, IMAGE_SIZE):
            raise ValueError(f"engine input must be uint8 N×C×{IMAGE_SIZE}×{IMAGE_SIZE}, got {pixels.dtype} "
                             f"{pixels.shape}")
        return self.session.run(None, {INPUT_NAME: pixels})[0].reshape(-1)


_FIRST_CALLS = threading.Lock()
"""Held for every OpenVINO engine's first call (`OpenVinoEngine._first_call`)."""


class OpenVinoEngine:
    """OpenVINO on the CPU behind `Engine`, reading the same ONNX graphs (FP32, or INT8 from their Q/DQ nodes).

    Inference precision is pinned to f32 so a CPU with bf16 units does not silently
    score in bf16; one infer request per thread, since a request is not safe to share. A compiled model runs its
    requests on its streams, one at a time each: `callers` threads calling at once need as many streams (one stream
    of one thread serialises two callers onto one core: the screen flow ran at half speed so), each of `threads`.

    `batch` compiles the graph for exactly that many images a call (static shapes), as screening runs it at its knee:
    a call of fewer is padded to it, one of more runs in chunks of it. Against the graph's dynamic batch this
    measured less memory (two streams at 256: +42 MB of buffers against +75, 21 MB less in all) and less time a call
    (batch 1: 0.19 ms against 0.23). Without it the batch is dynamic, for callers of any size (validation scores);
    `at_batch` gives the static engine for one size (the knee sweep measures each batch as screening would run it).

    `cache` (a folder, with `sha256` the graph's verified hash and a `batch`): the compiled engine is exported there
    once, under a key of everything it depends on (`cache_key`), and later engines import it instead of reading the
    ONNX graph and compiling it: 0.07 s and +45 MB against 0.29 s and +62 MB (the ONNX reader's 15 MB not loaded),
    the same scores to the bit. `source` says which happened: "compiled", "cached" (compiled, then exported) or
    "imported". A file damaged since (its content no longer matches the sha256 it starts with) or that OpenVINO
    refuses is compiled again and replaced.
    """

    name = "openvino"

    def __init__(self, model_path: Path, precision: str = "fp32", threads: int | None = None, callers: int = 1,
                 batch: int | None = None, cache: Path | None = None, sha256: str | None = None):
        import openvino as ov

        if batch is not None and batch < 1:
            raise ValueError(f"batch must be at least 1, got {batch}")
        self.model_path, self.precision, self.batch = Path(model_path), precision, batch
        self.threads = threads or default_threads()
        self.streams = max(1, callers)
        self._local = threading.local()
        config = {
            "INFERENCE_NUM_THREADS": self.threads * self.streams, "NUM_STREAMS": self.streams,
            "PERFORMANCE_HINT": "LATENCY" if self.streams == 1 else "THROUGHPUT",
            "INFERENCE_PRECISION_HINT": "f32",
        }
        core = ov.Core()
        stored = None
        if cache is not None and sha256 and batch is not None:
            stored = Path(cache) / f"ov-{cache_key(sha256, precision, batch, config)}.blob"
            if (blob := _verified_blob(stored)) is not None:
                try:
                    self.compiled = core.import_model(io.BytesIO(blob), "CPU", config)
                except RuntimeError:  # OpenVINO refused it: compiled again, and replaced
                    pass
                else:
                    self.channels = int(self.compiled.inputs[0].get_partial_shape()[1].get_length())
                    self.source = "imported"
                    with contextlib.suppress(OSError):  # its time is its last use: what pruning keeps by
                        os.utime(stored)
                    self._first_call()
                    return
        model = core.read_model(str(model_path))
        self.channels = int(model.inputs[0].get_partial_shape()[1].get_length())
        if batch is not None:
            model.reshape({0: [batch, self.channels, IMAGE_SIZE, IMAGE_SIZE]})
        self.compiled = core.compile_model(model, "CPU", config)
        self.source = "compiled"
        if stored is not None:
            exported = io.BytesIO()
            self.compiled.export_model(exported)
            blob = exported.getvalue()
            try:  # a cache is a saving, not a requirement: a folder this host cannot write leaves it compiled
                stored.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
                atomic_write_bytes(stored, hashlib.sha256(blob).hexdigest().encode() + b"\n" + blob)
                self.source = "cached"
            except OSError:
                pass
            else:
                prune_engine_cache(stored.parent)
        self._first_call()

    def _first_call(self) -> None:
        """One call from this thread, under `_FIRST_CALLS`, before any caller's: OpenVINO's Python binding (2026.4)
        initialises a static the first time it hands out an output tensor, and two threads doing that at once
        deadlock (one holds the GIL waiting on the static's guard, the other holds the guard waiting on the GIL: two
        shard tasks' first calls hung a screen run 1 time in ~25, and a bare two-thread script 1 in 40)."""
        with _FIRST_CALLS:
            self._run(np.zeros((self.batch or 1, self.channels, IMAGE_SIZE, IMAGE_SIZE), np.uint8))

    def at_batch(self, batch: int) -> OpenVinoEngine:
        """The same graph, threads and streams compiled for exactly `batch` images a call."""
        return OpenVinoEngine(self.model_path, self.precision, self.threads, self.streams, batch)

    def infer(self, pixels: np.ndarray) -> np.ndarray:
        if pixels.dtype != np.uint8 or pixels.ndim != 4 or pixels.shape[2:] != (IMAGE_SIZE, IMAGE_SIZE):
            raise ValueError(f"engine input must be uint8 N×C×{IMAGE_SIZE}×{IMAGE_SIZE}, got {pixels.dtype} "
                             f"{pixels.shape}")
        if self.batch is None or len(pixels) == self.batch:
            return self._run(pixels)
        out = [np.zeros(0, np.float32)]
        for start in range(0, len(pixels), self.batch):
            chunk = pixels[start: start + self.batch]
            if len(chunk) < self.batch:  # a shard's last images: padded, at most one batch's time a shard
                chunk = np.concatenate([chunk, np.zeros((self.batch - len(chunk), *chunk.shape[1:]), np.uint8)])
            out.append(self._run(np.ascontiguousarray(chunk))[: len(pixels) - start])
        return np.concatenate(out)

    def _run(self, pixels: np.ndarray) -> np.ndarray:
        request = getattr(self._local, "request", None)
        if request is None:
            request = self._local.request = self.compiled.create_infer_request()
        return np.array(request.infer({0: pixels})[0], dtype=np.float32).reshape(-1)


def scores(engine: Engine, pixels: np.ndarray, batch: int = 256) -> np.ndarray:
    """Scores for any number of images, in batches."""
    out = [engine.infer(np.ascontiguousarray(pixels[i: i + batch])) for i in range(0, len(pixels), batch)]
    return np.concatenate(out) if out else np.zeros(0, np.float32)


@dataclass
class KneePoint:
    batch: int
    images_per_s: float  # the median of its windows: throughput sustained over each window's calls
    ms_per_batch: float
    spread: float = 0.0  # (max - min) / median of its last windows' share of their round's fastest point
    windows: int = 1  # measurement windows (rounds of the sweep) it took to get there


@dataclass
class Knee:
    """A batch-size sweep and its knee: where a call's fixed cost falls to 1 - `fraction` of its time (find_knee)."""

    batch: int
    images_per_s: float
    batch1_latency_ms: float
    sweep: list[KneePoint]
    call_ms: float  # the fit's fixed cost of a call (t = call_ms + image_ms × batch)
    image_ms: float  # and its cost an image

    def as_dict(self) -> dict:
        """[batch, images/s, ms a batch, spread, windows] a sweep point."""
        return {"batch": self.batch, "images_per_s": round(self.images_per_s, 1),
                "batch1_latency_ms": round(self.batch1_latency_ms, 4),
                "fit": {"call_ms": round(self.call_ms, 4), "image_ms": round(self.image_ms, 5)},
                "sweep": [[p.batch, round(p.images_per_s, 1), round(p.ms_per_batch, 4), round(p.spread, 4),
                           p.windows] for p in self.sweep]}


STABLE_WINDOWS = 3
STABILITY = 0.05
MAX_WINDOWS = 6
"""The sweep runs in rounds, one window of every batch size a round, until each point's last STABLE_WINDOWS shares
of their round's fastest agree within STABILITY of their median (perf_analyzer's rule, its 10% tightened to 5%), or
MAX_WINDOWS rounds are spent (twice a point's budget)."""


def _window(engine: Engine, x: np.ndarray, seconds: float) -> float:
    """One measurement window: images/s sustained over `seconds` (at least two calls), as screening sees it."""
    calls, t0 = 0, time.perf_counter()
    while calls < 2 or time.perf_counter() - t0 < seconds:
        engine.infer(x)
        calls += 1
    return calls * len(x) / (time.perf_counter() - t0)


MAX_BATCH = 512
"""The top of the knee sweep (extended past it while throughput still grows, up to find_knee's `limit`)."""


KNEE_STEP = 16
"""A knee above it is a multiple of it (below, a power of two): the fitted knee moves by a step, not a doubling."""


def find_knee(engine: Engine, pixels: np.ndarray, max_batch: int = MAX_BATCH, fraction: float = 0.95,
              seconds_per_point: float = 0.3, limit: int = 4096) -> Knee:
    """Sweep batch sizes 1…max_batch (powers of two) and take the batch where a call's fixed cost is 1 - `fraction`
    of its time, from a fit of the whole sweep (`_fitted_knee`), not from the point that first reads `fraction` of
    the peak.

    The points are measured in rounds, one window each a round (`_window`), so a busy neighbour or a CPU clock that
    drifts during the sweep slows every point alike instead of the ones measured while it lasted; each window is
    compared with its round's fastest, and a point's share is the median of its rounds' (rounds continue until
    stable, see STABILITY). On a throughput curve that flattens, the points past the bend differ by less than their
    noise, so the first point within 5% of the peak, the rule before, moved between 16 and 512 from one sweep to the
    next on this host (five in a row: 512, 16, 256, 16, 32); the fit uses every point up to the plateau's end, and
    its knee read 64 five times in a row and 64–96 over ten more sweeps. If the first round's fastest is at the top
    of the sweep, the sweep extends (up to `limit`) until throughput stops growing. An engine with a largest batch
    of its own (a TensorRT plan's `max_batch`) is never swept past it; one that compiles a batch size of its own
    (`at_batch`: OpenVINO's static shapes, as screening runs the knee) is measured so at each point, and at the
    knee where it is not a point of the sweep (its spread then that of its own windows).
    """
    if (largest := getattr(engine, "max_batch", None)) is not None:
        max_batch, limit = min(max_batch, largest), min(limit, largest)
    window = seconds_per_point / STABLE_WINDOWS
    inputs: dict[int, np.ndarray] = {}
    figures: dict[int, list[float]] = {}
    engines: dict[int, Engine] = {}

    def measure(batch: int) -> None:
        if batch not in inputs:
            inputs[batch] = (np.ascontiguousarray(pixels[:batch]) if len(pixels) >= batch
                             else np.resize(pixels, (batch, *pixels.shape[1:])))
            engines[batch] = compiled_for(engine, batch)
            engines[batch].infer(inputs[batch])  # warm-up
        figures.setdefault(batch, []).append(_window(engines[batch], inputs[batch], window))

    batch = 1
    while batch <= max_batch or (batch <= limit and figures[batch // 2][0] == max(f[0] for f in figures.values())):
        measure(batch)
        batch *= 2
    batches = list(figures)
    while True:
        rounds = len(figures[1])
        shares = {b: [figures[b][r] / max(figures[c][r] for c in batches) for r in range(rounds)] for b in batches}
        spreads = {b: _spread(shares[b][-STABLE_WINDOWS:]) for b in batches}
        if rounds >= MAX_WINDOWS or (rounds >= STABLE_WINDOWS and max(spreads.values()) <= STABILITY):
            break
        for b in batches:
            measure(b)
    share = {b: statistics.median(shares[b]) for b in batches}
    sweep = [KneePoint(b, statistics.median(figures[b]), b / statistics.median(figures[b]) * 1000, spreads[b],
                       rounds) for b in batches]
    knee, call, image = _fitted_knee(share, fraction)
    scale = statistics.median(p.ms_per_batch / (p.batch / share[p.batch]) for p in sweep)  # relative time → ms
    if knee not in figures:  # between two points of the sweep: measured on its own, as screening will run it
        for _ in range(STABLE_WINDOWS):
            measure(knee)
        mine = statistics.median(figures[knee])
        sweep.append(KneePoint(knee, mine, knee / mine * 1000, _spread(figures[knee]), STABLE_WINDOWS))
        sweep.sort(key=lambda p: p.batch)
    point = next(p for p in sweep if p.batch == knee)
    return Knee(knee, point.images_per_s, sweep[0].ms_per_batch, sweep, call * scale, image * scale)


RUNOFF_ROUNDS = 9
RUNOFF_MARGIN = 0.25
"""Candidates whose own sweeps read within RUNOFF_MARGIN of the fastest are measured again, in turns, before one is
picked (`runoff`): each sweep ran at its own moment, minutes apart, and on a shared host the speed moves between
moments by as much as the candidates differ. On the VNNI host (2026-12-06) the demo's sweeps read OpenVINO's S8S8
per-tensor graph fastest (15,783 images/s against 13,494–14,495 for the other INT8 graphs); four run-offs of its
four INT8 graphs read it last each time (shares 0.92–0.95) and a U8S8 graph first (0.97–0.99), a window's spread
within a run-off 6–25%, which is why a run-off is nine rounds (~7 s for four graphs at 0.2 s a window)."""


def close_to_fastest(items: list[T], speed: Callable[[T], float], margin: float = RUNOFF_MARGIN) -> list[T]:
    """The items whose `speed` is within `margin` of the fastest one's: who enters a run-off."""
    if not items:
        return []
    top = max(speed(item) for item in items)
    return [item for item in items if speed(item) >= (1 - margin) * top]


def runoff(contenders: dict[str, tuple[Engine, np.ndarray]], seconds: float,
           rounds: int = RUNOFF_ROUNDS) -> dict[str, dict]:
    """Engines measured in turns, each on its own input (its knee's batch): a round is one window of each (`_window`),
    its order rotated round by round so that none always runs first after whatever paused the host, and a window
    counts as its share of its round's fastest. An engine's figures are the medians of its shares and of its images/s
    and the spread of its shares (find_knee's `_spread`); the largest share is the fastest on the same footing.
    Returns {name: {"share", "images_per_s", "spread", "rounds", "windows"}}, windows its images/s round by round."""
    names = list(contenders)
    figures: dict[str, list[float]] = {name: [] for name in names}
    for engine, x in contenders.values():
        engine.infer(x)  # warm-up
    for r in range(rounds):
        for name in names[r % len(names):] + names[: r % len(names)]:
            engine, x = contenders[name]
            figures[name].append(_window(engine, x, seconds))
    shares = {n: [figures[n][r] / max(figures[m][r] for m in names) for r in range(rounds)] for n in names}
    return {n: {"share": round(statistics.median(shares[n]), 4),
                "images_per_s": round(statistics.median(figures[n]), 1),
                "spread": round(_spread(shares[n]), 4), "rounds": rounds,
                "windows": [round(f, 1) for f in figures[n]]} for n in names}


def cache_key(sha256: str, precision: str, batch: int, config: dict) -> str:
    """What a compiled OpenVINO engine depends on, as a digest: OpenVINO's version, this CPU, the graph's sha256,
    its precision, the batch it was compiled for and the compile configuration (threads, streams, hints)."""
    import openvino as ov

    facts = {"openvino": ov.get_version(), "cpu": cpu_info(), "graph": sha256, "precision": precision,
             "batch": batch, "config": config}
    return hashlib.sha256(json.dumps(facts, sort_keys=True).encode()).hexdigest()[:24]


def prune_engine_cache(folder: Path, days: float = ENGINE_CACHE_DAYS) -> list[Path]:
    """Delete the cached engines not imported (nor stored) for `days`: those of versions no longer screened with,
    of old batches and thread counts, of an OpenVINO since upgraded. Returns what it deleted. Without it the cache
    would grow by an engine a promoted version and configuration, forever."""
    cutoff, gone = time.time() - days * 86400, []
    for blob in folder.glob("ov-*.blob"):
        with contextlib.suppress(OSError):  # another process pruning, or just importing it: not an error
            if blob.stat().st_mtime < cutoff:
                blob.unlink()
                gone.append(blob)
    return gone


def _verified_blob(path: Path) -> bytes | None:
    """A cached engine's bytes if the file is there and its content matches the sha256 on its first line, else None
    (a damaged file is then compiled again and replaced)."""
    try:
        digest, _, blob = path.read_bytes().partition(b"\n")
    except OSError:
        return None
    return blob if blob and hashlib.sha256(blob).hexdigest().encode() == digest else None


def compiled_for(engine: Engine, batch: int) -> Engine:
    """The engine as screening runs it at `batch`: compiled for it where the engine compiles one (OpenVINO's
    `at_batch`), else the engine itself."""
    at_batch = getattr(engine, "at_batch", None)
    return at_batch(batch) if at_batch is not None else engine


def _fitted_knee(share: dict[int, float], fraction: float) -> tuple[int, float, float]:
    """The knee of a sweep's median shares of the fastest, with the fit it came from: (batch, a, c).

    A call of b images takes t(b) = a + c·b (a fixed cost a call, c an image), so its throughput b / t(b) reaches
    `fraction` of the curve's limit 1 / c at b = fraction / (1 - fraction) · a / c (19 a / c for 95%). a and c are
    fitted by least squares of the relative error on the points up to the plateau's end, the largest batch within
    1 - fraction of the fastest (a curve that falls past its peak, cache-bound, is not fitted where it falls), and
    the knee is rounded up to KNEE_STEP's grid, never past the plateau's end. The shares' times (b / share) are
    relative, so are a and c; their ratio is not. No fixed cost (a ≤ 0): the smallest batch; a cost that does not
    grow with the batch (c ≤ 0): the plateau's end."""
    top = max(share.values())
    end = max(b for b in share if share[b] >= fraction * top)
    fitted = [x for x in share if x <= end]
    b = np.array(fitted, dtype=float)
    t = b / np.array([share[x] for x in fitted])
    if len(b) < 2:
        return end, float(t[0]), 0.0
    (a, c), *_ = np.linalg.lstsq(np.stack([1 / t, b / t], axis=1), np.ones_like(b), rcond=None)
    if c <= 0 or fraction >= 1:
        return end, float(a), float(c)
    if a <= 0:
        return fitted[0], float(a), float(c)
    want = fraction / (1 - fraction) * a / c
    grid = 1 << max(0, math.ceil(math.log2(want))) if want <= KNEE_STEP else KNEE_STEP * math.ceil(want / KNEE_STEP)
    return min(end, grid), float(a), float(c)


def _spread(values: list[float]) -> float:
    """(max - min) / median; infinite for fewer than STABLE_WINDOWS values (not yet measured enough to say)."""
    if len(values) < STABLE_WINDOWS:
        return float("inf")
    return (max(values) - min(values)) / statistics.median(values)
