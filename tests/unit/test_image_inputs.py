"""Unit tests for the cheap parts of the guest image builder (no kernel download, no build)."""

from __future__ import annotations

import json
import os
import py_compile
import shutil
import struct
from pathlib import Path

import pytest

from forkd.errors import ImageBuildError, ImageNotFoundError
from forkd.guest import image
from forkd.guest.image import (
    ImageInfo,
    find_image,
    guest_lib_path,
    image_id_for,
    image_inputs,
    list_images,
    module_load_order,
    require_image,
)

needs_debian = pytest.mark.skipif(
    shutil.which("dpkg-query") is None or shutil.which("apt-cache") is None,
    reason="needs a Debian host (dpkg-query, apt-cache)",
)

SAMPLE = {"builder_version": "1", "kernel_package": "linux-image-6.1.0-56-cloud-amd64",
          "kernel_package_version": "6.1.192-2", "sha256:agent.py": "ab" * 32}


def _fake_image(root: Path, inputs: dict[str, str], *, built_at: float = 1.0) -> ImageInfo:
    """Write a complete-looking image directory (tiny fake kernel and initramfs) for ``inputs``."""
    image_id = image_id_for(inputs)
    path = root / image_id
    path.mkdir(parents=True)
    (path / "vmlinuz").write_bytes(b"kernel")
    (path / "initramfs.cpio").write_bytes(b"070701")
    info = ImageInfo(image_id=image_id, path=path, kernel=path / "vmlinuz", initramfs=path / "initramfs.cpio",
                     kernel_version="6.1.0-56-cloud-amd64", cmdline="console=ttyS0", inputs=dict(inputs),
                     built_at=built_at, size_bytes=12)
    (path / "image.json").write_text(json.dumps(info.to_json()))
    return info


def test_image_id_is_stable_and_order_independent() -> None:
    a = image_id_for(SAMPLE)
    b = image_id_for(dict(reversed(list(SAMPLE.items()))))
    assert a == b == image_id_for(dict(SAMPLE))
    assert len(a) == 16 and all(c in "0123456789abcdef" for c in a)


def test_image_id_changes_when_an_input_changes() -> None:
    base = image_id_for(SAMPLE)
    for key in SAMPLE:
        changed = dict(SAMPLE, **{key: SAMPLE[key] + "x"})
        assert image_id_for(changed) != base
    assert image_id_for(dict(SAMPLE, extra="1")) != base


@needs_debian
def test_inputs_contain_expected_keys() -> None:
    inputs = image_inputs()
    for key in ("builder_version", "cmdline", "kernel_package", "kernel_package_version",
                "pkg:busybox-static", "pkg:python3.11-minimal", "pkg:libpython3.11-stdlib",
                "pkg:python3-numpy", "sha256:agent.py", "sha256:init.sh"):
        assert inputs.get(key), key
    assert inputs["builder_version"] == image.BUILDER_VERSION
    assert inputs["kernel_package"].startswith("linux-image-")
    assert all(isinstance(v, str) for v in inputs.values())
    assert image_inputs() == inputs                      # deterministic


@needs_debian
def test_find_image_returns_none_for_an_empty_root(tmp_path: Path) -> None:
    assert find_image(tmp_path) is None
    assert find_image(tmp_path / "does-not-exist") is None
    with pytest.raises(ImageNotFoundError, match="forkd image build"):
        require_image(tmp_path)


@needs_debian
def test_find_image_finds_a_complete_image_for_the_current_inputs(tmp_path: Path) -> None:
    info = _fake_image(tmp_path, image_inputs())
    found = find_image(tmp_path)
    assert found == info
    assert require_image(tmp_path) == info
    (info.path / "initramfs.cpio").unlink()             # a file missing: not an image any more
    assert find_image(tmp_path) is None


