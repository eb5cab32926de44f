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
