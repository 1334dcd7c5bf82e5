"""`mexify serve` over HTTP on loopback: the runtime's masks and exits, bad requests, back-pressure, metrics,
graceful drain on SIGTERM, the load tester against it, and the Ray Serve deployment on a local cluster."""
import contextlib
import io
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
import uvicorn
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families
from typer.testing import CliRunner

import mexify
from mexify import api
from mexify.bundle import read_config, update_bundle
from mexify.cli import app
from mexify.errors import ConfigError
from mexify.policies import build_policy
from mexify.runtime import EarlyExitRuntime
from mexify.tools.images import to_tensor
from mexify.tools.serving import ServeConfig, Service, asgi_app, build_service
from mexify.trust import Trust

FIXTURES = Path(__file__).parent / "fixture_models.py"
ROOT = Path(__file__).resolve().parents[1]
TRUSTED = Trust(code=True)  # the fixture model is a test file


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def running(service):
    """The service's ASGI app under uvicorn in a thread, on a free loopback port; yields the base URL."""
    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(asgi_app(service), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not server.started and time.time() < deadline:
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(30)


def _png(array):
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def _photos(n, seed=0):
    """RGB images of several sizes whose contrast spreads the heads' confidence (so exits differ)."""
    rng = np.random.default_rng(seed)
    out = []
    for k in range(n):
        h, w = (64, 64) if k % 3 else (48, 80)
        scale = 10 + 120 * (k / max(n - 1, 1))
        out.append(np.clip(128 + scale * rng.standard_normal((h, w, 3)), 0, 255).astype(np.uint8))
    return out


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    """TinyUNet with sharpened heads and maxprob thresholds that send the photos out at several exits."""
    out = tmp_path_factory.mktemp("serve") / "unet.mex"
    torch.manual_seed(0)
    api.convert(f"{FIXTURES}:TinyUNet", args={"num_classes": 4}, trace=api.TraceConfig((64, 64)), exits=3, out=str(out))
    model = mexify.load(out, trust=TRUSTED)
    x = torch.stack([to_tensor(Image.fromarray(a), (64, 64)) for a in _photos(24, seed=5)])
    with torch.no_grad():
        for head in model.heads.values():
            [m for m in head.modules() if isinstance(m, torch.nn.Conv2d)][-1].weight.mul_(40.0)
        outs = model.forward_all(x, upsample=False)
    p = build_policy("maxprob").with_thresholds([0.0] * 3)
    p = p.with_thresholds([float(p.scores(0, outs[0]).quantile(0.6)), float(p.scores(1, outs[1]).quantile(0.5)), float("inf")])
    p.exit_names = list(model.exit_names)
    update_bundle(out, model=model, policy=p.to_dict())
    return out


def test_http_answers_are_the_runtimes_masks_and_exits(bundle):
    rt = EarlyExitRuntime(mexify.load(bundle, trust=TRUSTED))
    photos = _photos(18)
    with running(build_service(bundle, ServeConfig(max_batch=4, max_wait_ms=5), TRUSTED)) as url:
        with ThreadPoolExecutor(8) as pool:  # concurrent clients: their rows share batches
            pngs = list(pool.map(lambda a: httpx.post(f"{url}/predict", content=_png(a), timeout=60, trust_env=False), photos))
            docs = list(pool.map(lambda a: httpx.post(f"{url}/predict?format=json", content=_png(a), timeout=60,
                                                      trust_env=False).json(), photos))
        metrics = httpx.get(f"{url}/metrics", trust_env=False).text
    exits = set()
    for a, r, doc in zip(photos, pngs, docs):
        ref = rt.predict_batch(to_tensor(Image.fromarray(a), (64, 64))[None])
        mask = np.asarray(Image.fromarray(ref.masks[0].numpy().astype(np.uint8)).resize((a.shape[1], a.shape[0]), Image.NEAREST))
        assert r.status_code == 200 and r.headers["content-type"] == "image/png"
        assert np.array_equal(np.asarray(Image.open(io.BytesIO(r.content))), mask)  # at the image's own size
        e = int(ref.exit_index[0])
        assert int(r.headers["X-Mexify-Exit-Index"]) == doc["exit_index"] == e and doc["exit"] == rt.exit_names[e]
        if e < 3:
            assert doc["confidence"] == pytest.approx(float(ref.confidence[0]), abs=1e-5)
        assert (doc["width"], doc["height"]) == (a.shape[1], a.shape[0])
        assert doc["timings_ms"]["total"] >= doc["timings_ms"]["run"] > 0
        exits.add(e)
    assert len(exits) >= 2
    families = {f.name: f for f in text_string_to_metric_families(metrics)}
    answered = {s.labels["exit"]: s.value for s in families["mexify_answers"].samples if s.name == "mexify_answers_total"}
    assert sum(answered.values()) == 36 and set(answered) == set(rt.exit_names)
    quantiles = {s.labels.get("quantile") for s in families["mexify_latency_seconds"].samples}
    assert {"0.5", "0.95", "0.99"} <= quantiles


def test_bad_requests_get_one_line_answers(bundle):
    with running(build_service(bundle, ServeConfig(max_body_mb=0.01), TRUSTED)) as url:
        post = lambda body, q="": httpx.post(f"{url}/predict{q}", content=body, timeout=60, trust_env=False)  # noqa: E731
        r = post(b"GIF89a not really")
        assert r.status_code == 400 and "cannot read image" in r.json()["error"] and "\n" not in r.json()["error"]
        assert "object at 0x" not in r.json()["error"]
        assert post(b"").status_code == 400
        assert post(b"x" * 20000).status_code == 413
        assert post(_png(_photos(1)[0]), "?format=xml").status_code == 400
        assert httpx.get(f"{url}/predict", trust_env=False).status_code == 405
        health = httpx.get(f"{url}/healthz", trust_env=False)
        assert health.status_code == 200 and health.json()["status"] == "ok" and health.json()["input_size"] == [64, 64]


class _Gated:
    """A one-stage engine that holds every batch until the test opens the gate."""

    num_exits, exit_names = 1, ["final"]

    def __init__(self):
        self.gate = threading.Event()

    def start(self, images):
        return np.stack([np.asarray(im) for im in images])

    def step(self, i, x, n):
        self.gate.wait(30)
        return np.arange(n), np.zeros((n, 4, 4), np.int64), np.full(n, np.nan, np.float32), None, None


def test_a_full_queue_answers_429_and_the_rest_are_served():
    engine = _Gated()
    service = Service(engine, (8, 8), ServeConfig(max_batch=2, max_queue=2, max_wait_ms=0))
    with running(service) as url:
        body = _png(np.zeros((8, 8, 3), np.uint8))
        with ThreadPoolExecutor(6) as pool:
            futures = [pool.submit(httpx.post, f"{url}/predict", content=body, timeout=60, trust_env=False) for _ in range(6)]
            time.sleep(1.0)  # all six arrived: two held in the gated batch, four refused
            engine.gate.set()
            codes = sorted(f.result().status_code for f in futures)
        assert codes == [200, 200, 429, 429, 429, 429]
        refused = [f.result() for f in futures if f.result().status_code == 429][0]
        assert refused.headers["Retry-After"] == "1" and "queue is full" in refused.json()["error"]
        assert 'mexify_refused_total{reason="queue_full"} 4.0' in httpx.get(f"{url}/metrics", trust_env=False).text


def _wait_accepted(url, n, timeout=60.0):
    """Wait until the service has accepted ``n`` requests (answered or in flight), read from its metrics."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        families = text_string_to_metric_families(httpx.get(f"{url}/metrics", trust_env=False).text)
        samples = [s for f in families for s in f.samples]
        accepted = sum(s.value for s in samples if s.name in ("mexify_answers_total", "mexify_in_flight"))
        if accepted >= n:
            return
        time.sleep(0.02)
    raise AssertionError(f"the service accepted fewer than {n} requests in {timeout:g} s")


def test_sigterm_drains_every_accepted_request(bundle, tmp_path):
    port = _free_port()
    env = {**os.environ, "MEXIFY_TRUSTED_CODE": str(FIXTURES), "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    # large inputs, small batches: the requests take a while, so most are still in the service at SIGTERM
    proc = subprocess.Popen([sys.executable, "-m", "mexify", "serve", str(bundle), "--port", str(port), "--max-batch", "2",
                             "--size", "384x384"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 120
        while time.time() < deadline:
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{url}/healthz", trust_env=False).status_code == 200:
                    break
            time.sleep(0.2)
        body = _png(_photos(1)[0])

        def post(_):
            r = httpx.post(f"{url}/predict", content=body, timeout=60, trust_env=False)
            return r.status_code, time.time()

        with ThreadPoolExecutor(24) as pool:
            futures = [pool.submit(post, k) for k in range(24)]
            _wait_accepted(url, 24)  # every request is in before the signal
            signalled = time.time()
            proc.send_signal(signal.SIGTERM)
            answers = [f.result() for f in futures]
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert [code for code, _ in answers] == [200] * 24
    assert sum(t > signalled for _, t in answers) >= 4  # answered while draining
    assert proc.returncode == 0 and "every accepted request was answered" in out, err[-2000:]


def test_loadtest_against_the_service_and_its_baseline(bundle, tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    for k, a in enumerate(_photos(6)):
        Image.fromarray(a).save(folder / f"{k}.png")
    multi = build_service(bundle, ServeConfig(max_batch=4), TRUSTED)
    original = build_service(bundle, ServeConfig(max_batch=4, original=True), TRUSTED)
    with running(multi) as url, running(original) as base:
        report = api.loadtest(url, data=str(folder), rate=20, requests=30, baseline=base)
        doc = CliRunner().invoke(app, ["loadtest", url, "--rate", "20", "--requests", "10", "--json"])
    assert report.final.ok == report.final.sent == 30 and report.baseline_final.ok == 30
    assert sum(report.final.exit_mix.values()) == 30 and len(report.final.exit_mix) >= 2  # early exits taken
    assert report.baseline_final.exit_mix == {"original": 30}
    assert report.ratio is not None and report.ratio > 0
    assert doc.exit_code == 0, doc.output
    assert '"ok": 10' in doc.output  # the default images: synthetic scenes at the service's input size


def test_loadtest_refuses_targets_and_missing_services():
    with pytest.raises(ConfigError, match="loopback or this machine"):
        api.loadtest("http://example.com", rate=1)
    with pytest.raises(ConfigError, match="no service answers"):
        api.loadtest(f"http://127.0.0.1:{_free_port()}", rate=1)


@pytest.mark.parametrize("args, words", [
    (["--max-wait-ms", "-1"], "--max-wait-ms"),
    (["--autoscale", "3:1"], "MIN:MAX"),
    (["--max-batch", "0"], "--max-batch"),
    (["--port", "70000"], "--port"),
])
def test_serve_refuses_bad_values_in_one_line(bundle, args, words):
    res = CliRunner().invoke(app, ["serve", str(bundle), *args])
    assert res.exit_code == 2 and words in res.output and "Traceback" not in res.output


def test_serve_refuses_a_busy_port_and_the_wrong_engine(bundle):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        res = CliRunner().invoke(app, ["serve", str(bundle), "--port", str(s.getsockname()[1]), "--trust-code"])
    assert res.exit_code == 1 and "cannot listen" in res.output and "Traceback" not in res.output
    res = CliRunner().invoke(app, ["serve", str(bundle), "--engine", "onnxruntime", "--port", str(_free_port())])
    assert res.exit_code == 1 and "not an ONNX export" in res.output
    res = CliRunner().invoke(app, ["loadtest", "http://127.0.0.1:1"])
    assert res.exit_code == 1 and "no service answers" in res.output
    with pytest.raises(ConfigError, match="below --max-batch"):
        ServeConfig(max_batch=8, max_queue=4).check()


@pytest.mark.slow
def test_ray_serve_replicas_answer_as_the_runtime(bundle):
    pytest.importorskip("ray.serve")
    from mexify.tools.ray_serving import RayConfig, run_ray

    rt = EarlyExitRuntime(mexify.load(bundle, trust=TRUSTED))
    port, ready, stop = _free_port(), threading.Event(), threading.Event()
    errors = []

    def serve():
        try:
            run_ray(str(bundle), ServeConfig(max_batch=4), RayConfig(replicas=2, cpus=0.5), TRUSTED, port=port,
                    on_ready=lambda u: ready.set(), stop=stop)
        except Exception as e:  # noqa: BLE001 - reported by the test below
            errors.append(e)
            ready.set()

    thread = threading.Thread(target=serve)
    thread.start()
    try:
        assert ready.wait(300) and not errors, errors
        photos = _photos(8)
        with ThreadPoolExecutor(8) as pool:
            docs = list(pool.map(lambda a: httpx.post(f"http://127.0.0.1:{port}/predict?format=json", content=_png(a), timeout=120,
                                                      trust_env=False).json(), photos))
        health = httpx.get(f"http://127.0.0.1:{port}/healthz", trust_env=False)
    finally:
        stop.set()
        thread.join(120)
    for a, doc in zip(photos, docs):
        ref = rt.predict_batch(to_tensor(Image.fromarray(a), (64, 64))[None])
        assert doc["exit_index"] == int(ref.exit_index[0])
    assert health.status_code == 200 and health.json()["engine"] == "torch"


def test_the_service_watches_for_drift_against_calibrations_record(bundle, tmp_path, caplog):
    """Images like the calibration ones find nothing; a stream of flat, low-contrast images (every one leaving
    late) is reported in /metrics and /healthz and logged once."""
    watched = tmp_path / "watched.mex"
    shutil.copytree(bundle, watched)
    calib = _photos(24, seed=5)
    rt = EarlyExitRuntime(mexify.load(watched, trust=TRUSTED))
    res = rt.predict_batch(torch.stack([to_tensor(Image.fromarray(a), (64, 64)) for a in calib]))
    policy = read_config(watched).policy
    policy["monitor"] = rt.stats().to_dict()  # what calibration saw: these very images
    update_bundle(watched, policy=policy)
    assert len(set(res.exit_index.tolist())) >= 2

    def served(images):
        service = build_service(watched, ServeConfig(max_batch=4), TRUSTED)
        with running(service) as url, ThreadPoolExecutor(4) as pool:
            codes = list(pool.map(lambda a: httpx.post(f"{url}/predict", content=_png(a), timeout=60, trust_env=False).status_code,
                                  images))
            metrics = httpx.get(f"{url}/metrics", trust_env=False).text
            health = httpx.get(f"{url}/healthz", trust_env=False).json()
        assert codes == [200] * len(images)
        families = {f.name: f for f in text_string_to_metric_families(metrics)}
        return families, health

    families, health = served(calib * 3)  # like calibration (the same images): nothing found
    assert families["mexify_drift_findings"].samples[0].value == 0 and health["drift"]["warnings"] == []
    sources = {s.labels["source"] for s in families["mexify_exit_confidence_mean"].samples}
    assert sources == {"served", "calibration"}
    flat = [np.full((64, 64, 3), 128, np.uint8) + np.uint8(k % 3) for k in range(Service.DRIFT_EVERY)]
    with caplog.at_level("WARNING", logger="mexify"):
        families, health = served(flat)
    assert families["mexify_drift_findings"].samples[0].value >= 1 and health["drift"]["warnings"]
    assert sum("drift: the images served are not like the calibration images" in r.getMessage() for r in caplog.records) == 1


def test_onnxruntime_service_answers_as_the_runner(bundle, tmp_path):
    pytest.importorskip("onnxruntime")
    from mexify.deploy import Runner
    from mexify.tools.export import export_bundle

    export_bundle(bundle, tmp_path / "onnx", "onnx")
    runner = Runner(tmp_path / "onnx")
    photos = _photos(12)
    with running(build_service(tmp_path / "onnx", ServeConfig(engine="onnxruntime", max_batch=4))) as url, \
            running(build_service(tmp_path / "onnx", ServeConfig(engine="onnxruntime", original=True))) as off:
        with ThreadPoolExecutor(6) as pool:
            answers = list(pool.map(lambda a: httpx.post(f"{url}/predict", content=_png(a), timeout=60, trust_env=False), photos))
        exits_off = httpx.post(f"{off}/predict?format=json", content=_png(photos[0]), timeout=60, trust_env=False).json()
        health = httpx.get(f"{off}/healthz", trust_env=False).json()
    for a, r in zip(photos, answers):
        ref = runner.predict(to_tensor(Image.fromarray(a), (64, 64))[None].numpy())
        assert int(r.headers["X-Mexify-Exit-Index"]) == int(ref.exit_index[0])
        mask = np.asarray(Image.fromarray(ref.masks[0].astype(np.uint8)).resize((a.shape[1], a.shape[0]), Image.NEAREST))
        assert np.array_equal(np.asarray(Image.open(io.BytesIO(r.content))), mask)
    assert len({int(r.headers["X-Mexify-Exit-Index"]) for r in answers}) >= 2
    assert exits_off["exit"] == "final" and health["model"] == "every exit off"
    with pytest.raises(ConfigError, match="is an ONNX export"):
        build_service(tmp_path / "onnx", ServeConfig(engine="torch"))
