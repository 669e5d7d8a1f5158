"""TensorRT on NVIDIA GPUs behind `Engine`: a serialized plan built from the ONNX graph, pycuda buffers.

Optional (extra `gpu`: tensorrt, pycuda; pycuda builds from source against a CUDA toolkit). Written for TensorRT
10.x and 11.x alike by always building a strongly typed network: 11 is strongly typed only and removed
`BuilderFlag.FP16/INT8`, the INT8 calibrators and `EXPLICIT_BATCH`; on 10 the STRONGLY_TYPED flag opts in. So
precision lives in the graph, not in builder flags:

- fp32: the exported graph as is;
- fp16: the same graph with weights and activations converted to float16 (uint8 in, float32 out kept), written by
  `fp16_graph`;
- int8: explicit quantization from a Q/DQ graph with symmetric int8 activations (`int8_graph`), since TensorRT
  needs zero-points of 0; ONNX Runtime's fast CPU graph (uint8 activations) would be refused.

A plan depends on the TensorRT version, the GPU, the graph, the batch profile and the precision; `PlanKey` names
all of them and is the plan's file name, so a plan built elsewhere is never loaded by mistake. The builder's timing
cache lives on disk beside the plans, so rebuilding for a new profile takes seconds, not minutes.

Inference: one execution context, one compute stream and one copy stream per calling thread, and two page-locked
buffer slots, so batch i+1's host staging and upload overlap batch i's compute. The device's primary context (what
`pycuda.autoprimaryctx` makes current for the importing thread) is pushed around each call instead, so any thread
of a Prefect or Dask worker may call `infer`.
"""

from __future__ import annotations

import hashlib
import json
import threading
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from models.contract import IMAGE_SIZE, INPUT_NAME, OUTPUT_NAME
from screenline.files import atomic_path, atomic_write_bytes

PRECISIONS = ("fp16", "int8", "fp32")
"""What a TensorRT candidate can be built as, fastest first on current GPUs."""

INSTALL_HINT = ("install the `gpu` extra on a host with an NVIDIA GPU and a CUDA toolkit "
                "(pip install -e '.[gpu]'; pycuda builds from source), or use engine=onnxruntime")


class TensorRTUnavailable(RuntimeError):
    """TensorRT was asked for on a host that cannot run it; the message says what is missing."""


def missing() -> str | None:
    """Why TensorRT cannot run here (one line), or None when it can."""
    try:
        import tensorrt  # noqa: F401
    except ImportError as err:
        return f"the tensorrt package is not installed ({err.msg})"
    try:
        import pycuda.driver as cuda
    except ModuleNotFoundError as err:
        return f"pycuda is not installed ({err.msg})"
    except ImportError as err:  # installed, but the NVIDIA driver's libcuda is not there
        return f"pycuda cannot load the CUDA driver ({err.msg})"
    try:
        cuda.init()
        if cuda.Device.count() == 0:
            return "no CUDA GPU is visible"
    except Exception as err:  # pycuda's driver errors: no device, driver too old, ...
        return f"CUDA cannot start: {err}"
    return None


def require() -> None:
    """Raise TensorRTUnavailable with one clear line when TensorRT cannot run here."""
    why = missing()
    if why is not None:
        raise TensorRTUnavailable(f"engine=tensorrt needs an NVIDIA GPU with TensorRT and pycuda, but {why}: "
                                  f"{INSTALL_HINT}")


# --- what a plan is built for ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Profile:
    """The optimization profile of the batch axis: TensorRT tunes kernels for `opt` and accepts min…max."""

    min: int
    opt: int
    max: int

    def shapes(self, channels: int) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
        """(min, opt, max) input shapes N×C×64×64."""
        lo, opt, hi = ((n, channels, IMAGE_SIZE, IMAGE_SIZE) for n in (self.min, self.opt, self.max))
        return lo, opt, hi


def profile_for(knee: int | None, max_batch: int) -> Profile:
    """min 1, opt the host's knee (clamped into 1…max_batch; max_batch itself before a knee is known), max
    max_batch."""
    if max_batch < 1:
        raise ValueError(f"max_batch must be at least 1, got {max_batch}")
    opt = max_batch if knee is None else min(max(1, int(knee)), max_batch)
    return Profile(1, opt, max_batch)


