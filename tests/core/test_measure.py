

def test_split_time_shares_one_attempts_cap():
    from ampq_pass.backends.ort import OrtBackend
    from ampq_pass.core.measure import Protocol, split_time

    backend = OrtBackend(protocol=Protocol(max_seconds=60.0, retries=2))
    assert split_time(backend, 1) is backend
    four = split_time(backend, 4)
    assert four.protocol.max_seconds == 15.0 and four.protocol.retries == 0
    assert backend.protocol.max_seconds == 60.0  # the original is left as it was
    assert split_time(backend, 100).protocol.max_seconds == 10.0  # never below the floor
    assert split_time(OrtBackend(protocol=Protocol(max_seconds=None)), 4).protocol.max_seconds is None