def test_list_images_skips_staging_and_partial_dirs(tmp_path: Path) -> None:
    good = _fake_image(tmp_path, SAMPLE, built_at=2.0)
    older = _fake_image(tmp_path, dict(SAMPLE, builder_version="0"), built_at=1.0)
    staging = tmp_path / f".staging-{image_id_for(dict(SAMPLE, x='1'))}-123"
    staging.mkdir()
    (staging / "vmlinuz").write_bytes(b"k")
    partial = tmp_path / image_id_for(dict(SAMPLE, x="2"))    # looks like an image dir, no image.json
    partial.mkdir()
    (partial / "vmlinuz").write_bytes(b"k")
    (partial / "initramfs.cpio").write_bytes(b"i")
    hidden_complete = _fake_image(tmp_path / ".staging-x", SAMPLE)  # complete, but under a dot dir
    assert hidden_complete.path.exists()
    (tmp_path / "garbage").mkdir()
    (tmp_path / "garbage" / "image.json").write_text("{not json")
    assert list_images(tmp_path) == [older, good]
    assert list_images(tmp_path / "missing") == []


def test_image_info_json_round_trip(tmp_path: Path) -> None:
    info = _fake_image(tmp_path, SAMPLE)
    d = json.loads(json.dumps(info.to_json()))
    assert d["kernel"] == "vmlinuz" and d["initramfs"] == "initramfs.cpio"
    assert ImageInfo.from_json(info.path, d) == info


@needs_debian
def test_unknown_guest_package_is_named() -> None:
    with pytest.raises(ImageBuildError) as e:
        image.guest_package_versions(["busybox-static", "forkd-no-such-package"])
    assert "unknown package forkd-no-such-package" in str(e.value)
    assert "busybox-static" not in str(e.value)


@needs_debian
def test_guest_packages_resolve_from_an_empty_root() -> None:
    versions = image.guest_package_versions()
    # the whole closure, not only what is named: the loader's package and numpy's BLAS
    assert {"busybox-static", "python3.11", "python3-numpy", "libc6", "libblas3", "liblapack3"} <= set(versions)


