"""Engine autotune: the CPU engines compete on the same graphs, the fastest candidate that passes every gate ships,
and a host that cannot run it screens with the ONNX Runtime fallback. Figures are hand-made: what is tested is the
choice, not the speed of this machine."""

from __future__ import annotations

import numpy as np
import pytest

from models import engine as engines
from models.engine import OpenVinoEngine, OrtEngine, competing_engines, runnable_engines, scores
from models.registry import Registry
from tasks.lake import Lake
from tasks.optimize import Candidate, choose, run_off

openvino = pytest.importorskip("openvino", reason="OpenVINO is a dependency; this host lacks it")


def candidate(name: str, engine: str, images_per_s: float, passes: bool = True) -> Candidate:
    precision = name.removeprefix("ov-").split("-")[0]
    return Candidate(name, f"model-{name.removeprefix('ov-')}.onnx", precision, engine, passes=passes,
                     why="passes" if passes else "val sensitivity 0.9700 below target 0.98",
                     knee={"batch": 64, "images_per_s": images_per_s})


MEASURED = [  # a VNNI host, as `make bench` found it: OpenVINO's S8S8 fastest, its U8S8 per-channel faster still but
    # failing a gate
    candidate("fp32", "onnxruntime", 5200),
    candidate("int8-u8s8-per-tensor", "onnxruntime", 6900),
    candidate("int8-s8s8-per-tensor", "onnxruntime", 3200),
    candidate("ov-fp32", "openvino", 4900),
    candidate("ov-int8-s8s8-per-tensor", "openvino", 12000),
    candidate("ov-int8-u8s8-per-channel", "openvino", 15000, passes=False),
]


def test_the_fastest_passing_candidate_of_any_competing_engine_ships_with_the_fastest_onnxruntime_fallback():
    ship, fallback = choose(MEASURED, ("onnxruntime", "openvino"))
    assert (ship.name, ship.engine) == ("ov-int8-s8s8-per-tensor", "openvino")  # not the faster one that failed
    assert (fallback.name, fallback.engine) == ("int8-u8s8-per-tensor", "onnxruntime")


def test_a_host_without_openvino_ships_onnxruntime_and_needs_no_fallback():
    ship, fallback = choose(MEASURED, ("onnxruntime",))
    assert (ship.name, fallback) == ("int8-u8s8-per-tensor", None)


def test_an_avx2_host_where_int8_is_slower_than_fp32_ships_what_wins_there():
    avx2 = [candidate("fp32", "onnxruntime", 1850), candidate("int8-u8s8-per-tensor", "onnxruntime", 1200),
            candidate("ov-fp32", "openvino", 1700), candidate("ov-int8-s8s8-per-tensor", "openvino", 1400)]
    ship, fallback = choose(avx2, ("onnxruntime", "openvino"))
    assert (ship.name, fallback) == ("fp32", None)
    avx2[2].knee["images_per_s"] = 2100  # OpenVINO's FP32 wins there instead: it ships, ONNX Runtime's FP32 falls back
    ship, fallback = choose(avx2, ("onnxruntime", "openvino"))
    assert (ship.name, fallback.name) == ("ov-fp32", "fp32")


def test_when_nothing_passes_the_first_engines_fp32_is_registered_and_fp32_falls_back():
    failing = [candidate(c.name, c.engine, c.knee["images_per_s"], passes=False) for c in MEASURED]
    ship, fallback = choose(failing, ("openvino", "onnxruntime"))
    assert (ship.name, fallback.name) == ("ov-fp32", "fp32")


class Named:
    """A stand-in engine that only carries its candidate's name (the run-off's windows are given, not timed)."""

    def __init__(self, name: str):
        self.name = name

    def infer(self, pixels: np.ndarray) -> np.ndarray:
        return np.zeros(len(pixels), np.float32)


def turns(speeds: dict[str, float], host=lambda _turn: 1.0):
    """`_window` in the run-off: images/s read from `speeds` by engine, times what the host gives the window (by its
    place in the whole run-off, counted from 0), and the order the windows ran in."""
    order: list[str] = []

    def window(engine, _x, _seconds):
        order.append(engine.name)
        return speeds[engine.name] * host(len(order) - 1)
    return window, order