@dataclass(frozen=True)
class Device:
    """The GPU a plan is built for (plans do not move between GPU models or TensorRT versions)."""

    name: str
    compute_capability: str  # "9.0"

    @classmethod
    def current(cls) -> Device:
        import pycuda.driver as cuda

        cuda.init()
        device = cuda.Device(0)
        major, minor = device.compute_capability()
        return cls(device.name(), f"{major}.{minor}")


@dataclass(frozen=True)
class PlanKey:
    """Everything a serialized plan depends on; its digest names the plan file."""

    tensorrt: str
    gpu: str
    compute_capability: str
    onnx_sha256: str
    profile: Profile
    precision: str

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:16]

    def filename(self) -> str:
        p = self.profile
        return f"trt-{self.precision}-b{p.min}-{p.opt}-{p.max}-{self.digest()}.plan"

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def plan_key(onnx_sha256: str, profile: Profile, precision: str, device: Device | None = None,
             tensorrt_version: str | None = None) -> PlanKey:
    """The key of the plan for this graph on this host's GPU and TensorRT."""
    if precision not in PRECISIONS:
        raise ValueError(f"TensorRT precision must be one of {PRECISIONS}, got {precision!r}")
    if tensorrt_version is None:
        import tensorrt as trt

        tensorrt_version = trt.__version__
    device = device or Device.current()
    return PlanKey(tensorrt_version, device.name, device.compute_capability, onnx_sha256, profile, precision)


def timing_cache_path(folder: Path, key: PlanKey) -> Path:
    """One timing cache per TensorRT version and GPU, shared by every plan built there."""
    slug = "".join(ch if ch.isalnum() else "-" for ch in key.gpu).strip("-").lower()
    return folder / f"timing-{key.tensorrt}-{slug}-sm{key.compute_capability}.cache"


# --- the graphs TensorRT builds from --------------------------------------------------------------------------------


def fp16_graph(fp32: Path, out: Path) -> Path:
    """The FP32 graph with float16 weights and activations; uint8 input and float32 output unchanged."""
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = convert_float_to_float16(onnx.load(str(fp32)), keep_io_types=True)
    onnx.checker.check_model(model, full_check=True)
    with atomic_path(out) as tmp:
        onnx.save(model, str(tmp))
    return out


def int8_graph(fp32: Path, out: Path, calibration: np.ndarray) -> Path:
    """A Q/DQ INT8 graph TensorRT accepts: int8 activations with zero-points 0, per-channel int8 weights."""
    from models.quantize import quantize_int8

    return quantize_int8(fp32, out, calibration, "s8s8", per_channel=True, symmetric_activations=True)


# --- build ----------------------------------------------------------------------------------------------------------


