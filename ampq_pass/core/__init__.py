"""Core plumbing: ONNX models, samples, ONNX Runtime sessions, formats, op rules, the cache
and the timing interface. Nothing in core imports a stage, the pipeline or the CLI."""
