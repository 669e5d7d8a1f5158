"""TensorRT: what can be tested on any host (the import guard, the auto choice, profile shapes from the knee, plan
cache keys, the FP16 and symmetric INT8 graphs it builds from, which shipped engine a host screens with), and the
engine itself on a GPU host with the `gpu` extra (skipped elsewhere, with the reason)."""

from __future__ import annotations

import subprocess
import sys
import threading
from dataclasses import replace

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from session_env import ENV

from models import tensorrt
from models.engine import OrtEngine, resolve_engine, scores
from models.registry import GateFailed, ModelNotFound, Registry
from models.tensorrt import Device, PlanKey, Profile, TensorRTUnavailable, plan_key, profile_for
from tasks.lake import Lake

WHY_NOT = tensorrt.missing()
needs_gpu = pytest.mark.skipif(WHY_NOT is not None, reason=f"TensorRT cannot run here: {WHY_NOT}")
no_gpu = pytest.mark.skipif(WHY_NOT is None, reason="this host can run TensorRT")


def pixels(n: int, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, 1, 64, 64), dtype=np.uint8)


# --- without a GPU ---------------------------------------------------------------------------------------------------


@no_gpu
def test_engine_tensorrt_without_a_gpu_fails_with_one_line_and_auto_picks_onnxruntime():
    with pytest.raises(TensorRTUnavailable) as err:
        resolve_engine("tensorrt")
    message = str(err.value)
    assert "\n" not in message and WHY_NOT in message and "pip install -e '.[gpu]'" in message
    assert resolve_engine("auto") == "onnxruntime"
    assert resolve_engine("onnxruntime") == "onnxruntime"
    with pytest.raises(ValueError, match="auto, onnxruntime, openvino, tensorrt"):
        resolve_engine("cuda")


@no_gpu
def test_the_cli_refuses_engine_tensorrt_before_starting_anything(tmp_path):
    for command in (["screen"], ["optimize", "--epochs", "1"]):
        done = subprocess.run([sys.executable, "-m", "screenline.cli", *command, "--lake", str(tmp_path / "lake"),
                               "--engine", "tensorrt"], check=False, capture_output=True, text=True, env=ENV,
                              timeout=120)
        assert done.returncode == 2
        assert done.stderr.strip().startswith("screenline: error: engine=tensorrt needs an NVIDIA GPU")
        assert len(done.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "lake").exists()


def test_profile_takes_the_knee_as_opt_within_one_to_max_batch():
    assert profile_for(64, 512) == Profile(1, 64, 512)
    assert profile_for(None, 256) == Profile(1, 256, 256)  # before a knee is measured: tuned for the top
    assert profile_for(4096, 512).opt == 512 and profile_for(0, 512).opt == 1
    assert Profile(1, 64, 512).shapes(3) == ((1, 3, 64, 64), (64, 3, 64, 64), (512, 3, 64, 64))
    with pytest.raises(ValueError, match="max_batch"):
        profile_for(16, 0)


def test_plan_keys_change_with_everything_a_plan_depends_on():
    gpu = Device("NVIDIA H100 80GB HBM3", "9.0")
    key = plan_key("ab" * 32, Profile(1, 64, 512), "fp16", gpu, "10.13.0")
    assert key == plan_key("ab" * 32, Profile(1, 64, 512), "fp16", gpu, "10.13.0")
    assert key.filename().startswith("trt-fp16-b1-64-512-") and key.filename().endswith(".plan")
    variants = [
        replace(key, tensorrt="11.4.0"), replace(key, gpu="NVIDIA L4"), replace(key, compute_capability="8.9"),
        replace(key, onnx_sha256="cd" * 32), replace(key, profile=Profile(1, 32, 512)), replace(key, precision="int8"),
    ]
    names = {key.filename(), *(v.filename() for v in variants)}
    assert len(names) == 1 + len(variants)
    with pytest.raises(ValueError, match="precision"):
        plan_key("ab" * 32, Profile(1, 1, 1), "int4", gpu, "10.13.0")
    cache = tensorrt.timing_cache_path(Lake.at("/l").models / "tensorrt", key)
    assert cache.name == "timing-10.13.0-nvidia-h100-80gb-hbm3-sm9.0.cache"
    assert PlanKey(**{**key.as_dict(), "profile": Profile(**key.as_dict()["profile"])}) == key


def test_fp16_graph_keeps_uint8_in_and_float32_out_and_tracks_fp32(fp32_graph, tmp_path):
    path = tensorrt.fp16_graph(fp32_graph, tmp_path / "model-fp16.onnx")
    graph = onnx.load(str(path))
    assert graph.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.UINT8
    assert graph.graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    weights = [i for i in graph.graph.initializer if i.data_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16)]
    assert weights and all(i.data_type == onnx.TensorProto.FLOAT16 for i in weights)
    x = pixels(64)
    diff = np.abs(scores(OrtEngine(path, "fp16"), x) - scores(OrtEngine(fp32_graph), x)).max()
    assert diff < 0.01


def test_int8_graph_for_tensorrt_has_symmetric_activations(fp32_graph, tmp_path):
    path = tensorrt.int8_graph(fp32_graph, tmp_path / "model-int8-trt.onnx", pixels(128, seed=2))
    graph = onnx.load(str(path))
    init = {i.name: i for i in graph.graph.initializer}
    quantizers = [n for n in graph.graph.node if n.op_type == "QuantizeLinear"]
    assert quantizers
    for node in quantizers:
        zero_point = numpy_helper.to_array(init[node.input[2]])
        assert zero_point.dtype == np.int8 and not zero_point.any(), node.name
    x = pixels(64)
    assert np.abs(scores(OrtEngine(path, "int8"), x) - scores(OrtEngine(fp32_graph), x)).max() < 0.05


