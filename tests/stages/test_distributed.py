"""Timing on a device pool (Ray, issue 16): the same table and plan as the local loop, one job
per subgraph on one device, the on-disk cache shared with local runs, a lost worker's job
retried on another, and one line saying how to get Ray when it is missing.

The pool tests run on a local Ray cluster (``ray.init(num_cpus=2)``) with a paced backend:
each configuration sleeps a fixed time and gets a time from a formula of its label, so the
tables are exact and the tests are fast. They are skipped when Ray is not installed (CI
installs the base package and the test extra only).
"""

from __future__ import annotations

import os
import sys
import time

import numpy as np
import pytest

import models
from ampq_pass.backends.ray_pool import RayAddress, RayPool, device_resource, pool_devices, require_ray
from ampq_pass.core.cache import Cache
from ampq_pass.core.errors import AmpqError
from ampq_pass.core.measure import Backend, Capabilities, Timing
from ampq_pass.core.samples import Samples
from ampq_pass.stages.calibrate import compute_ranges
from ampq_pass.stages.layers import find_layers
from ampq_pass.stages.partition import partition
from ampq_pass.stages.solve import Option, solve
from ampq_pass.stages.subgraphs import capture_inputs
from ampq_pass.stages.timing import gain_table, time_subgraph

try:
    import ray
except ImportError:  # pragma: no cover - CI without the [ray] extra
    ray = None

needs_ray = pytest.mark.skipif(ray is None, reason="ray is not installed (pip install 'ampq-pass[ray]')")


class Paced(Backend):
    """Sleeps ``delay`` seconds per configuration (a device busy timing it) and reports
    1 ms minus 0.1 ms per quantized layer, read from the configuration's label. With
    ``crash_flag``, the first worker to remove that file dies in the middle of a job."""

    name, unit = "paced", "s"

    def __init__(self, delay: float = 0.02, crash_flag: str | None = None, key_extra: object = None):
        self.delay, self.crash_flag, self.key_extra = delay, crash_flag, key_extra

    def capabilities(self):
        return Capabilities(("int8",), "fp32", "paced")

    def key(self):
        extra = os.getpid() if self.key_extra == "pid" else self.key_extra
        return {"backend": "paced", "delay": self.delay, "extra": extra}

    def time(self, models, inputs):
        if self.crash_flag:
            try:
                os.unlink(self.crash_flag)
            except FileNotFoundError:
                pass
            else:
                os._exit(1)
        time.sleep(self.delay * len(models))
        return {label: Timing.of([1e-3 * (1 - 0.1 * label.count("="))] * 5) for label in models}


@pytest.fixture(scope="module")
def cluster():
    if ray is None:
        pytest.skip("ray is not installed (pip install 'ampq-pass[ray]')")
    # the workers cannot import this test module: ship its classes by value
    ray.cloudpickle.register_pickle_by_value(sys.modules[Paced.__module__])
    ray.init(num_cpus=2, include_dashboard=False, logging_level="warning",
             resources={device_resource("paced", i): 1 for i in range(4)})
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def pool(cluster):
    """Two actors on two of the four device units (starting actors is the slow part: shared)."""
    with RayPool(Paced(), address="local", workers=2) as pool:
        yield pool


@pytest.fixture(scope="module")
def setup():
    model = models.cnn()  # 4 subgraphs
    layers = find_layers(model)
    feeds = models.feeds_for(model, n=8)
    ranges = compute_ranges(model, layers, Samples(feeds))
    formats = {l.name: [f for f in l.formats if f == "int8"] for l in layers}
    part = partition(model, layers, formats=formats, max_configs=8)
    captured = capture_inputs(model, part, Samples(feeds), batch_size=8)
    return model, layers, ranges, part, captured


def table_of(setup, backend, **kw):
    model, layers, ranges, part, captured = setup
    return gain_table(model, layers, part, ranges, captured, backend, progress=False, **kw)


def strip(table) -> list[dict]:
    return [{k: v for k, v in s.to_json().items() if k != "cached"} for s in table.subgraphs]


def plan_of(table) -> dict[str, str]:
    """Solve with fixed made-up sensitivities (layer i costs i+1 when quantized)."""
    layers = sorted({l for s in table.subgraphs for l in s.layers})
    cost = {l: float(i + 1) for i, l in enumerate(layers)}
    options = [[Option(c.formats, c.gain, sum(cost[l] for l, f in c.formats.items() if f != "hp"))
                for c in s.configs] for s in table.subgraphs]
    return solve(options, max_mse=sum(cost.values()) / 2).plan.formats


# ----------------------------------------------------------------------------- no Ray needed

def test_missing_ray_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray -> ImportError
    with pytest.raises(AmpqError, match=r"pip install 'ampq-pass\[ray\]'") as err:
        require_ray()
    assert "\n" not in str(err.value)


def test_ray_address_constraint():
    ok, check = RayAddress(), RayAddress().accepts
    assert all(check(a) for a in ("local", "auto", "ray://head:10001", "10.0.0.5:6379", "ray://[::1]:10001"))
    assert not any(check(a) for a in ("", "head", "ray://head", "http://head:80 x", 3, None))
    from ampq_pass.pipeline import PassOptions

    with pytest.raises(AmpqError, match="ray must be local, auto"):
        PassOptions(ray="somewhere").validate()
    assert PassOptions(ray="auto").validate().ray == "auto" and PassOptions().validate().ray is None
    assert "ray://HOST:PORT" in ok.describe()


