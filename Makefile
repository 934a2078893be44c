# Two commands on a fresh machine (Python 3.10+ is all that must be there):
#   make demo   - the whole job on the embedded default model (all-MiniLM-L6-v2)
#   make test   - the test suite
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.ampq-installed

.PHONY: demo test bench clean

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# CPU build from local disk; an unpinned torch would pull a multi-GB CUDA build.
	$(PY) -m pip install -q torch==2.13.0
	# ray and openvino: their backends' tests run in CI (on a local Ray cluster, OpenVINO's CPU plugin)
	$(PY) -m pip install -q -e '.[models,test,ray,openvino]'
	touch $(STAMP)

demo: $(STAMP)
	HF_HUB_OFFLINE=1 $(VENV)/bin/ampq-pass demo

test: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q -x tests

clean:
	rm -rf $(VENV) .ampq-cache out
