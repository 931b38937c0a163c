"""`sls serve` as a user meets it: a real server process on a free loopback port, over HTTP."""

from __future__ import annotations

import base64
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
import torch
from PIL import Image

from sls.cli import main
from sls.data import load_dataset, make_transform
from sls.experiment import load_task

CLASSIFIERS = ("lora3", "lora5", "adapter2", "repadapter5")  # the two LoRA tasks share passes


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Server:
    """``sls serve`` in its own process, talked to over HTTP."""

    def __init__(self, paths, *options, env=None) -> None:
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        environment = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
        self.process = subprocess.Popen([sys.executable, "-m", "sls.cli", "serve", *map(str, paths), "--port",
                                         str(self.port), "--log-level", "warning", *options],
                                        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=environment)  # fmt: skip
        self.client = httpx.Client(base_url=self.url, timeout=60)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"the server exited: {self.process.stderr.read()}")
            try:
                self.client.get("/healthz")
                return
            except httpx.TransportError:
                time.sleep(0.2)
        raise RuntimeError("the server did not start in 120 s")

    def stop(self) -> tuple[int, str]:
        self.client.close()
        self.process.send_signal(signal.SIGTERM)
        try:
            code = self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            raise
        return code, self.process.stdout.read() + self.process.stderr.read()


@pytest.fixture(scope="module")
def root(served_tasks, tmp_path_factory):
    """A folder of task folders (copies: the reload test adds and removes some)."""
    root = tmp_path_factory.mktemp("root")
    for name, folder in served_tasks.items():
        shutil.copytree(folder, root / name)
    return root


@pytest.fixture(scope="module")
def server(root):
    server = Server([root], "--max-wait-ms", "20", "--max-body-mb", "1", "--max-pixels", "1000000",
                    "--max-images", "8")  # fmt: skip
    yield server
    code, output = server.stop()
    assert code == 0 and "sls: stopped on SIGTERM" in output, output


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    folder = tmp_path_factory.mktemp("digits")
    data = load_dataset("digits")
    paths = []
    for i in range(6):
        paths.append(folder / f"digit{i}.png")
        data.image(i).save(paths[-1])
    return paths


def _files(paths):
    return [("images", (path.name, path.read_bytes(), "image/png")) for path in paths]


def _printed(capsys, argv) -> list[str]:
    assert main(argv) == 0
    return capsys.readouterr().out.splitlines()


def test_predictions_are_those_of_sls_predict(server, root, digits, capsys):
    for name in CLASSIFIERS:
        answer = server.client.post(f"/v1/tasks/{name}/predict", files=_files(digits), params={"top_k": 3})
        assert answer.status_code == 200, answer.text
        body = answer.json()
        assert body["task"] == name and body["type"] == "classification"
        served = [f"{digits[i].parent / p['image']}: {p['class']} ({p['top'][0]['probability']:.3f})"
                  for i, p in enumerate(body["predictions"])]  # fmt: skip
        assert served == _printed(capsys, ["predict", str(root / name), *map(str, digits)])
        model, _ = load_task(root / name)  # the probabilities themselves
        backbone = json.loads((root / name / "record.json").read_text())["backbone"]
        transform = make_transform(backbone["img_size"], tuple(backbone["mean"]), tuple(backbone["std"]),
                                   backbone["interpolation"])  # fmt: skip
        with torch.inference_mode():
            expected = model(torch.stack([transform(Image.open(p).convert("RGB")) for p in digits])).softmax(-1)
        for row, prediction in zip(expected, body["predictions"]):
            top = [entry["label"] for entry in prediction["top"]]
            assert top == row.topk(3).indices.tolist()
            np.testing.assert_allclose([e["probability"] for e in prediction["top"]], row.topk(3).values, atol=1e-6)


def test_dense_answers_are_the_files_sls_predict_writes(server, root, tmp_path):
    from helpers import tiny_scenes

    image = tmp_path / "scene.png"
    Image.fromarray(tiny_scenes(n=16).scenes.images[14]).resize((80, 72)).save(image)
    assert main(["predict", str(root / "seg3"), str(image), "--out", str(tmp_path / "seg")]) == 0
    answer = server.client.post(
        "/v1/tasks/seg3/predict", content=image.read_bytes(), headers={"content-type": "image/png"}
    )
    assert answer.status_code == 200, answer.text
    mask = np.asarray(Image.open(io.BytesIO(base64.b64decode(answer.json()["predictions"][0]["mask_png"]))))
    np.testing.assert_array_equal(mask, np.asarray(Image.open(tmp_path / "seg" / "scene.png")))
    assert main(["predict", str(root / "det2"), str(image), "--out", str(tmp_path / "det"), "--threshold", "0"]) == 0
    answer = server.client.post("/v1/tasks/det2/predict", params={"threshold": 0}, json={
        "images": [base64.b64encode(image.read_bytes()).decode()]})  # fmt: skip
    assert answer.status_code == 200, answer.text
    written = json.loads((tmp_path / "det" / "scene.json").read_text())
    found = answer.json()["predictions"][0]
    assert found["boxes"] == written["boxes"] and len(found["boxes"]) > 0
    assert (found["width"], found["height"]) == (written["width"], written["height"]) == (80, 72)


