"""Recipe images with real VMs: apt packages and pip wheels in the guest, a rootfs tarball made from
Debian packages, the per-child disk layer (isolation, host disk instead of guest RAM, BRANCH), bad input.

The images are built into the user's image root (cached between runs like the default image); packages
come from the Debian mirror and PyPI, as a user's build would.
"""
from __future__ import annotations

import tarfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from forkd.engine import Child, Engine
from forkd.errors import ForkdError, ImageBuildError, SnapshotInvalidError, ValidationError
from forkd.fsutil import sha256_file
from forkd.guest import rootfs
from forkd.guest.image import deb_cache_dir
from forkd.guest.recipe import Recipe, build_recipe, find_named
from forkd.paths import image_root

pytestmark = pytest.mark.timeout(1800)

IMAGE = "test-jq-yaml"
SNAP = "img-jq-yaml"


@pytest.fixture(scope="module")
def jq_image(forkd_home: Path) -> object:
    return build_recipe(Recipe(name=IMAGE, apt=["jq"], pip=["pyyaml"], env={"FORKD_TEST": "on"},
                               workdir="/work"))


@pytest.fixture(scope="module")
def jq_snapshot(engine: Engine, jq_image: object) -> str:
    engine.create_snapshot(SNAP, memory_mib=512, image_name=IMAGE, warm_code="import yaml")
    return SNAP


@pytest.fixture
def children(engine: Engine) -> Iterator[list[Child]]:
    made: list[Child] = []
    yield made
    for c in made:
        c.kill()


def fork(engine: Engine, tag: str, made: list[Child], n: int = 1) -> list[Child]:
    results = engine.spawn(tag, n)
    made.extend(r.child for r in results if r.child is not None)
    assert all(r.child is not None for r in results), [r.error for r in results]
    return [r.child for r in results if r.child is not None]


def test_pip_wheel_with_c_extension_and_apt_binary(engine: Engine, jq_snapshot: str, children: list[Child]) -> None:
    (c,) = fork(engine, jq_snapshot, children)
    r = c.run_code("import yaml\nprint(yaml.__with_libyaml__, yaml.safe_dump({'a': [1, 2]}))")
    assert r["stdout"].startswith("True a:"), r  # the C extension (_yaml) of the wheel loaded
    out = c.exec(["jq", "-n", "[1,2,3] | add"])
    assert (out.exit_code, out.stdout.strip()) == (0, "6"), out
    assert c.eval("__import__('os').environ.get('FORKD_TEST')")["value"] == "on"
    assert c.eval("__import__('os').getcwd()")["value"] == "/work"
    assert c.eval("__import__('sys').executable")["value"].startswith("/usr/bin/python3")
    assert c.exec(["sh", "-c", "echo $((6 * 7))"]).stdout.strip() == "42"


def test_child_disk_layer_is_private_on_host_disk_and_branches(engine: Engine, jq_snapshot: str, jq_image: object,
                                                               children: list[Child]) -> None:
    a, b = fork(engine, jq_snapshot, children, 2)
    pss_before = a.memory()["Pss"]
    # more than the guest's 512 MiB of RAM, written to its own disk layer
    r = a.exec(["sh", "-c", "dd if=/dev/zero of=/root/big bs=1M count=600 status=none && sync && "
                "stat -c %s /root/big"], timeout=900)
    assert (r.exit_code, r.stdout.strip()) == (0, str(600 << 20)), r
    top = Path(a.vm.meta["disk_top"])
    assert top.stat().st_size > 600 << 20  # on the host's disk ...
    assert a.memory()["Pss"] - pss_before < 600 << 10  # ... not in the child's memory (KiB)
    with pytest.raises(ForkdError, match="No such file"):
        b.stat("/root/big")
    (fresh,) = fork(engine, jq_snapshot, children)
    with pytest.raises(ForkdError, match="No such file"):
        fresh.stat("/root/big")
    assert sha256_file(jq_image.rootfs) == jq_image.rootfs_sha256  # type: ignore[attr-defined]

    tag = "img-branch"
    res = engine.branch(a, tag)
    try:
        a.write_file("/root/after-branch", b"later")
        (g,) = fork(engine, tag, children)
        assert g.stat("/root/big")["size"] == 600 << 20
        assert g.exec(["sh", "-c", "head -c 4 /root/big | od -An -tx1"]).stdout.split() == ["00"] * 4
        with pytest.raises(ForkdError, match="No such file"):
            g.stat("/root/after-branch")
        g.write_file("/root/grandchild", b"g")
        with pytest.raises(ForkdError, match="No such file"):
            a.stat("/root/grandchild")
        assert a.stat("/root/after-branch")["size"] == 5
        assert res.snapshot.meta.disk["layers"] == [jq_snapshot, tag]
    finally:
        for c in list(children):
            c.kill()
        children.clear()
        engine.delete_snapshot(tag)


def test_snapshot_of_a_missing_image_is_refused(engine: Engine, jq_snapshot: str, jq_image: object) -> None:
    fs = Path(jq_image.rootfs)  # type: ignore[attr-defined]
    moved = fs.with_name("rootfs.ext4.away")
    fs.rename(moved)
    try:
        with pytest.raises(SnapshotInvalidError, match=f"image {IMAGE} .* is not here"):
            engine.open_snapshot(jq_snapshot)
    finally:
        moved.rename(fs)
    engine.open_snapshot(jq_snapshot)


