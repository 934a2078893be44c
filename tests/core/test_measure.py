

def test_split_time_shares_one_attempts_cap():
    from ampq_pass.backends.ort import OrtBackend
    from ampq_pass.core.measure import Protocol, split_time

    backend = OrtBackend(protocol=Protocol(max_seconds=60.0, retries=2))
    assert split_time(backend, 1) is backend
    four = split_time(backend, 4)
    assert four.protocol.max_seconds == 15.0 and four.protocol.retries == 0
    assert backend.protocol.max_seconds == 60.0  # the original is left as it was
    assert split_time(backend, 100).protocol.max_seconds == 10.0  # never below the floor
    # ... unless the cap itself is lower: a spent allowance is not raised back to the floor
    from ampq_pass.core.measure import within
    assert split_time(within(backend, 4.0), 2).protocol.max_seconds == 4.0
    assert split_time(within(backend, 0.0), 3).protocol.max_seconds == 0.0
    assert split_time(OrtBackend(protocol=Protocol(max_seconds=None)), 4).protocol.max_seconds is None


def test_within_caps_each_attempt_and_the_key_ignores_caps():
    from ampq_pass.backends.ort import OrtBackend
    from ampq_pass.core.measure import Protocol, within

    backend = OrtBackend(protocol=Protocol(max_seconds=60.0, retries=2))
    short = within(backend, 5.0)
    assert short.protocol.max_seconds == 5.0 and short.protocol.retries == 0
    assert within(backend, 500.0).protocol.max_seconds == 60.0  # never above the protocol's own cap
    assert within(backend, -3.0).protocol.max_seconds == 0.0
    assert within(OrtBackend(protocol=Protocol(max_seconds=None)), 5.0).protocol.max_seconds == 5.0
    assert short.key() == backend.key()  # caps on effort do not change what is measured


def test_a_cap_never_stops_before_min_repeats():
    from ampq_pass.core.measure import Protocol, interleave

    now = [0.0]

    def clock():
        now[0] += 1.0  # every reading one second later: any cap is exceeded at once
        return now[0]

    runs = {"a": [], "b": []}
    p = Protocol(warmup=0, min_repeats=4, max_repeats=50, rel_ci=0.0, max_seconds=0.0)
    got = interleave({k: (lambda i, k=k: runs[k].append(i)) for k in runs}, p, clock=clock)
    assert len(runs["a"]) == len(runs["b"]) == 4 and len(got["a"].samples) == 4


def test_paired_ratio_cancels_what_hits_a_whole_round():
    import numpy as np
    from ampq_pass.core.measure import Timing, paired_ratio

    rng = np.random.default_rng(0)
    load = rng.uniform(1.0, 1.6, 40)          # a burst of load slows both models of a round alike
    base, other = Timing.of(list(0.10 * load)), Timing.of(list(0.08 * load * rng.uniform(0.99, 1.01, 40)))
    median, lo, hi = paired_ratio(base, other)
    assert lo <= median <= hi and abs(median - 1.25) < 0.01 and hi - lo < 0.02
    # the medians' own intervals carry the load: their widest ratio is far wider
    assert base.ci_high / other.ci_low - base.ci_low / other.ci_high > 5 * (hi - lo)
    assert paired_ratio(base, Timing.of(list(0.08 * load[:30]))) is None   # not from the same rounds
    assert paired_ratio(Timing.exact(1.0), Timing.exact(0.5)) is None      # one sample: nothing to pair