def test_concurrent_requests_for_several_tasks_get_their_own_answers(server, digits):
    alone = {}
    for name in CLASSIFIERS:
        for path in digits:
            answer = server.client.post(f"/v1/tasks/{name}/predict", files=_files([path]))
            alone[name, path.name] = answer.json()["predictions"][0]["top"]
    jobs = [(name, path) for _ in range(3) for name in CLASSIFIERS for path in digits]

    def ask(job):
        name, path = job
        with httpx.Client(base_url=server.url, timeout=60) as client:
            return client.post(f"/v1/tasks/{name}/predict", files=_files([path]))

    with ThreadPoolExecutor(max_workers=12) as pool:
        answers = list(pool.map(ask, jobs))
    for (name, path), answer in zip(jobs, answers):
        assert answer.status_code == 200, answer.text
        got = answer.json()["predictions"][0]["top"]
        assert [e["label"] for e in got] == [e["label"] for e in alone[name, path.name]]
        np.testing.assert_allclose([e["probability"] for e in got],
                                   [e["probability"] for e in alone[name, path.name]], atol=1e-6)  # fmt: skip
    metrics = server.client.get("/metrics").text
    for name in CLASSIFIERS:
        assert f'sls_requests_total{{code="200",task="{name}"}}' in metrics
        assert f'sls_batch_images_count{{task="{name}"}}' in metrics


def _bomb() -> bytes:
    png = io.BytesIO()
    Image.new("L", (2000, 2000)).save(png, format="PNG")  # 4 MP in a few kB
    return png.getvalue()


