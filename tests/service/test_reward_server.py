"""`tdm-r1 reward-server` and the `remote` reward on loopback: auth, limits, per-sample and per-request failures,
batching, retries, and scores equal to the same reward run in-process."""

from __future__ import annotations

import base64
import io
import json
import math
import threading
import urllib.error
import urllib.request

import pytest
import torch
from judge_reward import Judge
from PIL import Image
from servers import TOKEN, Server

from tdm_r1.config import ConfigError, RewardTermConfig
from tdm_r1.rewards.base import build_reward, score_images
from tdm_r1.rewards.remote import RemoteOptions, RemoteReward, build_remote
from tdm_r1.rewards.wire import decode_png, encode_png


def request(url, body=None, token=TOKEN, path="/score", timeout=30):
    """(status, JSON answer, headers) of one raw request."""
    headers = {"Content-Type": "application/json"} | ({"Authorization": f"Bearer {token}"} if token else {})
    data = None if body is None else (body if isinstance(body, bytes) else json.dumps(body).encode())
    req = urllib.request.Request(url + path, data=data, headers=headers, method="GET" if body is None else "POST")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, json.loads(resp.read()), resp.headers
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read()), e.headers


def images(n, seed=0, side=8):
    return torch.rand(n, 3, side, side, generator=torch.Generator().manual_seed(seed))


def body(n, prompts=None, seed=0, side=8):
    return {"request_id": f"r{seed}", "images": [encode_png(x) for x in images(n, seed, side)],
            "prompts": prompts or ["p"] * n}  # fmt: skip


def quantised(x):
    return torch.stack([decode_png(encode_png(i), 0, 4096) for i in x])


def test_wire_round_trip_is_the_ocr_rounding():
    x = images(3)
    y = quantised(x)
    assert torch.equal(y, (x * 255 + 0.5).floor() / 255)
    grey = x[:, :1].expand(-1, 3, -1, -1)  # grey images travel as one channel
    assert Image.open(io.BytesIO(base64.b64decode(encode_png(grey[0])))).mode == "L"


def test_health_needs_no_token_and_reports_the_service(judge_server):
    status, answer, _ = request(judge_server.url, token=None, path="/health")
    assert status == 200 and answer["reward"] == "judge_reward:build_judge" and answer["queue_depth"] == 0
    assert {"version", "device", "requests_served", "latency_ms", "options"} <= set(answer)


@pytest.mark.parametrize("token", [None, "wrong-token-0123456789"])
def test_score_refuses_without_the_right_token(judge_server, token):
    status, answer, headers = request(judge_server.url, body(2), token=token)
    assert status == 401 and "token" in answer["error"] and headers["WWW-Authenticate"] == "Bearer"


def test_scores_equal_the_reward_in_process_and_null_for_unjudgeable(judge_server):
    b = body(4, ["a", "nan please", "b", "c"], seed=3)
    status, answer, _ = request(judge_server.url, b)
    assert status == 200 and answer["request_id"] == "r3"
    want = score_images(Judge(), quantised(images(4, 3)), ["a", "x", "b", "c"], [{}] * 4)
    assert answer["scores"][1] is None and answer["errors"][1] == "the reward could not judge this sample"
    assert [answer["scores"][i] for i in (0, 2, 3)] == pytest.approx([float(want[i]) for i in (0, 2, 3)], abs=0)
    assert answer["errors"][0] is None


@pytest.mark.parametrize(
    ("payload", "status", "needle"),
    [
        (b"{not json", 400, "body is not JSON"),
        ({"images": [], "prompts": []}, 400, "request_id"),
        ({"request_id": "x", "images": ["aGVsbG8="], "prompts": ["p"]}, 400, "images[0]: not a PNG"),
        ({"request_id": "x", "images": ["%%%"], "prompts": ["p"]}, 400, "images[0]: not base64"),
        ({"request_id": "x", "images": [encode_png(torch.rand(3, 4, 4))], "prompts": []}, 400, "prompts"),
        ({"request_id": "x", "images": [encode_png(torch.rand(3, 4, 4))], "prompts": ["p"], "metadata": [1]}, 400,
         "metadata"),
        (body(9), 413, "exceed the limit of 8"),
        ({"request_id": "x", "images": ["A" * 1_200_000], "prompts": ["p"]}, 413, "exceeds 1.0 MB"),
    ],
)  # fmt: skip
def test_bad_requests_get_a_status_naming_what_is_wrong(judge_server, payload, status, needle):
    got, answer, _ = request(judge_server.url, payload)
    assert got == status and needle in answer["error"], answer


def test_images_over_the_size_limit_are_named(tmp_path):
    server = Server(tmp_path, "dark_fraction", "--max-side", "16", "--max-requests", "1")
    try:
        b = body(2, side=8)
        b["images"][1] = encode_png(torch.rand(3, 8, 32))
        status, answer, _ = request(server.url, b)
        assert status == 400 and answer["error"] == "images[1]: 32x8 exceeds the 16 px limit"
    finally:
        log = server.stop()
    assert "stopped after 1 requests" in log  # --max-requests ends it by itself


def test_a_crash_fails_its_request_only_and_the_server_keeps_serving(judge_server):
    results = {}

    def call(name, prompts):
        results[name] = request(judge_server.url, body(2, prompts, seed=len(name)))

    threads = [threading.Thread(target=call, args=(n, p)) for n, p in
               (("ok1", ["a", "b"]), ("crash", ["crash", "b"]), ("ok22", ["c", "d"]))]  # fmt: skip
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert results["crash"][0] == 500 and "the judge crashed" in results["crash"][1]["error"]
    assert results["ok1"][0] == 200 and results["ok22"][0] == 200
    assert request(judge_server.url, body(1))[0] == 200