def _debian_rootfs_tar(tmp: Path) -> Path:
    """A root file system tarball made from Debian packages (Python and a shell), as docker export would."""
    tree = tmp / "tree"
    tree.mkdir()
    rootfs.merged_usr_skeleton(tree)
    resolved = rootfs.resolve_apt(["python3-minimal", "libpython3.11-stdlib", "dash"], b"")
    for deb in rootfs.download_debs(resolved, deb_cache_dir()):
        rootfs.install_deb(deb, tree)
    out = tmp / "rootfs.tar"
    with tarfile.open(out, "w") as tar:
        tar.add(tree, arcname=".")
    return out


def test_image_from_a_rootfs_tarball(engine: Engine, tmp_path: Path, children: list[Child]) -> None:
    tar = _debian_rootfs_tar(tmp_path)
    info = build_recipe(Recipe(name="test-rootfs-tar", rootfs=tar, copy=[(Path(__file__), "/opt/t.py")]))
    assert find_named("test-rootfs-tar").image_id == info.image_id
    tag = "img-rootfs-tar"
    engine.create_snapshot(tag, memory_mib=256, image_name="test-rootfs-tar")
    try:
        (c,) = fork(engine, tag, children)
        assert c.eval("__import__('sys').version_info[:2]")["value"] == [3, 11]
        assert c.eval("'numpy' in globals()")["value"] is False  # numpy is optional
        assert c.stat("/opt/t.py")["size"] == Path(__file__).stat().st_size
        assert c.run_code("x = 41\nx += 1")["stdout"] == ""
        assert c.eval("x")["value"] == 42
    finally:
        for c in children:
            c.kill()
        children.clear()
        engine.delete_snapshot(tag)


# ---------------------------------------------------------------- bad input: named, nothing cached


def _nothing_named(name: str) -> None:
    with pytest.raises(ForkdError, match="no image named"):
        find_named(name)
    assert not list(image_root().glob(".staging-*"))


def test_unknown_apt_package_is_named(forkd_home: Path) -> None:
    with pytest.raises(ImageBuildError, match="unknown package forkd-no-such-package"):
        build_recipe(Recipe(name="bad-apt", apt=["forkd-no-such-package"]))
    _nothing_named("bad-apt")


def test_unknown_pip_package_is_named(forkd_home: Path) -> None:
    with pytest.raises(ImageBuildError, match="no wheel of forkd-no-such-package-xyz"):
        build_recipe(Recipe(name="bad-pip", pip=["forkd-no-such-package-xyz"]))
    _nothing_named("bad-pip")


def test_wheel_without_a_build_for_the_guest_platform(forkd_home: Path) -> None:
    with pytest.raises(ImageBuildError, match=r"no wheel of pywin32.*CPython 3\.11.*x86_64"):
        build_recipe(Recipe(name="bad-platform", pip=["pywin32"]))
    _nothing_named("bad-platform")


def test_rootfs_without_python_says_what_it_looked_for(forkd_home: Path, tmp_path: Path) -> None:
    tree = tmp_path / "nopy"
    (tree / "etc").mkdir(parents=True)
    (tree / "etc" / "hostname").write_text("x\n")
    with pytest.raises(ImageBuildError, match="no usable Python: looked for /usr/local/bin/python3, /usr/bin/python3"):
        build_recipe(Recipe(name="bad-nopy", rootfs=tree))
    _nothing_named("bad-nopy")


def test_bad_recipe_fields_are_named(forkd_home: Path) -> None:
    for recipe, field in ((Recipe(name="Bad Name"), "name"), (Recipe(name="x", apt=["-oAPT::x=1"]), "apt"),
                          (Recipe(name="x", pip=["--index-url=http://evil"]), "pip"),
                          (Recipe(name="x", env={"A B": "1"}), "env"), (Recipe(name="x", workdir="rel"), "workdir"),
                          (Recipe(name="x", disk_mib=10), "disk_mib"),
                          (Recipe(name="x", copy=[(Path("/etc/hostname"), "/a/../../b")]), "copy")):
        with pytest.raises(ValidationError, match=field):
            recipe.check()


def test_pack_of_an_image_snapshot_forks_on_a_fresh_root(engine: Engine, jq_snapshot: str, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch,
                                                         children: list[Child]) -> None:
    from forkd.engine.pack import pack, unpack

    (c,) = fork(engine, jq_snapshot, children)
    c.write_file("/root/note", b"from the branch")
    tag = "img-pack-br"
    engine.branch(c, tag)
    try:
        out = tmp_path / "img.tar.zst"
        res = pack(engine.store, tag, out)
        assert [r["path"] for r in res["files"]][:4] == [".image/image.json", ".image/vmlinuz",
                                                         ".image/initramfs.cpio", ".image/rootfs.ext4"]
        fresh_images = tmp_path / "images"
        monkeypatch.setenv("FORKD_IMAGE_ROOT", str(fresh_images))
        eng = Engine(snapshot_root=tmp_path / "root", run_dir=tmp_path / "run")
        made: list[Child] = []
        try:
            assert unpack(eng.store, out) == [jq_snapshot, tag]
            assert (fresh_images / engine.store.open(tag).meta.disk["image"] / "rootfs.ext4").is_file()
            (g,) = fork(eng, tag, made)
            assert g.read_file("/root/note") == b"from the branch"
            assert g.exec(["jq", "-n", "2*21"]).stdout.strip() == "42"
            assert unpack(eng.store, out) == [jq_snapshot, tag]  # the second time everything is reused
        finally:
            for m in made:
                m.kill()
            eng.close()
    finally:
        monkeypatch.undo()
        for ch in list(children):
            ch.kill()
        children.clear()
        engine.delete_snapshot(tag)
