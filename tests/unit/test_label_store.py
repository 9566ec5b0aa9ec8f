"""The label store: labels survive reopening (another process's view), several labellers average, undo restores the
label before, a republished image keeps its labels, tokens are stored only hashed, and export writes every label."""

import csv
import json
import sqlite3

import pytest

from tdm_r1.labels.store import LabelError, LabelStore, image_id, token_hash


@pytest.fixture
def store(tmp_path):
    s = LabelStore.of_run(tmp_path)
    yield s
    s.close()


def publish(store, epoch=1, n=4):
    pngs = [f"png-{epoch}-{i}".encode() for i in range(n)]
    return store.publish(epoch, 0, pngs, [f"prompt {i}" for i in range(n)], [f"item{i}" for i in range(n)])


def test_labels_persist_and_several_labellers_average(store, tmp_path):
    ids = publish(store)
    ann, bob = store.add_labeller("ann"), store.add_labeller("bob")
    assert store.labeller_of(ann) == "ann" and store.labeller_of(bob) == "bob" and store.labeller_of("nope") is None
    store.label(ids[0], "ann", 1)
    store.label(ids[0], "bob", 0)
    store.label(ids[1], "ann", 1)
    store.label(ids[1], "ann", 0)  # changed her mind: the latest counts
    other = LabelStore.of_run(tmp_path)  # a second connection, as the page and the trainer hold
    assert other.means(ids) == {ids[0]: 0.5, ids[1]: 0.0}
    assert other.progress(1) == (2, 4)
    assert other.labels_of("ann", 1) == {ids[0]: 1, ids[1]: 0}
    other.close()


def test_undo_restores_the_label_before(store):
    ids = publish(store)
    store.add_labeller("ann")
    store.label(ids[0], "ann", 1)
    store.label(ids[0], "ann", 0)
    store.label(ids[1], "ann", 1)
    assert store.undo("ann") == ids[1] and store.means(ids) == {ids[0]: 0.0}
    assert store.undo("ann") == ids[0] and store.means(ids) == {ids[0]: 1.0}
    assert store.undo("ann") == ids[0] and store.means(ids) == {}
    assert store.undo("ann") is None


def test_a_republished_image_keeps_its_labels_and_ids_are_content_ids(store):
    ids = publish(store)
    store.add_labeller("ann")
    store.label(ids[2], "ann", 1)
    assert publish(store) == ids and store.means(ids) == {ids[2]: 1.0}
    assert ids[0] == image_id(1, 0, b"png-1-0") and all(set(i) <= set("0123456789abcdef-e") for i in ids)
    publish(store, epoch=2)
    assert store.latest_epoch() == 2 and [im.position for im in store.images()] == [0, 1, 2, 3]
    assert [im.prompt for im in store.images(1)][:2] == ["prompt 0", "prompt 1"]
    assert store.png(ids[3]) == b"png-1-3" and store.png("e1-../../etc/passwd") is None


def test_bad_labels_are_refused_by_name(store):
    ids = publish(store)
    store.add_labeller("ann")
    cases = [((ids[0], "ann", 2), "0 .* or 1"), ((ids[0], "ann", True), "0 .* or 1"),
             (("nope", "ann", 1), "no image 'nope'"), ((ids[0], "zed", 1), "no labeller 'zed'")]  # fmt: skip
    for args, match in cases:
        with pytest.raises(LabelError, match=match):
            store.label(*args)
    with pytest.raises(LabelError, match="letters, digits"):
        store.add_labeller("a b")


def test_tokens_are_stored_hashed(store):
    token = store.add_labeller("ann")
    rows = sqlite3.connect(store.path).execute("SELECT name, token_sha256 FROM labellers").fetchall()
    assert rows == [("ann", token_hash(token))] and token not in str(rows)
    new = store.add_labeller("ann")  # a new token replaces the old one
    assert store.labeller_of(new) == "ann" and store.labeller_of(token) is None


def test_state_and_export(store, tmp_path):
    ids = publish(store)
    store.add_labeller("ann")
    store.add_labeller("bob")
    store.label(ids[1], "bob", 0)
    store.label(ids[0], "ann", 1)
    store.set_state(status="waiting", epoch=1, needed=3)
    assert store.state() == {"status": "waiting", "epoch": 1, "needed": 3}
    assert store.export(tmp_path / "l.jsonl") == 2
    rows = [json.loads(x) for x in (tmp_path / "l.jsonl").read_text().splitlines()]
    assert [(r["image_id"], r["labeller"], r["label"], r["prompt"]) for r in rows] == [
        (ids[0], "ann", 1, "prompt 0"), (ids[1], "bob", 0, "prompt 1")]  # fmt: skip
    assert store.export(tmp_path / "l.csv") == 2
    table = list(csv.DictReader(open(tmp_path / "l.csv")))
    assert [r["labeller"] for r in table] == ["ann", "bob"] and table[0]["epoch"] == "1"
    with pytest.raises(LabelError, match=".jsonl or .csv"):
        store.export(tmp_path / "l.txt")