def test_a_full_queue_answers_503_with_retry_after(judge_server):
    answers = []

    def slow():
        answers.append(request(judge_server.url, body(4, ["slow"] * 4)))

    threads = [threading.Thread(target=slow) for _ in range(6)]  # 24 images against a queue of 8
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    codes = sorted(a[0] for a in answers)
    assert 200 in codes and 503 in codes, codes
    full = next(a for a in answers if a[0] == 503)
    assert full[2]["Retry-After"] == "1" and "queue full" in full[1]["error"]


def test_remote_reward_matches_in_process_and_counts_its_retries(judge_server, monkeypatch):
    monkeypatch.setenv("JUDGE_TOKEN", TOKEN)
    term = RewardTermConfig(name="remote", options={"url": judge_server.url, "token_env": "JUDGE_TOKEN", "chunk": 3})
    remote = build_remote(term)
    x = images(7, seed=11)
    got = remote(x, ["p"] * 6 + ["nan"], [{}] * 7)
    want = score_images(Judge(), quantised(x), ["p"] * 7, [{}] * 7)
    assert torch.equal(got[:6], want[:6]) and math.isnan(float(got[6]))
    stats = remote.take_stats()
    assert stats["retries"] == 0 and stats["failed_chunks"] == 0 and stats["latency_p50_ms"] > 0
    # a server too slow for the timeout: every try times out, the chunk is NaN and counted
    slow = RemoteReward(RemoteOptions(url=judge_server.url, timeout_s=0.2, retries=2, backoff_s=0.01), TOKEN)
    assert torch.isnan(slow(images(2), ["slow", "slow"], [{}, {}])).all()
    stats = slow.take_stats()
    assert stats["retries"] == 2 and stats["failed_chunks"] == 1
    assert "after 3 tries" in slow.last_error and judge_server.url in slow.last_error
    # a refused request is not retried: 401 fails at once
    wrong = RemoteReward(RemoteOptions(url=judge_server.url, retries=3), "not-the-token-0123456789")
    assert torch.isnan(wrong(images(1), ["p"], [{}])).all() and wrong.take_stats()["retries"] == 0
    assert "HTTP 401" in wrong.last_error


def test_nothing_listening_is_retried_then_nan(tmp_path):
    remote = RemoteReward(RemoteOptions(url="http://127.0.0.1:9", retries=2, backoff_s=0.01, timeout_s=2), TOKEN)
    assert torch.isnan(remote(images(2), ["p", "q"], [{}, {}])).all()
    assert remote.take_stats()["retries"] == 2 and "after 3 tries" in remote.last_error


def test_remote_options_are_checked(monkeypatch, tmp_path):
    monkeypatch.delenv("TDM_R1_REWARD_TOKEN", raising=False)
    with pytest.raises(ConfigError, match="no token: set the environment variable TDM_R1_REWARD_TOKEN"):
        build_reward(RewardTermConfig(name="remote", options={"url": "http://127.0.0.1:1"}))
    with pytest.raises(ConfigError, match="must be an http"):
        build_reward(RewardTermConfig(name="remote", options={"url": "127.0.0.1:1"}))
    (tmp_path / "t").write_text(TOKEN)
    r = build_reward(RewardTermConfig(name="remote", options={"url": "http://h:1", "token_file": str(tmp_path / "t")}))
    assert r.token == TOKEN


def settled(url) -> int:
    """requests_served once the server is idle (requests earlier tests abandoned on a timeout finish meanwhile)."""
    import time

    last, deadline = None, time.time() + 60
    while time.time() < deadline:
        health = request(url, token=None, path="/health")[1]
        if health["queue_depth"] == 0 and health["requests_served"] == last:
            return last
        last = health["requests_served"]
        time.sleep(1.0)
    raise AssertionError("the server did not go idle within 60 s")


def test_load_eight_clients_fifty_requests_each(judge_server, capsys):
    """8 concurrent `remote` clients x 50 requests of 2 images against a queue of 8 images: the server sheds load
    with 503 + Retry-After, the clients retry, and every answer matches its request (request id and scores): none is
    lost."""
    import time

    wrong, stats = [], []

    def client(k):
        remote = RemoteReward(RemoteOptions(url=judge_server.url, retries=20, backoff_s=0.02, chunk=2), TOKEN)
        for i in range(50):
            x = images(2, seed=1000 * k + i)
            got = remote(x, ["p", "q"], [{}, {}])
            want = score_images(Judge(), quantised(x), ["p", "q"], [{}, {}])
            if not torch.equal(got, want):
                wrong.append((k, i, got.tolist(), want.tolist()))
        stats.append(remote.take_stats() | {"latencies": None})

    served_before = settled(judge_server.url)
    threads = [threading.Thread(target=client, args=(k,)) for k in range(8)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    wall = time.perf_counter() - t0
    assert not wrong and len(stats) == 8 and all(s["failed_chunks"] == 0 for s in stats)
    health = request(judge_server.url, token=None, path="/health")[1]
    assert health["requests_served"] - served_before == 400  # every request scored exactly once
    retries = sum(s["retries"] for s in stats)
    p50 = sorted(s["latency_p50_ms"] for s in stats)[4]
    p95 = max(s["latency_p95_ms"] for s in stats)
    with capsys.disabled():
        print(f"\nload: 8 x 50 requests in {wall:.2f} s, {retries} retries after 503, per-request latency p50 "
              f"{p50:.1f} ms (median client), p95 {p95:.1f} ms (worst client); server p50 / p95 "
              f"{health['latency_ms']['p50']} / {health['latency_ms']['p95']} ms")  # fmt: skip