def test_devices_are_counted_per_unit_across_nodes():
    resources = {"CPU": 8.0, "ort:cpu:0": 3.0, "ort:cuda:0": 2.0, "ort:cuda:1": 2.0, "ort:cpu:x": 1.0}
    assert pool_devices("ort:cpu", resources) == [("ort:cpu:0", 0)] * 3
    assert pool_devices("ort:cuda", resources) == [("ort:cuda:0", 0)] * 2 + [("ort:cuda:1", 1)] * 2
    assert pool_devices("gaudi", resources) == []


def test_cli_without_ray_is_one_line(tmp_path, monkeypatch, capsys):
    import onnx

    from ampq_pass.cli.main import main

    path = tmp_path / "m.onnx"
    onnx.save(models.mlp(), path)
    monkeypatch.setitem(sys.modules, "ray", None)
    code = main([str(path), "-o", str(tmp_path / "out.onnx"), "--ray", "local", "--no-progress",
                 "--cache-dir", str(tmp_path / "cache")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err[-1] == "ampq-pass: error: --ray needs Ray, which is not installed here: " \
                                    "pip install 'ampq-pass[ray]'"


# ----------------------------------------------------------------------------- on a local cluster

@needs_ray
def test_pool_gives_the_local_table_and_plan(pool, setup):
    local = table_of(setup, Paced())
    assert len(pool) == 2 and len(set(pool.where)) == 2  # one actor per device unit
    pooled = table_of(setup, Paced(), pool=pool)
    assert len(local.subgraphs) == 4
    assert strip(pooled) == strip(local)
    assert [s.index for s in pooled.subgraphs] == [s.index for s in local.subgraphs]
    plan = plan_of(local)
    assert plan and plan_of(pooled) == plan


@needs_ray
def test_pool_shares_the_cache_with_local_runs(pool, setup, tmp_path):
    cache = Cache(tmp_path)
    first = table_of(setup, Paced(), pool=pool, cache=cache)
    assert not any(s.cached for s in first.subgraphs)
    entries = sorted((tmp_path / "gain").glob("*.json"))
    assert len(entries) == len(first.subgraphs)
    entries[1].unlink()  # as if the run had been killed before that subgraph finished
    resumed = table_of(setup, Paced(), pool=pool, cache=cache)
    assert sum(not s.cached for s in resumed.subgraphs) == 1 and strip(resumed) == strip(first)
    # the local loop reads the pool's entries: same key, same content
    local = table_of(setup, Paced(), cache=cache)
    assert all(s.cached for s in local.subgraphs) and strip(local) == strip(first)


@needs_ray
def test_lost_worker_job_is_retried_on_another(cluster, setup, tmp_path):
    flag = tmp_path / "crash"
    flag.write_text("")
    expected = strip(table_of(setup, Paced()))
    with RayPool(Paced(crash_flag=str(flag)), address="local", workers=2) as pool:
        table = table_of(setup, Paced(crash_flag=str(flag)), pool=pool)
        assert len(pool) == 1  # the worker that died left the pool
    assert not flag.exists() and strip(table) == expected


@needs_ray
def test_worker_timing_differently_is_refused(cluster):
    with pytest.raises(AmpqError, match="times paced differently from this machine .*extra"):
        RayPool(Paced(key_extra="pid"), address="local", workers=1)


@needs_ray
def test_error_in_a_job_is_raised_not_retried(pool):
    with pytest.raises(AmpqError, match="no captured inputs"):
        list(pool.map(_fail, [(0, ())]))
    assert len(pool) == 2


def _fail(backend):
    raise AmpqError("subgraph 0: no captured inputs to time it on")


@needs_ray
def test_no_device_resource_is_explained(cluster):
    class Other(Paced):
        name = "nodevice"

    with pytest.raises(AmpqError, match=r"ray start .*--resources='\{\"nodevice:0\": 1\}'"):
        RayPool(Other(), address="local")


@needs_ray
def test_devices_held_by_another_run_are_an_error_not_a_hang(pool):
    with pytest.raises(AmpqError, match="not all of their workers started within 2 s"):
        RayPool(Paced(), address="local", start_timeout=2)  # wants all 4 units; the shared pool holds 2
    with RayPool(Paced(), address="local", workers=2, start_timeout=60) as other:  # the 2 free ones
        assert len(other) == 2


@needs_ray
def test_sensitivity_on_the_pool_equals_the_local_run(pool, setup):
    """Calibration batches spread over the two workers; their per-layer sums added on the driver
    give the local values up to float summation order."""
    from ampq_pass.stages.sensitivity import sensitivity

    model, layers, ranges, _, _ = setup
    samples = Samples(models.feeds_for(model, n=12, seed=5))
    local = sensitivity(model, layers, ranges, samples, batch_size=4, progress=False)
    pooled = sensitivity(model, layers, ranges, samples, batch_size=4, progress=False, pool=pool)
    assert pooled.samples == local.samples == 12
    for layer in layers:
        for f, v in local.values[layer.name].items():
            assert pooled.values[layer.name][f] == pytest.approx(v, rel=1e-5), (layer.name, f)
    assert pooled.loss_sq_mean == pytest.approx(local.loss_sq_mean, rel=1e-6)
