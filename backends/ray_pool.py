"""Timing on a Ray cluster: one actor per device (design.md §5 "Scale-out", issue 16).

Every device that may time subgraphs is a unit of a Ray *custom resource* named after the
backend and the device, ``"<backend name>:<device index>"`` (``ort:cpu:0`` for a machine's
CPU, ``ort:cuda:0`` ... ``ort:cuda:3`` for the GPUs of a node; declared with
``ray start --resources='{"ort:cpu:0": 1}'``). :class:`RayPool` starts one actor per unit,
each holding one unit, so Ray never places two actors, and so never two timings, on one
device. :func:`ampq_pass.stages.timing.time_on_pool` sends one subgraph per job (all its
configurations interleaved on one device, as locally) and stores each result in the driver's
on-disk cache the moment it arrives; a worker that dies has its job sent to another.

Ray is optional (extra ``[ray]``) and imported only when a pool is opened; the scheduling is
Ray's (actors, ``ray.wait``), the only logic here is which device gets the next subgraph.
"""

from __future__ import annotations

import importlib
import os
import re
import socket
import time
from collections import Counter, deque
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator

from ampq_pass.core.errors import AmpqError
from ampq_pass.core.params import Constraint

INSTALL_HINT = "pip install 'ampq-pass[ray]'"

#: providers whose device index is chosen with CUDA_VISIBLE_DEVICES in the worker process
_CUDA_PROVIDERS = ("ort:cuda", "ort:tensorrt")


def require_ray():
    """The ``ray`` module, or an :class:`AmpqError` saying in one line how to install it."""
    try:
        import ray
    except ImportError:
        raise AmpqError(f"--ray needs Ray, which is not installed here: {INSTALL_HINT}") from None
    return ray


@dataclass(frozen=True)
class RayAddress(Constraint):
    """``local`` (start a one-machine cluster), ``auto`` (join the cluster this machine is
    part of), ``ray://HOST:PORT`` (Ray Client) or ``HOST:PORT`` (a head node's GCS)."""

    optional: bool = False

    def accepts(self, value) -> bool:
        return isinstance(value, str) and (value in ("local", "auto")
                                           or re.fullmatch(r"(ray://)?[A-Za-z0-9_.\-\[\]:]+:\d+", value) is not None)

    def describe(self) -> str:
        return "local, auto, ray://HOST:PORT or HOST:PORT"


def device_resource(backend_name: str, index: int) -> str:
    """The custom resource of device ``index`` for ``backend_name`` (``ort:cpu`` -> ``ort:cpu:0``)."""
    return f"{backend_name}:{index}"


def pool_devices(backend_name: str, resources: dict[str, float]) -> list[tuple[str, int]]:
    """``(resource, device index)`` once per unit of every resource of ``backend_name`` in
    ``resources`` (``ray.cluster_resources()``: units of one name on several nodes add up)."""
    pattern = re.compile(re.escape(backend_name) + r":(\d+)")
    out = []
    for name, amount in sorted(resources.items()):
        match = pattern.fullmatch(name)
        if match:
            out += [(name, int(match.group(1)))] * int(amount)
    return out


@dataclass(frozen=True)
class FromSpec:
    """Builds the backend named by ``spec`` in the worker process, on device ``index``."""

    spec: str

    def __call__(self, index: int):
        if self.spec.startswith(_CUDA_PROVIDERS):
            # in-process device 0 is then the device this actor holds, and the backend's key
            # (which names device 0) is the same on every device of the pool
            os.environ["CUDA_VISIBLE_DEVICES"] = str(index)
        from ampq_pass.backends import get_backend

        return get_backend(self.spec)


@dataclass(frozen=True)
class Shipped:
    """A backend object built by the caller (a custom or test backend), pickled to every worker."""

    backend: Any

    def __call__(self, index: int):
        return self.backend


#: modules every worker imports when it starts, so the first job does not pay for them (the
#: timing stage's imports take seconds, and all workers of one machine would pay at once)
PRELOAD = ("ampq_pass.stages.timing",)