def build_plan(onnx_path: Path, profile: Profile, channels: int, cache_file: Path,
               workspace_bytes: int = 1 << 30) -> bytes:
    """A serialized TensorRT plan for `onnx_path` (strongly typed: precision comes from the graph)."""
    import tensorrt as trt

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    # On 10.x this opts into strong typing; on 11.x the flag is accepted and ignored (always strongly typed).
    flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(Path(onnx_path).read_bytes()):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeError(f"TensorRT could not parse {onnx_path}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_bytes)
    cache = config.create_timing_cache(cache_file.read_bytes() if cache_file.is_file() else b"")
    config.set_timing_cache(cache, ignore_mismatch=False)
    shape_profile = builder.create_optimization_profile()
    shape_profile.set_shape(INPUT_NAME, *profile.shapes(channels))
    config.add_optimization_profile(shape_profile)
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise RuntimeError(f"TensorRT failed to build a plan for {onnx_path} (profile {profile}); see its log above")
    atomic_write_bytes(cache_file, bytes(memoryview(config.get_timing_cache().serialize())))
    return bytes(plan)


def engine_from_onnx(onnx_path: Path, precision: str, channels: int, profile: Profile,
                     timing_dir: Path) -> TensorRTEngine:
    """A TensorRT engine for a graph, its plan built now (not cached: the registry caches the plans it ships)."""
    key = plan_key(hashlib.sha256(Path(onnx_path).read_bytes()).hexdigest(), profile, precision)
    plan = build_plan(onnx_path, profile, channels, timing_cache_path(timing_dir, key))
    return TensorRTEngine(plan, precision, channels, profile.max)


# --- inference ------------------------------------------------------------------------------------------------------


class _Slot:
    """One buffer set: page-locked host in/out, device in/out, and the events that say when it is free."""

    def __init__(self, cuda, max_batch: int, channels: int, out_dtype: np.dtype):
        self.host_in = cuda.pagelocked_empty((max_batch, channels, IMAGE_SIZE, IMAGE_SIZE), np.uint8)
        self.host_out = cuda.pagelocked_empty((max_batch,), out_dtype)
        self.device_in = cuda.mem_alloc(self.host_in.nbytes)
        self.device_out = cuda.mem_alloc(self.host_out.nbytes)
        self.uploaded = cuda.Event()
        self.done = cuda.Event()
        self.n = 0  # images in flight in this slot (0: free)


class _ThreadState:
    """One execution context and its streams and buffers, owned by one thread."""

    def __init__(self, cuda, engine, max_batch: int, channels: int, out_dtype: np.dtype):
        self.context = engine.create_execution_context()
        self.compute = cuda.Stream()
        self.copy = cuda.Stream()
        self.slots = [_Slot(cuda, max_batch, channels, out_dtype) for _ in range(2)]


class TensorRTEngine:
    """A TensorRT plan behind `Engine`: uint8 N×C×64×64 in, float32 probabilities out, any N.

    Batches above the plan's max are split; the pieces alternate between two buffer slots.
    """

    name = "tensorrt"

    def __init__(self, plan: bytes, precision: str, channels: int, max_batch: int):
        import pycuda.driver as cuda
        import tensorrt as trt

        cuda.init()
        self._cuda = cuda
        self._ctx = cuda.Device(0).retain_primary_context()
        self.precision = precision
        self.channels = channels
        self.max_batch = max_batch
        self.threads = 1
        self._ctx.push()
        try:
            self._runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
            self.engine = self._runtime.deserialize_cuda_engine(plan)
            if self.engine is None:
                raise RuntimeError("TensorRT could not deserialize the plan (built by another TensorRT or GPU?)")
            self._out_dtype = np.dtype(trt.nptype(self.engine.get_tensor_dtype(OUTPUT_NAME)))
        finally:
            self._ctx.pop()
        self._local = threading.local()

    def _state(self) -> _ThreadState:
        state = getattr(self._local, "state", None)
        if state is None:
            state = self._local.state = _ThreadState(self._cuda, self.engine, self.max_batch, self.channels,
                                                     self._out_dtype)
        return state

    def infer(self, pixels: np.ndarray) -> np.ndarray:
        if pixels.dtype != np.uint8 or pixels.ndim != 4 or pixels.shape[1:] != (self.channels, IMAGE_SIZE, IMAGE_SIZE):
            raise ValueError(f"engine input must be uint8 N×{self.channels}×{IMAGE_SIZE}×{IMAGE_SIZE}, got "
                             f"{pixels.dtype} {pixels.shape}")
        cuda = self._cuda
        self._ctx.push()
        try:
            state = self._state()
            out = np.empty(len(pixels), np.float32)
            pending: list[tuple[_Slot, int]] = []  # (slot, offset into out), oldest first
            for i, start in enumerate(range(0, len(pixels), self.max_batch)):
                slot = state.slots[i % 2]
                if slot.n:  # the batch two back still owns this slot: collect it first
                    self._collect(*pending.pop(0), out)
                n = min(self.max_batch, len(pixels) - start)
                slot.host_in[:n] = pixels[start: start + n]  # host staging overlaps the other slot's compute
                cuda.memcpy_htod_async(slot.device_in, slot.host_in[:n], state.copy)
                slot.uploaded.record(state.copy)
                state.compute.wait_for_event(slot.uploaded)
                state.context.set_input_shape(INPUT_NAME, (n, self.channels, IMAGE_SIZE, IMAGE_SIZE))
                state.context.set_tensor_address(INPUT_NAME, int(slot.device_in))
                state.context.set_tensor_address(OUTPUT_NAME, int(slot.device_out))
                if not state.context.execute_async_v3(state.compute.handle):
                    raise RuntimeError("TensorRT failed to enqueue inference")
                cuda.memcpy_dtoh_async(slot.host_out[:n], slot.device_out, state.compute)
                slot.done.record(state.compute)
                slot.n = n
                pending.append((slot, start))
            for slot, start in pending:
                self._collect(slot, start, out)
            return out
        finally:
            self._ctx.pop()

    @staticmethod
    def _collect(slot: _Slot, start: int, out: np.ndarray) -> None:
        slot.done.synchronize()
        out[start: start + slot.n] = slot.host_out[: slot.n]
        slot.n = 0