def test_candidates_that_read_close_are_measured_again_in_turns_and_the_run_off_picks(monkeypatch):
    """The sweeps, run minutes apart, read OpenVINO's S8S8 fastest; measured in turns its U8S8 per-tensor graph is
    8% faster, and ships. ONNX Runtime's two close candidates are measured too (the fallback is chosen the same way);
    ONNX Runtime's S8S8 (more than 25% behind), and the failing graph, are not."""
    close = [*MEASURED, candidate("ov-int8-u8s8-per-tensor", "openvino", 10500),
             candidate("int8-u8s8-per-channel", "onnxruntime", 6500)]
    speeds = {"ov-int8-s8s8-per-tensor": 12000, "ov-int8-u8s8-per-tensor": 13000, "int8-u8s8-per-tensor": 6000,
              "int8-u8s8-per-channel": 6600, "fp32": 5200}
    window, order = turns(speeds, host=lambda turn: 0.5 if turn % 3 == 0 else 1.0)  # a neighbour, now and then
    monkeypatch.setattr(engines, "_window", window)
    measured = run_off(close, ("onnxruntime", "openvino"), lambda c: Named(c.name),
                       np.zeros((8, 1, 64, 64), np.uint8), seconds=0.01)
    assert sorted(measured) == sorted(speeds)  # fp32 (5,200) is within 25% of ONNX Runtime's fastest (6,900)
    assert len(order) == len(speeds) * engines.RUNOFF_ROUNDS
    assert len({order[r * len(speeds)] for r in range(engines.RUNOFF_ROUNDS)}) == len(speeds)  # each first once
    ship, fallback = choose(close, ("onnxruntime", "openvino"))
    assert (ship.name, fallback.name) == ("ov-int8-u8s8-per-tensor", "int8-u8s8-per-channel")
    assert ship.knee["runoff"]["share"] == 1.0 and ship.knee["runoff"]["rounds"] == engines.RUNOFF_ROUNDS
    assert "runoff" not in next(c for c in close if c.name == "int8-s8s8-per-tensor").knee


def test_a_single_close_candidate_needs_no_run_off(monkeypatch):
    monkeypatch.setattr(engines, "_window", lambda *_: pytest.fail("nothing to decide, nothing to measure"))
    alone = [candidate("fp32", "onnxruntime", 1850), candidate("int8-u8s8-per-tensor", "onnxruntime", 1200)]
    assert run_off(alone, ("onnxruntime",), lambda c: Named(c.name), np.zeros((8, 1, 64, 64), np.uint8), 0.01) == []
    assert choose(alone, ("onnxruntime",))[0].name == "fp32"


def test_competing_and_runnable_engines_follow_what_is_installed(monkeypatch):
    assert competing_engines("auto") == ("onnxruntime", "openvino")
    assert runnable_engines("auto") == ("openvino", "onnxruntime")
    assert competing_engines("onnxruntime") == ("onnxruntime",)  # asked for by name: alone
    monkeypatch.setattr(engines, "openvino_missing", lambda: "OpenVINO is not installed (pip install openvino)")
    assert competing_engines("auto") == ("onnxruntime",) and runnable_engines("auto") == ("onnxruntime",)
    with pytest.raises(engines.EngineUnavailable, match="engine=openvino: OpenVINO is not installed"):
        competing_engines("openvino")


@pytest.fixture
def openvino_version(tmp_path, fp32_graph) -> Registry:
    """A version as an optimize on an OpenVINO host registers it: OpenVINO ships, ONNX Runtime falls back."""
    import shutil

    registry = Registry(Lake(tmp_path / "lake"))
    folder = registry.folder("sn-ov")
    folder.mkdir(parents=True)
    shutil.copy(fp32_graph, folder / "model-fp32.onnx")
    registry.register("sn-ov", {
        "architecture": {"channels": 1},
        "shipping": {"engine": "openvino", "candidate": "ov-fp32", "precision": "fp32", "file": "model-fp32.onnx",
                     "threshold": 0.31},
        "fallback": {"engine": "onnxruntime", "candidate": "fp32", "precision": "fp32", "file": "model-fp32.onnx",
                     "threshold": 0.3, "passed_gate": True, "verdict": "reaches the target"},
        "passed_gate": True,
    })
    registry.promote("sn-ov")
    return registry