@pytest.fixture
def gpu_shipped_registry(tmp_path) -> Registry:
    """A version as a GPU optimize registers it: TensorRT ships, ONNX Runtime is the CPU fallback."""
    registry = Registry(Lake(tmp_path / "lake"))
    folder = registry.folder("sn-gpu")
    folder.mkdir(parents=True)
    for name in ("model-fp16.onnx", "model-fp32.onnx"):
        (folder / name).write_bytes(name.encode())
    registry.register("sn-gpu", {
        "architecture": {"channels": 1},
        "shipping": {"engine": "tensorrt", "candidate": "trt-fp16", "precision": "fp16", "file": "model-fp16.onnx",
                     "threshold": 0.3},
        "fallback": {"engine": "onnxruntime", "candidate": "fp32", "precision": "fp32", "file": "model-fp32.onnx",
                     "threshold": 0.25, "passed_gate": True, "verdict": "reaches the target"},
        "passed_gate": True,
    })
    registry.promote("sn-gpu")
    return registry


@no_gpu
def test_a_cpu_host_screens_a_gpu_version_with_its_own_onnxruntime_threshold(gpu_shipped_registry):
    registry = gpu_shipped_registry
    for engine in ("auto", "onnxruntime"):
        pick = registry.pick(engine=engine)
        assert (pick.shipped.engine, pick.threshold, pick.version) == ("onnxruntime", 0.25, "sn-gpu")
    with pytest.raises(TensorRTUnavailable):
        registry.pick(engine="tensorrt")
    manifest = registry.manifest("sn-gpu")
    manifest.fallback.passed_gate = False
    registry.register("sn-gpu", manifest)
    with pytest.raises(GateFailed, match="did not pass its held-out sensitivity gate"):
        registry.pick(engine="auto")


def test_a_cpu_version_ships_onnxruntime_everywhere(tmp_path):
    registry = Registry(Lake(tmp_path / "lake"))
    registry.folder("sn-cpu").mkdir(parents=True)
    registry.register("sn-cpu", {"shipping": {"engine": "onnxruntime", "candidate": "fp32", "precision": "fp32",
                                              "file": "model-fp32.onnx", "threshold": 0.2}, "passed_gate": True})
    assert registry.pick("sn-cpu", "auto").shipped.engine == "onnxruntime"
    assert registry.pick("sn-cpu", "onnxruntime").threshold == 0.2
    if WHY_NOT is None:  # a GPU host: TensorRT was asked for, but this version has no TensorRT threshold
        with pytest.raises(ModelNotFound, match="optimize --engine tensorrt"):
            registry.pick("sn-cpu", "tensorrt")


# --- on a GPU ---------------------------------------------------------------------------------------------------------


@needs_gpu
@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["fp32", "fp16", "int8"])
def test_tensorrt_scores_match_onnxruntime_for_any_batch_and_from_two_threads(fp32_graph, tmp_path, precision):
    graph = {"fp32": lambda: fp32_graph,
             "fp16": lambda: tensorrt.fp16_graph(fp32_graph, tmp_path / "fp16.onnx"),
             "int8": lambda: tensorrt.int8_graph(fp32_graph, tmp_path / "int8.onnx", pixels(256, seed=2))}[precision]()
    plan = tensorrt.build_plan(graph, Profile(1, 16, 32), 1, tmp_path / "timing.cache")
    assert (tmp_path / "timing.cache").stat().st_size > 0
    engine = tensorrt.TensorRTEngine(plan, precision, channels=1, max_batch=32)
    x = pixels(100)  # 32 + 32 + 32 + 4: four pieces through both buffer slots
    want = scores(OrtEngine(graph), x)
    tolerance = {"fp32": 1e-4, "fp16": 0.01, "int8": 0.05}[precision]
    got = engine.infer(x)
    assert got.shape == (100,) and np.abs(got - want).max() < tolerance
    assert np.abs(engine.infer(x[:1]) - want[:1]).max() < tolerance
    results = {}

    def worker(i: int) -> None:
        results[i] = engine.infer(x)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(np.array_equal(results[i], got) for i in range(2))


@needs_gpu
@pytest.mark.gpu
def test_plans_are_cached_per_key_and_a_tampered_plan_is_refused(fp32_graph, tmp_path):
    from models.registry import ModelIntegrityError

    registry = Registry(Lake(tmp_path / "lake"))
    folder = registry.folder("sn-trt")
    folder.mkdir(parents=True)
    (folder / "model-fp32.onnx").write_bytes(fp32_graph.read_bytes())
    registry.register("sn-trt", {"architecture": {"channels": 1}, "gates": {"max_batch": 32}})
    registry.tensorrt_engine("sn-trt", "model-fp32.onnx", "fp32", knee=16)
    plans = registry.manifest("sn-trt").plans
    (name, record), = plans.items()
    assert name.startswith("trt-fp32-b1-16-32-") and record["key"]["onnx_sha256"]
    plan = folder / "plans" / name
    built = plan.stat().st_mtime_ns
    registry.tensorrt_engine("sn-trt", "model-fp32.onnx", "fp32", knee=16)
    assert plan.stat().st_mtime_ns == built  # loaded, not rebuilt
    plan.write_bytes(plan.read_bytes()[:-1] + b"\0")
    with pytest.raises(ModelIntegrityError, match="does not match the sha256"):
        registry.tensorrt_engine("sn-trt", "model-fp32.onnx", "fp32", knee=16)
