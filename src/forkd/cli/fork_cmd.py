"""``forkd fork``: a one-shot local fan-out (no daemon): spawn N children, run a command in each,
print per-child results and timings, then kill them."""

from __future__ import annotations

import statistics
import time
from typing import Any

import click

from forkd.cli.common import accel_option, json_option, make_engine
from forkd.cli.output import console, handle_errors, mib, print_json, table
from forkd.engine import Child, SpawnResult
from forkd.errors import ForkdError
from forkd.limits import MAX_CHILDREN, MAX_MEMORY_LIMIT_MIB, MIN_MEMORY_LIMIT_MIB


def run_in_child(child: Child, expr: str | None, argv: list[str] | None, timeout: float) -> dict[str, Any]:
    t0 = time.monotonic()
    out: dict[str, Any] = {}
    try:
        if expr is not None:
            out["result"] = child.eval(expr, timeout=timeout)["repr"]
        elif argv:
            r = child.exec(argv, timeout=timeout)
            out.update(exit_code=r.exit_code, stdout=r.stdout, stderr=r.stderr, timed_out=r.timed_out)
            out["result"] = r.stdout.strip() if r.exit_code == 0 else f"exit {r.exit_code}: {r.stderr.strip()}"
    except ForkdError as e:
        out["error"] = str(e)
    out["run_ms"] = round((time.monotonic() - t0) * 1000, 2)
    return out


def row_json(res: SpawnResult, ran: dict[str, Any]) -> dict[str, Any]:
    if res.child is None:
        return {"index": res.index, "ok": False, "error": res.error}
    mem = res.child.memory()
    return {"index": res.index, "ok": "error" not in ran, **res.child.info(),
            "pss_kib": mem.get("Pss"), "rss_kib": mem.get("Rss"), **ran}


@click.command(context_settings={"allow_interspersed_args": False})
@click.option("--tag", required=True, help="Snapshot to fork from.")
@click.option("-n", "--n", "n", type=click.IntRange(1, MAX_CHILDREN), default=1, show_default=True,
              help="Number of children.")
@click.option("--eval", "expr", default=None, help="Python expression evaluated in every child.")
@click.option("--exec", "do_exec", is_flag=True, help="Run ARGV (the trailing arguments) in every child.")
@click.option("--timeout", type=float, default=120.0, show_default=True,
              help="Seconds allowed for each child's restore and for its command.")
@click.option("--concurrency", type=click.IntRange(1, 256), default=None,
              help="Children restored at once (default: number of CPUs).")
@click.option("--network", type=click.Choice(["internet", "none", "user"]), default="internet", show_default=True,
              help="internet: public addresses only, with DNS (never this host or private ranges); none: no network; "
                   "user: old name of internet.")
@click.option("--settle-secs", type=float, default=0.0, show_default=True,
              help="Seconds to let the children run before they are killed.")
@click.option("--keep-workdir", is_flag=True, help="Keep the children's work dirs (console logs) afterwards.")
@click.option("--per-child-netns", is_flag=True,
              help="Run child i in network namespace forkd-child-<i> (scripts/netns-setup.sh N makes them).")
@click.option("--memory-limit-mib", type=click.IntRange(MIN_MEMORY_LIMIT_MIB, MAX_MEMORY_LIMIT_MIB), default=None,
              help="Memory limit per child, MiB (a cgroup of its own; over it, that child is OOM-killed).")
@click.option("--live-fork", is_flag=True,
              help="Accepted from the original forkd: every forkd child can be branched, nothing changes.")
@click.option("--hugepages", is_flag=True,
              help="Accepted from the original forkd (its live-fork memfd): children map the snapshot file, "
                   "nothing changes (docs/api.md).")
@accel_option
@json_option
@click.argument("argv", nargs=-1, type=click.UNPROCESSED)
@handle_errors
def fork(tag: str, n: int, expr: str | None, do_exec: bool, timeout: float, concurrency: int | None,
         network: str, settle_secs: float, keep_workdir: bool, per_child_netns: bool, memory_limit_mib: int | None,
         live_fork: bool, hugepages: bool, accel: str | None, as_json: bool, argv: tuple[str, ...]) -> None:
    """Fork N children of snapshot TAG, run --eval EXPR or --exec ARGV... in each, report, and kill them.

    Example: forkd fork --tag pyagent -n 10 --eval 'numpy.zeros(5).tolist()'
    """
    if expr is not None and do_exec:
        raise click.UsageError("give either --eval or --exec, not both")
    if do_exec and not argv:
        raise click.UsageError("--exec needs the command to run, e.g. --exec uname -a")
    if argv and not do_exec:
        raise click.UsageError(f"unexpected arguments {' '.join(argv)!r} (did you mean --exec?)")
    eng = make_engine(accel)
    t0 = time.monotonic()
    cmd = list(argv) if do_exec else None
    if hugepages and not live_fork:
        raise click.UsageError("--hugepages needs --live-fork (as in the original forkd)")
    results = eng.spawn(tag, n, concurrency=concurrency, timeout=timeout, network=network,
                        memory_limit_mib=memory_limit_mib, per_child_netns=per_child_netns,
                        then=lambda c: run_in_child(c, expr, cmd, timeout))
    wall_s = time.monotonic() - t0
    try:
        rows = [row_json(r, r.then or {}) for r in results]
        summary = summarize(rows, n, wall_s)
        if settle_secs > 0:
            time.sleep(settle_secs)
    finally:
        for r in results:
            if r.child is not None:
                r.child.kill(remove_workdir=not keep_workdir)
    if as_json:
        print_json({"tag": tag, "summary": summary, "children": rows})
    else:
        print_table(tag, rows, summary)
    if summary["failed"]:
        raise SystemExit(1)


def summarize(rows: list[dict[str, Any]], n: int, wall_s: float) -> dict[str, Any]:
    ready = [r["ready_ms"] for r in rows if r.get("ready_ms") is not None]
    pss = [r["pss_kib"] for r in rows if r.get("pss_kib")]
    ok = sum(1 for r in rows if r.get("ok"))
    return {"n": n, "ok": ok, "failed": n - ok, "wall_s": round(wall_s, 3),
            "ready_ms_median": round(statistics.median(ready), 2) if ready else None,
            "ready_ms_max": round(max(ready), 2) if ready else None,
            "pss_mib_median": round(statistics.median(pss) / 1024, 1) if pss else None}


def print_table(tag: str, rows: list[dict[str, Any]], s: dict[str, Any]) -> None:
    out = []
    for r in rows:
        if "id" not in r:
            out.append((r["index"], "", "", "", "", "", f"[spawn failed] {r['error']}"))
            continue
        res = r.get("error") or r.get("result", "")
        out.append((r["index"], r["id"], r["pid"], r["ready_ms"], r.get("run_ms", ""), mib(r.get("pss_kib")),
                    res))
    table(f"fork of {tag}", ["#", "ID", "PID", "READY MS", "RUN MS", "PSS MIB", "RESULT"], out)
    console.print(f"{s['ok']}/{s['n']} ok; wall {s['wall_s']:.2f} s; ready median "
                  f"{s['ready_ms_median']} ms, max {s['ready_ms_max']} ms; PSS median {s['pss_mib_median']} MiB",
                  highlight=False)