def _chunked(size):
    def body():
        for _ in range(size // 65536 + 1):
            yield b"\0" * 65536

    return body()


BAD = {
    "not an image": (400, dict(files=[("images", ("notes.png", b"hello, not a picture", "image/png"))])),
    "an empty file": (400, dict(files=[("images", ("empty.png", b"", "image/png"))])),
    "no file at all": (400, dict(files=[("other", (None, "x"))])),
    "an empty JSON body": (400, dict(content=b"", headers={"content-type": "application/json"})),
    "a malformed JSON body": (400, dict(content=b'{"images": [', headers={"content-type": "application/json"})),
    "JSON of the wrong shape": (422, dict(json={"pictures": []})),
    "JSON that is not UTF-8": (400, dict(content=b"\xff\xfe\xff", headers={"content-type": "application/json"})),
    "JSON nested too deep": (400, dict(content=b"[" * 100_000, headers={"content-type": "application/json"})),
    "base64 that is not": (400, dict(json={"images": ["***"]})),
    "an oversized body": (413, dict(content=b"\0" * (2 << 20), headers={"content-type": "image/png"})),
    "an oversized body without a length": (413, dict(content=_chunked(2 << 20), headers={"content-type": "image/png"})),
    "a decompression bomb": (413, dict(content=_bomb(), headers={"content-type": "image/png"})),
    "too many images": (413, dict(files=[("images", (f"{i}.png", _bomb(), "image/png")) for i in range(9)])),
    "an unknown content type": (415, dict(content=b"x", headers={"content-type": "text/plain"})),
    "top_k of 0": (422, dict(params={"top_k": 0}, content=b"x", headers={"content-type": "image/png"})),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_is_a_4xx_in_one_line_and_the_server_answers_on(server, digits, case):
    status, request = BAD[case]
    good = server.client.post("/v1/tasks/lora3/predict", files=_files(digits[:2])).json()
    answer = server.client.post("/v1/tasks/lora3/predict", **request)
    assert answer.status_code == status, answer.text
    message = answer.json()["error"]
    assert message and "\n" not in message and "Traceback" not in message
    assert server.client.post("/v1/tasks/lora3/predict", files=_files(digits[:2])).json() == good


def test_an_unknown_task_is_a_404(server, digits):
    answer = server.client.post("/v1/tasks/nope/predict", files=_files(digits[:1]))
    assert answer.status_code == 404 and "GET /v1/tasks" in answer.json()["error"]
    assert 'sls_requests_total{code="404",task="_unknown"}' in server.client.get("/metrics").text


def test_the_task_list_says_what_each_task_is(server, root):
    listed = {t["name"]: t for t in server.client.get("/v1/tasks").json()["tasks"]}
    assert set(listed) == {"lora3", "lora5", "adapter2", "repadapter5", "seg3", "det2"}
    for name, task in listed.items():
        record = json.loads((root / name / "record.json").read_text())
        assert task["k"] == record["depth"] and task["backbone"] == "test_vit"
        assert task["storage_bytes"] == (root / name / record["files"]["task"]["file"]).stat().st_size
    assert listed["seg3"]["type"] == "segmentation" and listed["det2"]["classes"] == ["a", "b", "c"]
    assert server.client.get("/healthz").json() == {"status": "ok", "tasks": 6, "backbones": 2}
    assert "/v1/tasks/{name}/predict" in server.client.get("/openapi.json").json()["paths"]


def test_a_task_folder_added_later_is_served_after_a_reload(server, root, digits):
    shutil.copytree(root / "lora3", root / "later")
    assert server.client.post("/v1/tasks/later/predict", files=_files(digits[:1])).status_code == 404
    report = server.client.post("/v1/admin/reload").json()
    assert report == {"added": ["later"], "replaced": [], "removed": [], "failed": []}
    same = [server.client.post(f"/v1/tasks/{n}/predict", files=_files(digits[:3])).json()["predictions"]
            for n in ("later", "lora3")]  # fmt: skip
    assert same[0] == same[1]
    record = root / "later" / "record.json"
    os.utime(record, (record.stat().st_atime, record.stat().st_mtime + 5))  # the task was written again
    (root / "broken").mkdir()
    (root / "broken" / "record.json").write_text("{")
    report = server.client.post("/v1/admin/reload").json()
    assert report["replaced"] == ["later"] and report["added"] == [] and report["removed"] == []
    assert [f["folder"] for f in report["failed"]] == [str(root / "broken")]
    shutil.rmtree(root / "broken")
    assert server.client.post("/v1/tasks/later/predict", files=_files(digits[:3])).json()["predictions"] == same[1]
    shutil.rmtree(root / "later")
    assert server.client.post("/v1/admin/reload").json()["removed"] == ["later"]
    assert server.client.post("/v1/tasks/later/predict", files=_files(digits[:1])).status_code == 404


@pytest.mark.slow  # a second server process (about 8 s)
def test_a_token_is_checked_on_every_call(served_tasks, digits):
    server = Server([served_tasks["lora3"]], env={"SLS_SERVE_TOKEN": "s3cret"})
    try:
        for method, path in (("GET", "/healthz"), ("GET", "/v1/tasks"), ("GET", "/metrics"),
                             ("POST", "/v1/tasks/lora3/predict"), ("POST", "/v1/admin/reload")):  # fmt: skip
            answer = server.client.request(method, path)
            assert answer.status_code == 401 and "token" in answer.json()["error"]
            wrong = server.client.request(method, path, headers={"authorization": "Bearer s3cre"})
            assert wrong.status_code == 401
        right = {"authorization": "Bearer s3cret"}
        answer = server.client.post("/v1/tasks/lora3/predict", files=_files(digits[:1]), headers=right)
        assert answer.status_code == 200
    finally:
        code, output = server.stop()
    assert code == 0 and "sls: stopped on SIGTERM" in output, output


def test_a_non_local_bind_needs_a_token(served_tasks, capsys, monkeypatch):
    monkeypatch.delenv("SLS_SERVE_TOKEN", raising=False)
    assert main(["serve", str(served_tasks["lora3"]), "--host", "0.0.0.0"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("sls: error: --host 0.0.0.0") and "token" in err and err.count("\n") == 1


def test_a_folder_that_does_not_load_stops_the_start_in_one_line(tmp_path, capsys):
    (tmp_path / "task").mkdir()
    (tmp_path / "task" / "record.json").write_text("{not json")
    assert main(["serve", str(tmp_path / "task")]) == 2
    err = capsys.readouterr().err
    assert "record.json" in err and err.count("\n") == 1


def test_an_unfinished_task_in_a_folder_of_tasks_is_skipped_with_a_warning(served_tasks, tmp_path, capsys):
    from sls.serve import TaskPool
    from sls.serve.app import load_pool

    shutil.copytree(served_tasks["lora3"], tmp_path / "done")
    (tmp_path / "unfinished").mkdir()
    (tmp_path / "unfinished" / "record.json").write_text("{")
    pool = load_pool([tmp_path], TaskPool())
    assert set(pool.tasks) == {"done"}
    err = capsys.readouterr().err
    assert err.startswith("sls: warning: skipped") and "unfinished" in err and err.count("\n") == 1