def test_apt_resolution_is_remembered_until_the_lists_change(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from forkd.guest import rootfs

    calls = []
    lists = tmp_path / "lists"
    lists.mkdir()
    (lists / "x_Packages").write_text("1")
    monkeypatch.setenv("FORKD_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(rootfs, "APT_LISTS", lists)
    monkeypatch.setattr(rootfs, "APT_CONFIG", ())
    monkeypatch.setattr(rootfs, "_resolve_memo", {})

    def fake(packages: list[str], status: bytes) -> list[tuple[str, str]]:
        calls.append(packages)
        return [(packages[0], str(len(calls)))]
    monkeypatch.setattr(rootfs, "_resolve_apt", fake)
    assert rootfs.resolve_apt(["jq"], b"") == [("jq", "1")]
    assert rootfs.resolve_apt(["jq"], b"") == [("jq", "1")] and len(calls) == 1
    monkeypatch.setattr(rootfs, "_resolve_memo", {})  # a new process: the answer is on disk
    assert rootfs.resolve_apt(["jq"], b"") == [("jq", "1")] and len(calls) == 1
    assert rootfs.resolve_apt(["jq"], b"Package: x\n") == [("jq", "2")]  # another status, another answer
    (lists / "x_Packages").write_text("22")  # apt-get update
    assert rootfs.resolve_apt(["jq"], b"") == [("jq", "3")]


@needs_debian
def test_libraries_are_resolved_in_the_tree(tmp_path: Path) -> None:
    from forkd.guest import elfdeps

    libs = elfdeps.libraries(Path("/"), ["/bin/ls"])
    assert any(p.endswith("/libc.so.6") for p in libs)
    assert any("ld-linux-x86-64.so.2" in p for p in libs)  # the interpreter
    tree = tmp_path / "t"
    (tree / "usr" / "bin").mkdir(parents=True)
    (tree / "usr" / "bin" / "ls").write_bytes(Path("/bin/ls").read_bytes())
    with pytest.raises(ImageBuildError, match="needs the loader|needs lib"):
        elfdeps.libraries(tree, ["/usr/bin/ls"])
    assert elfdeps.libraries(tree, ["/nonexistent"]) == {}
    (tree / "usr" / "bin" / "script").write_text("#!/bin/sh\n")
    assert elfdeps.libraries(tree, ["/usr/bin/script"]) == {}


@needs_debian
def test_alternatives_from_a_postinst_are_applied(tmp_path: Path) -> None:
    import subprocess

    from forkd.guest import rootfs

    pkg = tmp_path / "pkg"
    (pkg / "DEBIAN").mkdir(parents=True)
    (pkg / "usr" / "lib" / "x86_64-linux-gnu" / "blas").mkdir(parents=True)
    (pkg / "usr" / "lib" / "x86_64-linux-gnu" / "blas" / "libblas.so.3").write_text("lib")
    (pkg / "DEBIAN" / "control").write_text("Package: fake-blas\nVersion: 1\nArchitecture: amd64\n"
                                           "Maintainer: x <x@example.invalid>\nDescription: x\n")
    postinst = pkg / "DEBIAN" / "postinst"
    postinst.write_text("#!/bin/sh\nset -e\nupdate-alternatives --install /usr/lib/x86_64-linux-gnu/libblas.so.3 \\\n"
                        "   libblas.so.3-x86_64-linux-gnu /usr/lib/x86_64-linux-gnu/blas/libblas.so.3 10\n"
                        "update-alternatives --install /usr/bin/evil x $HOME/evil 99\n")
    postinst.chmod(0o755)
    deb = tmp_path / "fake.deb"
    subprocess.run(["dpkg-deb", "-b", "--root-owner-group", str(pkg), str(deb)], check=True, capture_output=True)
    alts = rootfs.deb_alternatives(deb)
    assert [(a.link, a.path) for a in alts] == [("/usr/lib/x86_64-linux-gnu/libblas.so.3",
                                                 "/usr/lib/x86_64-linux-gnu/blas/libblas.so.3")]
    root = tmp_path / "root"
    root.mkdir()
    rootfs.merged_usr_skeleton(root)
    rootfs.install_deb(deb, root)
    assert rootfs.apply_alternatives(alts, root) == ["/usr/lib/x86_64-linux-gnu/libblas.so.3"]
    link = root / "usr/lib/x86_64-linux-gnu/libblas.so.3"
    assert os.readlink(link) == "/usr/lib/x86_64-linux-gnu/blas/libblas.so.3"  # absolute, as the guest sees it
    assert rootfs.resolve_in(root, "/usr/lib/x86_64-linux-gnu/libblas.so.3") == \
        "/usr/lib/x86_64-linux-gnu/blas/libblas.so.3"


def test_kernel_meta_falls_back_and_env_overrides(monkeypatch: pytest.MonkeyPatch) -> None:
    known = {
        "linux-image-amd64": {"Package": "linux-image-amd64", "Version": "6.1.192-2",
                              "Depends": "linux-image-6.1.0-56-amd64 (= 6.1.192-2)"},
        "linux-image-6.1.0-56-amd64": {"Package": "linux-image-6.1.0-56-amd64", "Version": "6.1.192-2",
                                       "Depends": "kmod, linux-base (>= 4.3~)"},
    }
    monkeypatch.setattr(image, "_apt_show", known.get)
    monkeypatch.setattr(image, "_kernel_memo", {})
    monkeypatch.delenv(image.KERNEL_PACKAGE_ENV, raising=False)
    assert image.resolve_kernel_package() == ("linux-image-amd64", "linux-image-6.1.0-56-amd64", "6.1.192-2")
    monkeypatch.setenv(image.KERNEL_PACKAGE_ENV, "linux-image-6.1.0-56-amd64")
    assert image.resolve_kernel_package()[1:] == ("linux-image-6.1.0-56-amd64", "6.1.192-2")
    monkeypatch.setenv(image.KERNEL_PACKAGE_ENV, "linux-image-nope")
    with pytest.raises(ImageBuildError, match="linux-image-nope"):
        image.resolve_kernel_package()


def test_module_load_order_from_modules_dep(tmp_path: Path) -> None:
    kernel = tmp_path / "kernel"
    for rel in ("drivers/virtio/virtio_ring.ko", "drivers/virtio/virtio.ko", "drivers/virtio/virtio_mmio.ko",
                "drivers/char/virtio_console.ko", "net/core/failover.ko", "drivers/net/net_failover.ko",
                "drivers/net/virtio_net.ko", "drivers/char/hw_random/virtio-rng.ko"):
        (kernel / rel).parent.mkdir(parents=True, exist_ok=True)
        (kernel / rel).write_bytes(b"")
    (tmp_path / "modules.dep").write_text(
        "kernel/drivers/virtio/virtio_ring.ko:\n"
        "kernel/drivers/virtio/virtio.ko: kernel/drivers/virtio/virtio_ring.ko\n"
        "kernel/drivers/virtio/virtio_mmio.ko: kernel/drivers/virtio/virtio.ko kernel/drivers/virtio/virtio_ring.ko\n"
        "kernel/drivers/char/virtio_console.ko: kernel/drivers/virtio/virtio.ko kernel/drivers/virtio/virtio_ring.ko\n"
        "kernel/net/core/failover.ko:\n"
        "kernel/drivers/net/net_failover.ko: kernel/net/core/failover.ko\n"
        "kernel/drivers/net/virtio_net.ko: kernel/drivers/net/net_failover.ko kernel/net/core/failover.ko "
        "kernel/drivers/virtio/virtio.ko\n"
        "kernel/drivers/char/hw_random/virtio-rng.ko: kernel/drivers/virtio/virtio.ko\n"
    )
    (tmp_path / "modules.builtin").write_text("kernel/drivers/virtio/virtio_ring.ko\n")
    order = [p.name for p in module_load_order(tmp_path, ("virtio_mmio", "virtio_console", "virtio_net"),
                                                 ("virtio_rng", "not_here"))]
    assert order == ["virtio.ko", "virtio_mmio.ko", "virtio_console.ko", "failover.ko", "net_failover.ko",
                     "virtio_net.ko", "virtio-rng.ko"]
    with pytest.raises(ImageBuildError, match="not_here"):
        module_load_order(tmp_path, ("not_here",), ())


def test_guest_lib_path_maps_into_merged_usr() -> None:
    assert guest_lib_path("/lib/x86_64-linux-gnu/libc.so.6") == "usr/lib/x86_64-linux-gnu/libc.so.6"
    assert guest_lib_path("/lib64/ld-linux-x86-64.so.2") == "usr/lib64/ld-linux-x86-64.so.2"
    assert guest_lib_path("/usr/lib/x86_64-linux-gnu/libz.so.1") == "usr/lib/x86_64-linux-gnu/libz.so.1"


def test_pyc_header_is_rewritten_for_mtime_zero_sources(tmp_path: Path) -> None:
    src = tmp_path / "mod.py"
    src.write_text("x = 1\n")
    os.utime(src, (1_700_000_000, 1_700_000_000))
    pyc = Path(py_compile.compile(str(src), invalidation_mode=py_compile.PycInvalidationMode.TIMESTAMP))
    header = image._pyc_header(pyc)
    assert header is not None and len(header) == 16
    assert struct.unpack("<III", header[4:16]) == (0, 0, src.stat().st_size)
    assert header[:4] == pyc.read_bytes()[:4]
    os.utime(src, (1_700_000_100, 1_700_000_100))        # stale pyc: left out
    assert image._pyc_header(pyc) is None


def test_host_tsc_khz_is_plausible_or_none() -> None:
    khz = image.host_tsc_khz(samples=2, interval_s=0.01)
    assert khz is None or 100_000 <= khz <= 20_000_000
