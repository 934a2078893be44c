"""Backend wrappers shared by the tests and benchmarks (no hardware is imitated)."""

from __future__ import annotations

from ampq_pass.core.measure import Backend


class Counting(Backend):
    """Wraps a real backend and counts what it is asked to time: ``calls`` to ``time``, the
    ``models`` in them, and the distinct ``(graph name, label)`` pairs ``timed`` (a subgraph's hp
    configuration is timed with every group of its configurations, but counted once there)."""

    def __init__(self, inner: Backend):
        self.inner, self.calls, self.models, self.timed = inner, 0, 0, set()
        self.name, self.unit = inner.name, inner.unit

    def capabilities(self):
        return self.inner.capabilities()

    def key(self):
        return self.inner.key()

    def deployed(self, model):
        return self.inner.deployed(model)

    def time(self, models, inputs):
        self.calls += 1
        self.models += len(models)
        self.timed |= {(m.graph.name, label) for label, m in models.items()}
        return self.inner.time(models, inputs)
