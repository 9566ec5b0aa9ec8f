"""`tdm-r1 label` over HTTP on loopback: the page, auth by labeller token, labels by POST only, image ids that never
reach the file system, request limits with named errors, undo, several labellers merged, a restart keeping every
label, and the export."""

from __future__ import annotations

import io
import json
import urllib.error
import urllib.request

import numpy as np
import pytest
from PIL import Image
from servers import LabelServer

from tdm_r1.cli import main
from tdm_r1.labels.store import LabelStore


def png(i: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((16, 64, 3), 20 * i, np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture
def run(tmp_path):
    d = tmp_path / "run"
    store = LabelStore.of_run(d)
    ids = store.publish(3, 0, [png(i) for i in range(6)], [f"prompt {i}" for i in range(6)], [str(i) for i in range(6)])
    store.set_state(status="waiting", epoch=3, needed=4)
    tokens = {name: store.add_labeller(name) for name in ("ann", "bob")}
    store.close()
    return d, ids, tokens


def call(url: str, path: str, token: str | None = None, body: bytes | dict | None = None, method: str | None = None):
    data = json.dumps(body).encode() if isinstance(body, dict) else body
    req = urllib.request.Request(url + path, data=data, method=method or ("POST" if data is not None else "GET"))
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, r.read(), r.headers.get("Content-Type", "")
    except urllib.error.HTTPError as e:
        return e.code, e.read(), e.headers.get("Content-Type", "")


def test_labelling_over_http(run, tmp_path):
    d, ids, tokens = run
    server = LabelServer(tmp_path, d)
    try:
        status, page, kind = call(server.url, "/")
        assert status == 200 and kind.startswith("text/html") and b"tdm-r1 labelling" in page
        assert call(server.url, "/api/state")[0] == 401
        assert call(server.url, "/api/state", "not-a-token")[0] == 401
        status, body, _ = call(server.url, "/api/state", tokens["ann"])
        state = json.loads(body)
        assert status == 200 and state["labeller"] == "ann"
        assert [x["id"] for x in state["images"]] == ids and {x["label"] for x in state["images"]} == {None}
        assert state["progress"] == {"epoch": 3, "labelled": 0, "total": 6, "needed": 4, "status": "waiting"}

        status, body, kind = call(server.url, f"/api/image/{ids[2]}", tokens["ann"])
        assert status == 200 and kind == "image/png" and body == png(2)
        assert call(server.url, f"/api/image/{ids[2]}")[0] == 401
        for bad in ("..%2F..%2Fetc%2Fpasswd", "e00003-00002-000000000000", "labels.sqlite"):
            assert call(server.url, f"/api/image/{bad}", tokens["ann"])[0] == 404

        assert call(server.url, "/api/label", tokens["ann"], method="GET")[0] == 405  # changes only by POST
        assert call(server.url, "/api/label", None, {"id": ids[0], "label": 1})[0] == 401
        for body, status, says in [
            (b"{not json", 400, "not JSON"), ({"id": ids[0], "label": 2}, 400, "field 'label'"),
            ({"id": "../x", "label": 1}, 400, "field 'id'"), ({"label": 1}, 400, "field 'id'"),
            ({"id": "e00003-00009-0123456789ab", "label": 1}, 404, "no image"),
            (json.dumps({"id": ids[0], "label": 1, "pad": "x" * 5000}).encode(), 413, "4096"),
        ]:  # fmt: skip
            got, answer, _ = call(server.url, "/api/label", tokens["ann"], body)
            assert got == status and says in json.loads(answer)["error"], (body, answer)

        assert call(server.url, "/api/label", tokens["ann"], {"id": ids[0], "label": 1})[0] == 200
        assert call(server.url, "/api/label", tokens["ann"], {"id": ids[1], "label": 0})[0] == 200
        status, body, _ = call(server.url, "/api/label", tokens["bob"], {"id": ids[0], "label": 0})
        assert json.loads(body)["progress"]["labelled"] == 2
        status, body, _ = call(server.url, "/api/undo", tokens["ann"], {})
        assert json.loads(body)["undone"] == ids[1]
        mine = {x["id"]: x["label"] for x in json.loads(call(server.url, "/api/state", tokens["ann"])[1])["images"]}
        assert mine[ids[0]] == 1 and mine[ids[1]] is None
        assert json.loads(call(server.url, "/health")[1])["progress"]["labelled"] == 1
    finally:
        log = server.stop()
    assert tokens["ann"] not in log and tokens["bob"] not in log  # tokens travel in headers, never in the log

    server = LabelServer(tmp_path, d)  # a restart keeps every label
    try:
        state = json.loads(call(server.url, "/api/state", tokens["bob"])[1])
        assert {x["id"]: x["label"] for x in state["images"]}[ids[0]] == 0
    finally:
        server.stop()
    store = LabelStore.of_run(d)
    assert store.means(ids) == {ids[0]: 0.5}  # ann's like and bob's dislike
    store.close()
    assert main(["label", "--run", str(d), "--export", str(tmp_path / "labels.csv")]) == 0
    assert (tmp_path / "labels.csv").read_text().count("\n") == 3  # header + 2 labels


def test_label_command_errors_are_named(tmp_path, capsys):
    assert main(["label", "--run", str(tmp_path / "nope")]) != 0
    assert "no such run directory" in capsys.readouterr().err
    (tmp_path / "r").mkdir()
    assert main(["label", "--run", str(tmp_path / "r"), "--add-labeller", "a b"]) != 0
    assert "letters, digits" in capsys.readouterr().err
    assert main(["label", "--run", str(tmp_path / "r"), "--add-labeller", "carol"]) == 0
    token = capsys.readouterr().out.strip()
    store = LabelStore.of_run(tmp_path / "r")
    assert len(token) >= 24 and store.labeller_of(token) == "carol"
    store.close()


def test_server_commands_warn_when_reachable_from_other_machines(monkeypatch, caplog, tmp_path):
    import argparse

    from tdm_r1 import serving
    from tdm_r1.commands.common import run_server

    calls = []

    async def fake_serve(app, stop_event, host, port, max_seconds, ready):  # nothing is bound in this test
        calls.append((host, port))
        ready(4321)

    monkeypatch.setattr(serving, "serve", fake_serve)
    announced = []
    for host in ("127.0.0.1", "0.0.0.0"):
        args = argparse.Namespace(host=host, port=0, max_seconds=1.0, port_file=str(tmp_path / host))
        run_server(args, "label", None, None, announced.append)
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert warnings == ["label: binding 0.0.0.0, reachable from other machines; put TLS in front of it"]
    assert calls == [("127.0.0.1", 0), ("0.0.0.0", 0)] and announced == [4321, 4321]
    assert (tmp_path / "0.0.0.0").read_text() == "4321"
