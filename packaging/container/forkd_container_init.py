"""Start-up checks of the forkd-controller container, run by its entrypoint before the daemon.

``image``: the guest image baked into the container records the TSC rate of the host that built it
(``tsc_early_khz`` on its kernel command line, which TCG guests boot with). On a host whose rate
differs by more than 0.5 %, print ``rebuild`` so the entrypoint builds an image of its own onto the
state volume; otherwise print ``ok``.

``snapshot TAG``: exit 0 if snapshot TAG exists and can be restored here, 3 if it is missing, 4 if it
exists but cannot be restored here (another QEMU version, accelerator or CPU: the reason is printed).
"""

from __future__ import annotations

import re
import sys

TSC_TOLERANCE = 0.005


def check_image() -> int:
    from forkd.errors import ForkdError
    from forkd.guest.image import find_image, host_tsc_khz

    try:
        info = find_image()
    except ForkdError as e:
        print(f"rebuild: {e}")
        return 0
    if info is None:
        print("rebuild: no guest image for the current inputs")
        return 0
    m = re.search(r"\btsc_early_khz=(\d+)", info.cmdline)
    here = host_tsc_khz()
    if m is None or here is None:
        print(f"ok: image {info.image_id} (no TSC rate to compare)")
        return 0
    baked = int(m.group(1))
    if abs(baked - here) > baked * TSC_TOLERANCE:
        print(f"rebuild: image {info.image_id} was built for a TSC of {baked} kHz, this host's is {here} kHz")
    else:
        print(f"ok: image {info.image_id} (TSC {baked} kHz, this host {here} kHz)")
    return 0


def check_snapshot(tag: str) -> int:
    from forkd.engine.engine import Engine
    from forkd.errors import ForkdError

    engine = Engine()
    if not engine.store.exists(tag):
        print(f"snapshot {tag} is missing")
        return 3
    try:
        engine.open_snapshot(tag)
    except ForkdError as e:
        print(str(e))
        return 4
    print(f"snapshot {tag} is restorable here ({engine.accel.name}: {engine.accel.reason})")
    return 0


def main(argv: list[str]) -> int:
    if argv[:1] == ["image"]:
        return check_image()
    if argv[:1] == ["snapshot"] and len(argv) == 2:
        return check_snapshot(argv[1])
    print("usage: forkd_container_init.py image | snapshot TAG", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
