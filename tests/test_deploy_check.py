"""The container check's pieces that need no Docker engine."""

from __future__ import annotations

from deploy.check import sample_test_images


def test_sample_test_images_takes_the_first_of_each_class_from_the_test_split(
    tmp_path, image_tree_factory, tar_archive_factory
):
    tree = image_tree_factory(tmp_path / "tree", classes=("cat", "dog", "frog"), counts={"train": 3, "test": 3},
                              suffix=".jpg")  # fmt: skip
    archive = tar_archive_factory(tree, tmp_path / "data.tar.gz", top="cifar")
    chosen = sample_test_images(archive, per_class=2)
    assert [label for label, _ in chosen] == ["cat", "cat", "dog", "dog", "frog", "frog"]
    expected = (tree / "test" / "cat" / "000.jpg").read_bytes()
    assert chosen[0][1] == expected
    assert all(blob[:2] == b"\xff\xd8" for _, blob in chosen)  # JPEGs, not the train split's or a folder entry


def test_a_held_back_request_head_is_reported_with_what_the_server_did(monkeypatch):
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

    from deploy import check
    from service.http_protocol import ConnectionLimits
    from tests.support.servers import serving

    limited = type("FastLimits", (ConnectionLimits, HttpToolsProtocol), {"head_timeout_s": 0.5})
    with serving(limited) as port:
        answer = check.slow_head_answer(*check.hold_back_head(port))
    assert answer["status"] == 408 and answer["code"] == "request_head_timeout"
    assert 0.5 <= answer["closed_after_s"] < 5
    assert check.slow_head(answer) == f"408 `request_head_timeout`, closed after {answer['closed_after_s']} s"
    monkeypatch.setattr(check, "SLOW_HEAD_WAIT_S", 1)
    with serving(HttpToolsProtocol) as port:  # uvicorn's own: holds the connection
        answer = check.slow_head_answer(*check.hold_back_head(port))
    assert check.slow_head(answer) == "NOT closed within 1 s (TimeoutError)"