class DeviceWorker:
    """The actor: one backend on one device; runs one job at a time (Ray's default)."""

    def __init__(self, make_backend: Callable[[int], Any], index: int, preload: tuple[str, ...] = PRELOAD):
        for name in preload:
            importlib.import_module(name)
        self.backend = make_backend(index)
        self.where = f"{socket.gethostname()} pid {os.getpid()} device {index}"

    def describe(self) -> tuple[dict, str]:
        return self.backend.key(), self.where

    def run(self, fn: Callable, *args):
        return fn(self.backend, *args)


class RayPool:
    """One Ray actor per device unit the cluster offers for ``backend``.

    ``backend`` is the driver's backend object: its ``name`` picks the resources and its
    ``key()`` must equal every worker's (the cache is keyed by it, and the gain table's other
    timings run on the driver), else the pool refuses. ``spec`` (e.g. ``"ort:cpu"``) makes each
    worker build its own backend; without it the object is pickled to the workers.
    ``address``: ``local`` starts a cluster on this machine with ``devices`` units (1: the
    machine is one device), anything else is passed to ``ray.init(address=...)``; an already
    initialised Ray is used as it is. ``workers`` caps the actors; ``max_attempts`` bounds how
    often one job is sent out when workers die under it; actors that cannot start within
    ``start_timeout`` seconds (their devices held by another run) are an error, not a hang.
    ``prefetch``: jobs queued per actor (see :meth:`map`).
    """

    def __init__(self, backend, *, spec: str | None = None, address: str = "local", devices: int = 1,
                 workers: int | None = None, max_attempts: int = 3, max_restarts: int = 0,
                 start_timeout: float = 300.0, prefetch: int = 2):
        ray = require_ray()
        self.name = getattr(backend, "name", "") or type(backend).__name__
        self.key = backend.key()
        self.max_attempts = max_attempts
        self.prefetch = max(1, prefetch)
        self._started = False
        if not ray.is_initialized():
            if address == "local":
                ray.init(num_cpus=os.cpu_count(), include_dashboard=False, logging_level="warning",
                         resources={device_resource(self.name, i): 1 for i in range(devices)})
            else:
                ray.init(address=address, logging_level="warning")
            self._started = True
        units = pool_devices(self.name, ray.cluster_resources())
        free = pool_devices(self.name, ray.available_resources())
        settle = time.monotonic() + 5.0  # devices of a pool closed a moment ago take a second to show as free
        while len(free) < min(workers or len(units), len(units)) and time.monotonic() < settle:
            time.sleep(0.2)
            free = pool_devices(self.name, ray.available_resources())
        units = free + list((Counter(units) - Counter(free)).elements())  # free devices first
        if not units:
            self.close()
            raise AmpqError(f"no node of the Ray cluster offers a device for {self.name}: start each worker with "
                            f"ray start --address=HEAD:6379 --resources='{{\"{device_resource(self.name, 0)}\": 1}}' "
                            f"(one resource per device)")
        units = units[:workers] if workers else units
        make = FromSpec(spec) if spec else Shipped(backend)
        # max_task_retries=0: a job is never re-run on the actor that lost it; map() sends it elsewhere
        actor = ray.remote(DeviceWorker)
        self.actors = [actor.options(num_cpus=0, resources={res: 1}, max_restarts=max_restarts, max_task_retries=0)
                       .remote(make, index) for res, index in units]
        self.where = self._check_workers(ray, start_timeout)

    def _check_workers(self, ray, timeout: float) -> list[str]:
        try:
            described = ray.get([a.describe.remote() for a in self.actors], timeout=timeout)
        except ray.exceptions.GetTimeoutError:
            n = len(self.actors)
            self.close()
            raise AmpqError(f"{n} {self.name} devices are offered but not all of their workers started within "
                            f"{timeout:g} s: is another run holding them?") from None
        except ray.exceptions.RayError as exc:
            self.close()
            cause = getattr(exc, "cause", None)
            raise AmpqError(f"a Ray worker could not start the {self.name} backend: {cause or exc}") from None
        for key, where in described:
            if key != self.key:
                fields = sorted(k for k in set(key) | set(self.key) if key.get(k) != self.key.get(k))
                self.close()
                raise AmpqError(f"the Ray worker on {where} times {self.name} differently from this machine "
                                f"({', '.join(f'{k}: {key.get(k)!r} vs {self.key.get(k)!r}' for k in fields)}); "
                                f"a pool's devices and library versions must match the driver's")
        return [where for _, where in described]

    def __len__(self) -> int:
        return len(self.actors)

    def map(self, fn: Callable, jobs: Iterable[tuple[Any, tuple]]) -> Iterator[tuple[Any, Any]]:
        """``(tag, fn(worker backend, *args))`` for every ``(tag, args)`` of ``jobs``, as they finish.

        An actor runs one job at a time (one timing per device); ``prefetch`` jobs wait in each
        actor's queue so that a device never idles while the driver prepares the next one, and
        ``jobs`` is read no further ahead than that, so the caller can prepare jobs lazily. A job
        whose actor dies is sent to another actor (at most ``max_attempts`` times in all); the
        dead actor leaves the pool. An exception raised by ``fn`` itself is raised here: it
        would fail on any device.
        """
        ray = require_ray()
        lost = (ray.exceptions.RayActorError, getattr(ray.exceptions, "ActorUnavailableError", ray.exceptions.RayActorError))
        source = iter(jobs)
        retry: deque = deque()
        attempts: dict[int, int] = {}
        queued = {id(a): 0 for a in self.actors}
        running: dict = {}
        exhausted = False
        try:
            while True:
                for depth in range(1, self.prefetch + 1):  # first one job per actor, then the queues
                    for actor in list(self.actors):
                        if queued[id(actor)] >= depth or exhausted and not retry:
                            continue
                        job = retry.popleft() if retry else next(source, None)
                        if job is None:
                            exhausted = True
                            continue
                        running[actor.run.remote(fn, *job[1])] = (actor, job)
                        queued[id(actor)] += 1
                if not running:
                    return
                (ref,), _ = ray.wait(list(running), num_returns=1)
                actor, job = running.pop(ref)
                queued[id(actor)] -= 1
                try:
                    result = ray.get(ref)
                except lost as exc:
                    if actor in self.actors:
                        self.actors.remove(actor)
                    attempts[id(job)] = attempts.get(id(job), 1) + 1
                    if attempts[id(job)] > self.max_attempts:
                        raise AmpqError(f"a job was lost with its Ray worker {self.max_attempts} times; finished "
                                        f"measurements are in the cache and a rerun resumes from them ({exc})") from None
                    if not self.actors:
                        raise AmpqError("every Ray worker of the pool was lost; finished measurements are in the "
                                        "cache and a rerun resumes from them") from None
                    retry.append(job)
                    continue
                except ray.exceptions.RayTaskError as exc:
                    cause = getattr(exc, "cause", None)
                    raise (cause if isinstance(cause, Exception) else exc) from None
                yield job[0], result
        finally:
            for ref in running:
                try:
                    ray.cancel(ref)
                except Exception:  # noqa: BLE001 - best effort: the actors are killed by close() anyway
                    pass

    def close(self) -> None:
        """Kill the actors (their devices are free again); stop Ray if this pool started it."""
        ray = require_ray()
        actors = getattr(self, "actors", [])
        for a in actors:
            ray.kill(a)
        for a in actors:  # return once they are gone: a pool opened next finds their devices free
            try:
                ray.get(a.describe.remote(), timeout=10)
            except (ray.exceptions.RayError, TimeoutError):
                pass
        self.actors = []
        if self._started and ray.is_initialized():
            ray.shutdown()
        self._started = False

    def __enter__(self) -> "RayPool":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def open_pool(address: str, backend, spec=None) -> RayPool:
    """The pool for ``--ray ADDRESS``: ``spec`` (a backend spec string) lets each worker build
    its backend where it runs; a backend given as an object is shipped to the workers."""
    return RayPool(backend, spec=spec if isinstance(spec, str) else None, address=address)


@contextmanager
def pool_for(address: str | None, backend, spec=None, log: Callable[[str], None] | None = None) -> Iterator[RayPool | None]:
    """``with pool_for(opts.ray, backend, opts.backend) as pool``: None without an address
    (Ray is not imported), else an open pool, closed (actors killed) when the block ends."""
    if not address:
        yield None
        return
    pool = open_pool(address, backend, spec)
    if log:
        log(f"      on {len(pool)} Ray workers ({', '.join(pool.where)})")
    try:
        yield pool
    finally:
        pool.close()