def test_a_host_with_openvino_screens_with_it_and_one_without_falls_back_at_its_own_threshold(openvino_version,
                                                                                          monkeypatch):
    registry = openvino_version
    pick = registry.pick(engine="auto")
    assert (pick.shipped.engine, pick.threshold) == ("openvino", 0.31)
    assert isinstance(registry.load_shipped("sn-ov", pick.shipped, threads=1), OpenVinoEngine)
    assert registry.pick(engine="onnxruntime").threshold == 0.3
    monkeypatch.setattr(engines, "openvino_missing", lambda: "OpenVINO is not installed (pip install openvino)")
    pick = registry.pick(engine="auto")
    assert (pick.shipped.engine, pick.threshold) == ("onnxruntime", 0.3)
    assert isinstance(registry.load_shipped("sn-ov", pick.shipped, threads=1), OrtEngine)


def test_openvino_scores_the_same_graph_as_onnxruntime(fp32_graph):
    x = np.random.default_rng(3).integers(0, 256, (300, 1, 64, 64), dtype=np.uint8)
    np.testing.assert_allclose(scores(OpenVinoEngine(fp32_graph, threads=1), x, batch=64),
                               scores(OrtEngine(fp32_graph, threads=1), x, batch=64), rtol=0, atol=1e-5)


def test_an_openvino_engine_for_two_callers_runs_them_on_two_streams_with_the_same_scores(fp32_graph):
    """Two shard tasks calling one engine at once: one stream would run their requests one after the other on one
    thread (the screen flow ran at half speed so); two streams of one thread each keep both cores busy."""
    from concurrent.futures import ThreadPoolExecutor

    engine = OpenVinoEngine(fp32_graph, threads=1, callers=2)
    assert (engine.compiled.get_property("NUM_STREAMS"), engine.compiled.get_property("INFERENCE_NUM_THREADS")) \
        == (2, 2)
    assert OpenVinoEngine(fp32_graph, threads=2).compiled.get_property("NUM_STREAMS") == 1
    x = np.random.default_rng(4).integers(0, 256, (256, 1, 64, 64), dtype=np.uint8)
    with ThreadPoolExecutor(2) as pool:
        halves = list(pool.map(lambda part: scores(engine, part, batch=32), (x[:128], x[128:])))
    np.testing.assert_allclose(np.concatenate(halves), scores(OrtEngine(fp32_graph, threads=1), x, batch=64),
                               rtol=0, atol=1e-5)


def test_an_openvino_engine_compiled_for_its_batch_pads_fewer_and_chunks_more_with_the_same_scores(fp32_graph):
    """Screening compiles the knee's batch (static shapes, less memory a stream): a shard's last images are padded
    to it and more than a batch run in chunks, each image scored as the dynamic graph scores it."""
    x = np.random.default_rng(5).integers(0, 256, (70, 1, 64, 64), dtype=np.uint8)
    dynamic = OpenVinoEngine(fp32_graph, threads=1)
    static = dynamic.at_batch(32)
    assert static.batch == 32 and dynamic.batch is None
    assert list(static.compiled.inputs[0].get_partial_shape()) == [32, 1, 64, 64]
    expected = dynamic.infer(x)
    for n in (70, 32, 5, 1):
        np.testing.assert_allclose(static.infer(x[:n]), expected[:n], rtol=0, atol=1e-5)
    assert static.infer(x[:0]).shape == (0,)
    with pytest.raises(ValueError, match="batch must be at least 1"):
        OpenVinoEngine(fp32_graph, batch=0)


def test_the_registry_compiles_openvino_for_the_batch_it_is_asked_for(openvino_version):
    pick = openvino_version.pick(engine="openvino")
    assert openvino_version.load_shipped("sn-ov", pick.shipped, threads=1, batch=48).batch == 48
    assert openvino_version.load_shipped("sn-ov", pick.shipped, threads=1).batch is None


