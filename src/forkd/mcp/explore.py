"""``explore``: fork N children from one sandbox's current state, run a different variant in each at the
same time, and return every child's result side by side.

The sandbox is branched once (a snapshot of its memory and disk as they are now; it keeps running), the
children are spawned from that branch in one request, each runs its own variant in a thread of its own,
and then every child is killed except the one asked to be kept. The branch snapshot is deleted when no
child is kept; the daemon refuses to delete a snapshot that a live sandbox came from, so a kept child's
branch stays (``branch_deleted: false``) until that child is killed and the snapshot deleted.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

from forkd.mcp.calls import run_code, run_command, sandbox
from forkd.mcp.models import MAX_VARIANTS, ExploreOutcome, Variant, VariantResult
from forkd.sdk import Controller, ForkdAPIError, MultiController, Sandbox, SpawnError

log = logging.getLogger("forkd.mcp")

LABEL = "forkd-mcp/explore"
"""The metadata label on every explore child: the branch snapshot it came from."""


def check(variants: Sequence[Variant], keep: int | None) -> None:
    """ValueError unless there are 1..MAX_VARIANTS variants and ``keep`` is one of their indexes."""
    if not 1 <= len(variants) <= MAX_VARIANTS:
        raise ValueError(f"variants: give 1 to {MAX_VARIANTS} variants, got {len(variants)}")
    if keep is not None and not 0 <= keep < len(variants):
        raise ValueError(f"keep: must be the index of a variant (0..{len(variants) - 1}) or null, got {keep}")


def run_variant(index: int, variant: Variant, child: Sandbox | SpawnError[Sandbox], timeout_s: float,
                max_output_chars: int) -> VariantResult:
    """The result of one variant in its own child (never raises for the daemon's errors: they are the
    entry's ``error``)."""
    kind = "code" if variant.code is not None else "command"
    if isinstance(child, SpawnError):
        msg = child.errors[0][1] if child.errors else str(child)
        return VariantResult(index=index, sandbox_id=None, kind=kind, ok=False, error=f"the child did not start: {msg}")
    try:
        if variant.code is not None:
            c = run_code(child, variant.code, timeout_s, max_output_chars)
            err = None if c.error is None else f"{c.error.type}: {c.error.message}"
            return VariantResult(index=index, sandbox_id=child.id, kind=kind, ok=c.ok, stdout=c.stdout,
                                 stderr=c.stderr, value=c.value, repr=c.repr, error=err, note=c.note)
        assert variant.command is not None
        r = run_command(child, variant.command, timeout_s, max_output_chars)
        return VariantResult(index=index, sandbox_id=child.id, kind=kind, ok=r.exit_code == 0 and not r.timed_out,
                             stdout=r.stdout, stderr=r.stderr, exit_code=r.exit_code, timed_out=r.timed_out,
                             note=r.note)
    except (ForkdAPIError, ValueError, TypeError) as e:
        return VariantResult(index=index, sandbox_id=child.id, kind=kind, ok=False, error=str(e))


def kill_all(children: Sequence[Sandbox]) -> None:
    if not children:
        return
    with ThreadPoolExecutor(max_workers=min(8, len(children))) as pool:
        for child, fut in [(c, pool.submit(c.kill)) for c in children]:
            try:
                fut.result()
            except Exception as e:  # noqa: BLE001 - the others are killed all the same
                log.warning("explore: could not kill %s: %s", child.id, e)


def explore(ctl: Controller | MultiController, sandbox_id: str, variants: Sequence[Variant], keep: int | None,
            timeout_s: float, max_output_chars: int, lifetime_s: float | None = None) -> ExploreOutcome:
    check(variants, keep)
    tag = sandbox(ctl, sandbox_id).branch().tag
    children: list[Sandbox | SpawnError[Sandbox]] = []
    kept: str | None = None
    try:
        children = ctl.spawn_sandboxes(tag, len(variants), return_exceptions=True, lifetime=lifetime_s,
                                       metadata={LABEL: tag})
        with ThreadPoolExecutor(max_workers=len(variants)) as pool:
            futures = [pool.submit(run_variant, i, v, children[i], timeout_s, max_output_chars)
                       for i, v in enumerate(variants)]
            results = [f.result() for f in futures]
        chosen = children[keep] if keep is not None else None
        if keep is not None and isinstance(chosen, Sandbox):
            kept = chosen.id
            results[keep].kept = True
    finally:
        doomed = [c for c in children if isinstance(c, Sandbox) and c.id != kept]
        if not children:  # the spawn failed on the way (a timeout, ...): its children carry the branch's label
            try:
                doomed = ctl.list_sandboxes(metadata={LABEL: tag})
            except Exception as e:  # noqa: BLE001 - the original error is the one to report
                log.warning("explore: could not list the children of %s: %s", tag, e)
        kill_all(doomed)
        deleted = kept is None and _delete_branch(ctl, tag)
    return ExploreOutcome(branch_tag=tag, branch_deleted=deleted, kept=kept, results=results)


def _delete_branch(ctl: Controller | MultiController, tag: str) -> bool:
    try:
        ctl.delete_snapshot(tag)
    except ForkdAPIError as e:
        log.warning("explore: could not delete the branch snapshot %s: %s", tag, e)
        return False
    return True
