"""Recipe images without VMs: hostile archives, the recipe file, the guest's Python, the disk record."""
from __future__ import annotations

import io
import json
import os
import tarfile
from pathlib import Path

import pytest

from forkd.engine import disk
from forkd.engine.qemu import MachineSpec, default_devices
from forkd.errors import ImageBuildError, SnapshotInvalidError, ValidationError
from forkd.guest import rootfs
from forkd.guest.recipe import Recipe


def _tar(members: list[tuple[str, str, bytes | str]]) -> io.BytesIO:
    """A tar of (kind, name, data-or-link-target) members, kind in file/dir/sym/hard."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for kind, name, data in members:
            ti = tarfile.TarInfo(name)
            if kind == "file":
                raw = data if isinstance(data, bytes) else data.encode()
                ti.size = len(raw)
                tar.addfile(ti, io.BytesIO(raw))
                continue
            ti.type = {"dir": tarfile.DIRTYPE, "sym": tarfile.SYMTYPE, "hard": tarfile.LNKTYPE}[kind]
            if kind in ("sym", "hard"):
                ti.linkname = str(data)
            tar.addfile(ti)
    buf.seek(0)
    return buf


def test_member_with_dotdot_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ImageBuildError, match="leaves the root"):
        rootfs.extract_tar(_tar([("file", "../escape", b"x")]), tmp_path / "root")
    assert not (tmp_path / "escape").exists()


def test_write_through_a_symlink_is_refused(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    root = tmp_path / "root"
    root.mkdir()
    with pytest.raises(ImageBuildError, match="through the symlink"):
        rootfs.extract_tar(_tar([("sym", "etc", str(outside)), ("file", "etc/passwd", b"owned")]), root)
    assert not (outside / "passwd").exists()


def test_hard_link_outside_the_root_is_refused(tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    with pytest.raises(ImageBuildError):
        rootfs.extract_tar(_tar([("hard", "shadow", "../../etc/shadow")]), root)


def test_absolute_names_and_symlinks_stay_inside(tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    rootfs.extract_tar(_tar([("dir", "/usr/bin", b""), ("file", "/usr/bin/python3.12", b"#!"),
                             ("sym", "./usr/bin/python3", "python3.12"), ("file", ".hidden", b"h")]), root)
    assert (root / "usr/bin/python3.12").read_bytes() == b"#!"
    assert os.readlink(root / "usr/bin/python3") == "python3.12"
    assert (root / ".hidden").is_file()  # a leading dot is part of the name


def test_merged_usr_and_whiteouts(tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    rootfs.merged_usr_skeleton(root)
    rootfs.extract_tar(_tar([("dir", "./bin", b""), ("file", "./bin/jq", b"elf")]), root, merged_usr=True)
    assert (root / "usr/bin/jq").read_bytes() == b"elf" and (root / "bin").is_symlink()
    rootfs.extract_tar(_tar([("file", "opt/a", b"1"), ("file", "opt/b", b"2")]), root)
    rootfs.extract_tar(_tar([("file", "opt/.wh.a", b"")]), root, whiteouts=True)
    assert not (root / "opt/a").exists() and (root / "opt/b").exists()
    rootfs.extract_tar(_tar([("file", "opt/.wh..wh..opq", b"")]), root, whiteouts=True)
    assert list((root / "opt").iterdir()) == []


def _fake_python(root: Path, minor: int, stdlib: bool = True) -> None:
    (root / "usr/bin").mkdir(parents=True, exist_ok=True)
    (root / f"usr/bin/python3.{minor}").write_bytes(b"\x7fELF")
    (root / "usr/bin/python3").symlink_to(f"python3.{minor}")
    if stdlib:
        (root / f"usr/lib/python3.{minor}/json").mkdir(parents=True)
        (root / f"usr/lib/python3.{minor}/json/__init__.py").write_text("")


def test_find_python_follows_links_and_checks_the_version(tmp_path: Path) -> None:
    good = tmp_path / "good"
    _fake_python(good, 12)
    py = rootfs.find_python(good)
    assert (py.path, py.version) == ("/usr/bin/python3.12", (3, 12))
    old = tmp_path / "old"
    _fake_python(old, 8)
    with pytest.raises(ImageBuildError, match=r"no usable Python.*python3 \(3\.8\)"):
        rootfs.find_python(old)
    bare = tmp_path / "bare"
    _fake_python(bare, 11, stdlib=False)
    with pytest.raises(ImageBuildError, match="without its standard library"):
        rootfs.find_python(bare)


def test_recipe_file_fields_and_errors(tmp_path: Path) -> None:
    (tmp_path / "req.txt").write_text("pyyaml\n")
    f = tmp_path / "r.toml"
    f.write_text('name = "pandas"\napt = ["jq"]\npip = ["pandas<3"]\nrequirements = ["req.txt"]\n'
                 'env = { MODE = "x" }\nworkdir = "/work"\ndisk_mib = 4096\ncopy = ["req.txt:/opt/req.txt"]\n')
    r = Recipe.from_toml(f, apt=["git"]).check()
    assert (r.name, r.apt, r.pip, r.env, r.workdir, r.disk_mib) == ("pandas", ["jq", "git"], ["pandas<3"],
                                                                     {"MODE": "x"}, "/work", 4096)
    assert r.requirements == [tmp_path / "req.txt"] and r.copy == [(tmp_path / "req.txt", "/opt/req.txt")]
    f.write_text('name = "x"\nimage = "debian"\n')
    with pytest.raises(ValidationError, match="unknown field.*image"):
        Recipe.from_toml(f)
    f.write_text('name = "x"\napt = "jq"\n')
    with pytest.raises(ValidationError, match="apt must be a list"):
        Recipe.from_toml(f)


def test_pip_specs_cannot_be_options() -> None:
    for bad in ("--index-url=http://x", "-e .", "pkg @@", "", "x @ file:///etc/shadow"):
        with pytest.raises(ImageBuildError, match="pip"):
            rootfs.check_pip_spec(bad)
    assert rootfs.check_pip_spec("numpy>=1.26,<3") == "numpy>=1.26,<3"


def test_blockdev_args_are_json_and_name_every_layer(tmp_path: Path) -> None:
    chain = disk.DiskChain(Path("/img/a,b/rootfs.ext4"), (Path("/s/p/disk.qcow2"),), 2 << 30)
    args = chain.blockdev_args(Path("/c/disk.qcow2"))
    nodes = [json.loads(a) for a in args[1::2]]
    assert args[::2] == ["-blockdev"] * 3
    assert nodes[0]["file"]["filename"] == "/img/a,b/rootfs.ext4" and nodes[0]["read-only"] is True
    assert nodes[1]["backing"] == "d0" and nodes[1]["read-only"] is True
    assert nodes[2]["node-name"] == disk.ROOT_NODE and nodes[2]["backing"] == "d1" and "read-only" not in nodes[2]


def test_disk_record_is_checked() -> None:
    good = {"image": "0123456789abcdef", "size_bytes": 1 << 31, "layers": ["a", "b"], "layer_sha256": []}
    assert disk.check_record(good, "b") is good
    for bad, why in (({**good, "layers": ["a", "../x", "b"]}, "disk.layers must match"),
                     ({**good, "layers": ["a"]}, "end with"),
                     ({**good, "size_bytes": "1"}, "size_bytes"), ({**good, "image": "../../etc"}, "image id"),
                     ({**good, "layers": ["b"] * 65}, "1..64")):
        with pytest.raises(SnapshotInvalidError, match=why):
            disk.check_record(bad, "b")


def test_spec_with_a_disk_is_accepted_and_other_devices_are_not() -> None:
    spec = MachineSpec(devices=(*default_devices(), disk.DISK_DEVICE)).check()
    assert spec.has_disk
    d = spec.to_json()
    d["devices"] = [*default_devices(), "virtio-blk-device,drive=root,serial=x"]
    with pytest.raises(SnapshotInvalidError, match="spec.devices"):
        MachineSpec.from_json(d)


def test_qcow2_layers_that_would_open_other_files_are_refused(tmp_path: Path) -> None:
    import subprocess

    ok = tmp_path / "ok.qcow2"
    disk.new_layer(ok, 256 << 20)
    disk.check_qcow2(ok, "layer")
    for opts, why in (("data_file=" + str(tmp_path / "host-file"), "external data file"),
                      ("encrypt", "encryption"), ("compat=0.10", "version 2")):
        bad = tmp_path / "bad.qcow2"
        bad.unlink(missing_ok=True)
        # qemu-img's luks set-up times its key derivation and fails on a loaded host ("Unable to get
        # accurate CPU usage"): an encrypted layer is a plain one with crypt_method 2 (LUKS) in its header
        extra = [] if opts == "encrypt" else ["-o", opts]
        argv = ["qemu-img", "create", "-q", "-f", "qcow2", *extra, str(bad), "64M"]
        subprocess.run(argv, check=True, capture_output=True)
        if opts == "encrypt":
            with open(bad, "r+b") as f:
                f.seek(32)
                f.write((2).to_bytes(4, "big"))
        with pytest.raises(SnapshotInvalidError, match=why):
            disk.check_qcow2(bad, "layer")
    with pytest.raises(SnapshotInvalidError, match="not a qcow2"):
        disk.check_qcow2(tmp_path / "host-file", "layer")


def _layer(members: list[tuple[str, str, bytes | str]], gz: bool) -> bytes:
    import gzip

    raw = _tar(members).getvalue()
    return gzip.compress(raw) if gz else raw


def test_docker_save_and_oci_layout_layers_apply_in_order(tmp_path: Path) -> None:
    import hashlib

    l1 = _layer([("dir", "usr/bin", b""), ("file", "usr/bin/tool", b"v1"), ("file", "etc/old", b"x")], gz=False)
    l2 = _layer([("file", "usr/bin/tool", b"v2"), ("file", "etc/.wh.old", b"")], gz=True)
    # docker save: manifest.json names the layer tars
    save = tmp_path / "save.tar"
    with tarfile.open(save, "w") as tar:
        for name, data in (("manifest.json", json.dumps([{"Layers": ["a/layer.tar", "b/layer.tar"]}]).encode()),
                           ("a/layer.tar", l1), ("b/layer.tar", l2)):
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            tar.addfile(ti, io.BytesIO(data))
    root = tmp_path / "r1"
    root.mkdir()
    assert rootfs.unpack_oci(save, root) == 2
    assert (root / "usr/bin/tool").read_bytes() == b"v2" and not (root / "etc/old").exists()
    # OCI layout directory: index.json -> manifest blob -> layer blobs
    layout = tmp_path / "layout"
    blobs = layout / "blobs" / "sha256"
    blobs.mkdir(parents=True)

    def blob(data: bytes) -> str:
        digest = hashlib.sha256(data).hexdigest()
        (blobs / digest).write_bytes(data)
        return f"sha256:{digest}"
    manifest = json.dumps({"layers": [{"digest": blob(l1)}, {"digest": blob(l2)}]}).encode()
    (layout / "index.json").write_text(json.dumps({"manifests": [{"digest": blob(manifest)}]}))
    root2 = tmp_path / "r2"
    root2.mkdir()
    assert rootfs.unpack_oci(layout, root2) == 2
    assert (root2 / "usr/bin/tool").read_bytes() == b"v2" and not (root2 / "etc/old").exists()
    (layout / "index.json").write_text(json.dumps({"manifests": [{"digest": "sha256:../../../etc/passwd"}]}))
    with pytest.raises(ImageBuildError, match="not a content digest"):
        rootfs.unpack_oci(layout, tmp_path / "r3")


def test_directory_member_never_chmods_through_a_symlink(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir(mode=0o700)
    root = tmp_path / "root"
    root.mkdir()
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        link = tarfile.TarInfo("evil")
        link.type, link.linkname = tarfile.SYMTYPE, str(outside)
        tar.addfile(link)
        d = tarfile.TarInfo("evil")
        d.type, d.mode = tarfile.DIRTYPE, 0o777
        tar.addfile(d)
    buf.seek(0)
    rootfs.extract_tar(buf, root)
    assert (outside.stat().st_mode & 0o777) == 0o700 and (root / "evil").is_dir() and not (root / "evil").is_symlink()


def test_whiteout_of_dotdot_is_refused(tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / "opt").mkdir(parents=True)
    with pytest.raises(ImageBuildError, match="whiteout"):
        rootfs.extract_tar(_tar([("file", "opt/.wh...", b"")]), root, whiteouts=True)
    assert root.is_dir()


def _hostile_tree(tmp_path: Path) -> tuple[Path, Path]:
    """A tree whose /etc, /var/lib/dpkg and /opt/app are links out of it (as a hostile rootfs leaves them)."""
    outside = tmp_path / "outside"
    (outside / "dpkg").mkdir(parents=True)
    (outside / "dpkg" / "status").write_text("host status\n")
    (outside / "passwd").write_text("host passwd\n")
    root = tmp_path / "root"
    (root / "var" / "lib").mkdir(parents=True)
    os.symlink(outside, root / "etc")
    os.symlink(outside / "dpkg", root / "var" / "lib" / "dpkg")
    (root / "opt").mkdir()
    os.symlink(outside, root / "opt" / "app")
    return root, outside


def _snapshot_of(d: Path) -> dict[str, bytes]:
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def test_writes_after_unpacking_never_follow_the_images_links(tmp_path: Path) -> None:
    from forkd.guest import recipe as recipes

    root, outside = _hostile_tree(tmp_path)
    before = _snapshot_of(outside)
    with pytest.raises(ImageBuildError, match="symlink /etc"):
        recipes._forkd_files(root, Recipe(name="x", env={"A": "1"}))
    with pytest.raises(ImageBuildError, match="symlink /var/lib/dpkg"):
        rootfs.write_guarded(root, rootfs.DPKG_STATUS, b"Package: evil\n\n", append=True)
    assert rootfs.read_status(root) == b""  # never read through the link either
    # --copy onto a link: the link is replaced by a real directory inside the tree
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "sub" / "f").write_text("mine")
    rootfs.copy_in(src, "/opt/app", root)
    assert not (root / "opt" / "app").is_symlink() and (root / "opt/app/sub/f").read_text() == "mine"
    # a link below a copied directory is replaced too, not written through
    os.symlink(outside, root / "opt" / "app" / "sub2")
    (src / "sub2").mkdir()
    (src / "sub2" / "passwd").write_text("mine")
    rootfs.copy_in(src, "/opt/app", root)
    assert (root / "opt/app/sub2/passwd").read_text() == "mine"
    with pytest.raises(ImageBuildError, match="symlink /etc"):
        rootfs.copy_in(src / "sub" / "f", "/etc/passwd", root)
    assert _snapshot_of(outside) == before


def test_skeleton_files_are_not_written_through_links(tmp_path: Path) -> None:
    from forkd.guest import recipe as recipes

    outside = tmp_path / "outside"
    outside.mkdir()
    root = tmp_path / "root"
    root.mkdir()
    os.symlink(outside, root / "var")
    with pytest.raises(ImageBuildError, match="symlink /var"):
        recipes._skeleton(root)
    assert list(outside.iterdir()) == []


def test_pip_target_is_placed_through_the_guard(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root, outside = _hostile_tree(tmp_path)
    (root / "opt" / "app").unlink()
    os.symlink(outside, root / "opt" / "forkd")

    def fake_pip(target: Path, *args: object) -> None:
        (target / "pkg").mkdir()
        (target / "pkg" / "__init__.py").write_text("x = 1\n")
    monkeypatch.setattr(rootfs, "_pip", fake_pip)
    py = rootfs.GuestPython("/usr/bin/python3.11", (3, 11), (2, 36))
    with pytest.raises(ImageBuildError, match="symlink /opt/forkd"):
        rootfs.pip_install(root, py, ["pkg"], [])
    assert not (outside / "python").exists()
    (root / "opt" / "forkd").unlink()
    rootfs.pip_install(root, py, ["pkg"], [])
    assert (root / rootfs.PIP_TARGET / "pkg" / "__init__.py").read_text() == "x = 1\n"
    assert oct((root / rootfs.PIP_TARGET).stat().st_mode & 0o777) == "0o755"
    assert not list(tmp_path.glob(".pip-*"))


def test_wheel_platforms_follow_the_guests_c_library(tmp_path: Path) -> None:
    py = rootfs.GuestPython("/usr/bin/python3.12", (3, 12), (2, 36))
    tags, libc = rootfs.wheel_platforms(tmp_path, py)
    assert tags[0] == "manylinux_2_36_x86_64" and libc == "glibc 2.36"
    musl = rootfs.GuestPython("/usr/bin/python3.12", (3, 12), None)
    with pytest.raises(ImageBuildError, match="neither glibc"):
        rootfs.wheel_platforms(tmp_path, musl)
    (tmp_path / "lib").mkdir()
    (tmp_path / "lib" / "ld-musl-x86_64.so.1").write_bytes(b"")
    tags, libc = rootfs.wheel_platforms(tmp_path, musl)
    assert libc == "musl" and all(t.startswith("musllinux") for t in tags)


def test_oci_status_is_the_last_layers_unless_whited_out(tmp_path: Path) -> None:
    def save(*layers: bytes) -> Path:
        out = tmp_path / f"save{len(layers)}.tar"
        names = [f"l{i}/layer.tar" for i in range(len(layers))]
        with tarfile.open(out, "w") as tar:
            members = [("manifest.json", json.dumps([{"Layers": names}]).encode()), *zip(names, layers, strict=True)]
            for name, data in members:
                ti = tarfile.TarInfo(name)
                ti.size = len(data)
                tar.addfile(ti, io.BytesIO(data))
        return out
    a = _layer([("file", "var/lib/dpkg/status", b"Package: a\n")], gz=True)
    b = _layer([("file", "var/lib/dpkg/.wh.status", b"")], gz=False)
    c = _layer([("file", "./var/lib/dpkg/status", b"Package: c\n")], gz=False)
    opq = _layer([("file", "var/lib/.wh..wh..opq", b"")], gz=False)
    assert rootfs.oci_status(save(a)) == b"Package: a\n"
    assert rootfs.oci_status(save(a, b)) == b""
    assert rootfs.oci_status(save(a, b, c)) == b"Package: c\n"
    assert rootfs.oci_status(save(a, b, c, opq)) == b""


def test_oci_layout_blob_links_are_refused(tmp_path: Path) -> None:
    layout = tmp_path / "layout"
    layout.mkdir()
    (tmp_path / "host-index.json").write_text(json.dumps({"manifests": []}))
    os.symlink(tmp_path / "host-index.json", layout / "index.json")
    with pytest.raises(ImageBuildError, match="not a link"):
        rootfs.unpack_oci(layout, tmp_path / "r")


def test_qcow2_extension_beyond_the_first_4k_is_seen(tmp_path: Path) -> None:
    import struct

    layer = tmp_path / "l.qcow2"
    disk.new_layer(layer, 256 << 20)
    data = bytearray(layer.read_bytes())
    header_length, = struct.unpack_from(">I", data, 100)
    # move the extension area: padding extensions up to past 4 KiB, then an external data file one
    off = header_length
    pad = 4096 - off + 64
    struct.pack_into(">II", data, off, 0x12345678, pad)
    off += 8 + (pad + 7) // 8 * 8
    name = b"/etc/shadow"
    struct.pack_into(">II", data, off, disk._EXT_DATA_FILE, len(name))
    data[off + 8:off + 8 + len(name)] = name
    off += 8 + (len(name) + 7) // 8 * 8
    struct.pack_into(">II", data, off, 0, 0)
    layer.write_bytes(bytes(data))
    with pytest.raises(SnapshotInvalidError, match="external data file"):
        disk.check_qcow2(layer, "layer")


def test_copy_entries_split_at_the_last_colon(tmp_path: Path) -> None:
    src = tmp_path / "a:b"
    src.write_text("x")
    f = tmp_path / "r.toml"
    f.write_text('name = "x"\ncopy = ["a:b:/opt/ab"]\n')
    r = Recipe.from_toml(f)
    assert r.copy == [(tmp_path / "a:b", "/opt/ab")]