def test_a_compiled_engine_is_cached_on_the_host_and_imported_with_the_same_scores(fp32_graph, tmp_path):
    """The second engine of a key imports what the first compiled (screen's first cost: 0.07 s, not 0.29); another
    batch or thread count is another key; a damaged file is compiled again and replaced, not imported."""
    from screenline.files import sha256_file

    cache, digest = tmp_path / "engines", sha256_file(fp32_graph)
    x = np.random.default_rng(6).integers(0, 256, (40, 1, 64, 64), dtype=np.uint8)
    first = OpenVinoEngine(fp32_graph, threads=1, callers=2, batch=32, cache=cache, sha256=digest)
    assert first.source == "cached"
    (stored,) = cache.glob("ov-*.blob")
    again = OpenVinoEngine(fp32_graph, threads=1, callers=2, batch=32, cache=cache, sha256=digest)
    assert again.source == "imported" and (again.batch, again.channels) == (32, 1)
    assert again.compiled.get_property("NUM_STREAMS") == 2
    np.testing.assert_array_equal(again.infer(x), first.infer(x))
    assert OpenVinoEngine(fp32_graph, threads=1, callers=2, batch=16, cache=cache, sha256=digest).source == "cached"
    assert OpenVinoEngine(fp32_graph, threads=2, batch=32, cache=cache, sha256=digest).source == "cached"
    assert len(list(cache.glob("ov-*.blob"))) == 3
    assert OpenVinoEngine(fp32_graph, threads=1, callers=2, cache=cache, sha256=digest).source == "compiled"  # dynamic
    damaged = bytearray(stored.read_bytes())
    damaged[-100] ^= 0xFF
    stored.write_bytes(bytes(damaged))
    rebuilt = OpenVinoEngine(fp32_graph, threads=1, callers=2, batch=32, cache=cache, sha256=digest)
    assert rebuilt.source == "cached" and stored.read_bytes() != bytes(damaged)
    np.testing.assert_array_equal(rebuilt.infer(x), first.infer(x))


def test_engines_not_used_for_a_month_are_pruned_when_another_is_stored(fp32_graph, tmp_path):
    """The cache keeps what screening imports: an import renews an engine's time, and storing a new engine deletes
    the ones not used for ENGINE_CACHE_DAYS (a version no longer screened with, an old batch)."""
    import os
    import time

    from models.engine import ENGINE_CACHE_DAYS
    from screenline.files import sha256_file

    cache, digest = tmp_path / "engines", sha256_file(fp32_graph)
    month = time.time() - (ENGINE_CACHE_DAYS + 1) * 86400
    OpenVinoEngine(fp32_graph, threads=1, batch=8, cache=cache, sha256=digest)
    (used,) = cache.glob("ov-*.blob")
    OpenVinoEngine(fp32_graph, threads=1, batch=16, cache=cache, sha256=digest)
    (unused,) = set(cache.glob("ov-*.blob")) - {used}
    for blob in (used, unused):
        os.utime(blob, (month, month))
    assert OpenVinoEngine(fp32_graph, threads=1, batch=8, cache=cache, sha256=digest).source == "imported"
    assert used.stat().st_mtime > month + 86400  # renewed by the import
    OpenVinoEngine(fp32_graph, threads=1, batch=24, cache=cache, sha256=digest)  # stores a third: prunes
    assert used.exists() and not unused.exists() and len(list(cache.glob("ov-*.blob"))) == 2


def test_the_registry_keeps_screens_openvino_engine_in_the_hosts_cache(openvino_version, tmp_path, monkeypatch):
    monkeypatch.setenv("SCREENLINE_ENGINE_CACHE", str(tmp_path / "engines"))
    pick = openvino_version.pick(engine="openvino")
    assert openvino_version.load_shipped("sn-ov", pick.shipped, threads=1, batch=48).source == "cached"
    assert openvino_version.load_shipped("sn-ov", pick.shipped, threads=1, batch=48).source == "imported"
    assert not list((tmp_path / "lake").rglob("*.blob"))  # on the host, not in the lake
    monkeypatch.setenv("SCREENLINE_ENGINE_CACHE", "off")
    assert openvino_version.load_shipped("sn-ov", pick.shipped, threads=1, batch=48).source == "compiled"


def test_an_openvino_engine_makes_its_first_call_before_any_callers(fp32_graph):
    """OpenVINO's binding deadlocks when two threads make a process's first calls at once (one shard task's first
    call waits on a static the other's holds, which waits on the GIL): every engine's first call is made when it is
    built, in the thread that builds it, under one lock, before a shard task can call it."""
    from concurrent.futures import ThreadPoolExecutor

    for engine in (OpenVinoEngine(fp32_graph, threads=1, callers=2, batch=8), OpenVinoEngine(fp32_graph, threads=1)):
        assert getattr(engine._local, "request", None) is not None  # this thread has called it
        with ThreadPoolExecutor(1) as pool:
            assert pool.submit(lambda: getattr(engine._local, "request", None)).result() is None
