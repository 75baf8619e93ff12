#!/usr/bin/env python3
"""Turns the gateway-bench JSON summaries of bench/run.sh into docs/benchmarks.md.

usage: report.py RUNS_JSONL MACHINE_TXT COMMANDS_TXT DOC_MD

Medians are taken per scenario label (fanout-1k, ...) and per figure independently. A block of
an existing DOC between `<!-- BEGIN preserved -->` and `<!-- END preserved -->` (e.g. the side by
side comparison with peers, measured by another harness) is kept as is.
"""

import json
import re
import statistics
import sys

BEGIN, END = "<!-- BEGIN preserved -->", "<!-- END preserved -->"


def load(path):
    runs = []
    with open(path) as f:
        for line in f:
            line = line.strip()
            if line:
                try:
                    runs.append(json.loads(line))
                except ValueError:
                    pass
    return runs


def med(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def get(d, path):
    for k in path.split("."):
        if not isinstance(d, dict) or k not in d:
            return None
        d = d[k]
    return d


def fmt_rate(x):
    if x is None:
        return "-"
    if x >= 1e6:
        return f"{x / 1e6:.2f}M"
    if x >= 1e3:
        return f"{x / 1e3:.0f}k"
    return f"{x:.0f}"


def fmt_ms(us):
    if us is None:
        return "-"
    ms = us / 1000
    if ms >= 100:
        return f"{ms:,.0f} ms"
    if ms >= 10:
        return f"{ms:.1f} ms"
    return f"{ms:.2f} ms"


def fmt_pct(p):
    if p is None:
        return "-"
    if p == 0:
        return "0%"
    return f"{p:.3f}%" if p < 0.1 else f"{p:.1f}%"


def fmt(x, spec, dash="-"):
    return dash if x is None else format(x, spec)


def tally(dicts):
    out = {}
    for d in dicts:
        for k, v in (d or {}).items():
            out[k] = out.get(k, 0) + v
    return ", ".join(f"{k}: {v}" for k, v in sorted(out.items()))


def by_label(runs):
    groups = {}
    for r in runs:
        groups.setdefault(r.get("label") or r.get("scenario"), []).append(r)
    return groups


def fanout_rows(groups):
    rows = []
    for label, runs in groups.items():
        ok = [r for r in runs if r.get("scenario") == "fanout" and "delivery" in r]
        if not ok:
            continue
        m = lambda p: med([get(r, p) for r in ok])  # noqa: E731
        notes = []
        disc = sum(get(r, "delivery.subscriber_disconnects") or 0 for r in ok)
        if disc:
            notes.append(f"{disc} subscribers dropped in total ({tally(get(r, 'delivery.close_reasons') for r in ok)})")
        reord = sum(get(r, "delivery.reordered") or 0 for r in ok)
        errors = sum(get(r, "publish.errors") or 0 for r in ok)
        if errors:
            notes.append(f"publish errors: {tally(get(r, 'publish.error_codes') for r in ok)}")
        failed = [r for r in runs if "error" in r]
        if failed:
            notes.append(f"{len(failed)} run(s) failed: {failed[0]['error']}")
        notes.append(f"ack p99 {fmt_ms(m('publish.ack_latency_us.p99'))}")
        notes.append(f"connect {fmt_rate(m('connect.rate_per_s'))}/s")
        rows.append(
            "| {label} | {n} | {conn}/{req} | {sent}/{target} | {dps}/s | {loss} | {reord} | {p50} | {p90} | {p99} | {p999} | {mx} "
            "| {cpud} | {cores} | {redis} | {bench} | {notes} |".format(
                label=label,
                n=len(ok),
                conn=fmt(m("connect.connected"), ".0f"),
                req=fmt(m("connect.requested"), ".0f"),
                sent=fmt(m("publish.sent"), ".0f"),
                target=fmt(m("publish.target"), ".0f"),
                dps=fmt_rate(m("delivery.delivered_per_s")),
                loss=fmt_pct(m("delivery.loss_pct")),
                reord=f"{reord:,}",
                p50=fmt_ms(m("delivery.latency_us.p50")),
                p90=fmt_ms(m("delivery.latency_us.p90")),
                p99=fmt_ms(m("delivery.latency_us.p99")),
                p999=fmt_ms(m("delivery.latency_us.p999")),
                mx=fmt_ms(m("delivery.latency_us.max")),
                cpud=fmt(m("server_cpu_per_delivery_us"), ".2f"),
                cores=fmt(m("cpu.server_cores"), ".2f"),
                redis=fmt(m("cpu.redis_cpu_s"), ".2f"),
                bench=fmt(m("cpu.bench_cores"), ".2f"),
                notes="; ".join(notes),
            )
        )
    return rows


def idle_rows(groups):
    rows = []
    for label, runs in groups.items():
        ok = [r for r in runs if r.get("scenario") == "idle" and "connect" in r]
        if not ok:
            continue
        m = lambda p: med([get(r, p) for r in ok])  # noqa: E731
        per = m("bytes_per_connection")
        per_proc = m("proc_bytes_per_connection")
        disc = sum(get(r, "hold.disconnects") or 0 for r in ok)
        before = med([sum(n.get("before_bytes") or 0 for n in r.get("nodes", [])) for r in ok])
        held = med([sum(n.get("held_bytes") or 0 for n in r.get("nodes", [])) for r in ok])
        rows.append(
            f"| {label} | {len(ok)} | {fmt(m('connect.connected'), '.0f')}/{fmt(m('connect.requested'), '.0f')} "
            f"| {fmt(per and per / 1024, '.2f')} KiB | {fmt(per_proc and per_proc / 1024, '.2f')} KiB "
            f"| {fmt(before and before / 1048576, '.1f')} → {fmt(held and held / 1048576, '.1f')} MiB "
            f"| {fmt_rate(m('connect.rate_per_s'))}/s | {fmt_ms(m('connect.time_us.p99'))} "
            f"| {fmt(m('server_cpu_per_connect_us'), '.0f')} | {fmt(m('hold_cpu.server_cores'), '.3f')} | {disc} |"
        )
    return rows


def churn_rows(groups):
    rows = []
    for label, runs in groups.items():
        ok = [r for r in runs if r.get("scenario") == "churn" and "cycles" in r]
        if not ok:
            continue
        m = lambda p: med([get(r, p) for r in ok])  # noqa: E731
        errs = tally(r.get("errors") for r in ok) or "none"
        rows.append(
            f"| {label} | {len(ok)} | {get(ok[0], 'opts.workers')} | {fmt_rate(m('cycles_per_s'))}/s "
            f"| {fmt_ms(m('connect_us.p50'))} / {fmt_ms(m('connect_us.p99'))} "
            f"| {fmt_ms(m('subscribe_us.p50'))} / {fmt_ms(m('subscribe_us.p99'))} "
            f"| {fmt_ms(m('close_us.p50'))} / {fmt_ms(m('close_us.p99'))} | {fmt_ms(m('cycle_us.p99'))} "
            f"| {fmt(m('server_cpu_per_cycle_us'), '.0f')} | {fmt(m('cpu.bench_cores'), '.2f')} | {errs} |"
        )
    return rows


def maxrate_rows(groups):
    rows, probes = [], []
    for label, runs in groups.items():
        ok = [r for r in runs if r.get("scenario") == "max-rate" and "probes" in r]
        if not ok:
            continue
        m = lambda p: med([get(r, p) for r in ok])  # noqa: E731
        verdicts = ", ".join(sorted({str(get(r, "search.verdict")) for r in ok}))
        rows.append(
            f"| {label} | {len(ok)} | {fmt(m('max_rate'), '.0f')} msgs/s | {fmt_rate(m('max_deliveries_per_s'))}/s "
            f"| {fmt_rate(m('best_measured_delivered_per_s'))}/s | {fmt_ms(m('best.delivery.latency_us.p99'))} "
            f"| {fmt(m('best.server_cpu_per_delivery_us'), '.2f')} | {fmt(m('search.probes'), '.0f')} | {verdicts} "
            f"| {', '.join(fmt(r.get('max_rate'), '.0f') for r in ok)} |"
        )
        for i, r in enumerate(ok, 1):
            seq = " → ".join(
                f"{p['rate']:.0f}{'✓' if p['passed'] else '✗'}" for p in r["probes"]
            )
            probes.append(f"- {label} run {i}: {seq}")
            first_fail = next((p for p in r["probes"] if not p["passed"] and p["rate"] > (r.get("max_rate") or 0)), None)
            if first_fail:
                probes.append(
                    f"  (lowest failing probe {first_fail['rate']:.0f}/s: {'; '.join(first_fail['failed_because'])})"
                )
    return rows, probes


def spread(groups):
    lines = []
    for label, runs in groups.items():
        vals = []
        for r in runs:
            s = r.get("scenario")
            if "error" in r:
                vals.append(f"error ({r['error']})")
            elif s == "fanout":
                vals.append(
                    f"{fmt_rate(get(r, 'delivery.delivered_per_s'))}/s, p99 {fmt_ms(get(r, 'delivery.latency_us.p99'))}, "
                    f"loss {fmt_pct(get(r, 'delivery.loss_pct'))}, {fmt(get(r, 'server_cpu_per_delivery_us'), '.2f')} µs CPU/delivery"
                )
            elif s == "idle":
                b = get(r, "bytes_per_connection")
                vals.append(f"{fmt(b and b / 1024, '.2f')} KiB/conn, connect {fmt_rate(get(r, 'connect.rate_per_s'))}/s")
            elif s == "churn":
                vals.append(f"{fmt_rate(get(r, 'cycles_per_s'))} cycles/s")
            elif s == "max-rate":
                vals.append(f"{fmt(r.get('max_rate'), '.0f')} msgs/s")
        lines.append(f"- {label}: " + " | ".join(vals))
    return lines


def command_templates(path):
    seen, out = set(), []
    with open(path) as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            ports = iter(["$PORT1", "$PORT2", "$PORT3"])
            line = re.sub(r"ws://127\.0\.0\.1:\d+/ws", lambda _m: f"ws://127.0.0.1:{next(ports)}/ws", line)
            pids = iter(["$NODE1_PID", "$NODE2_PID", "$NODE3_PID"])
            line = re.sub(r"--server-pid \d+", lambda _m: f"--server-pid {next(pids)}", line)
            line = re.sub(r"--redis-pid \d+", "--redis-pid $REDIS_PID", line)
            if line not in seen:
                seen.add(line)
                out.append(line)
    return out


def main():
    runs_path, machine_path, commands_path, doc_path = sys.argv[1:5]
    runs = load(runs_path)
    machine = dict(l.rstrip("\n").split("=", 1) for l in open(machine_path) if "=" in l)
    groups = by_label(runs)
    preserved = ""
    try:
        old = open(doc_path).read()
        if BEGIN in old and END in old:
            preserved = old[old.index(BEGIN) : old.index(END) + len(END)]
    except OSError:
        pass

    fan = fanout_rows(groups)
    idle = idle_rows(groups)
    churn = churn_rows(groups)
    mr, probes = maxrate_rows(groups)
    quick = machine.get("quick") == "1"

    out = []
    w = out.append
    w("# Benchmarks")
    w("")
    w(f"Generated by `bench/run.sh` on {machine.get('date')}{' (QUICK=1 smoke run: short runs, not for comparison)' if quick else ''}.")
    w(f"Every figure is the **median of {machine.get('repeats')} runs** (each figure independently); the machine is small,")
    w("shared and noisy, so read the server CPU per delivery next to the rates, and the spread further down.")
    w("")
    w("## Machine")
    w("")
    w(f"- CPU: {machine.get('cpu')}, `nproc` = {machine.get('nproc')}; memory {machine.get('mem')}")
    w(f"- Kernel: {machine.get('kernel')}; open-files limit {machine.get('nofile')}")
    w(f"- {machine.get('rustc')}; Redis {machine.get('redis')}; gateway commit {machine.get('commit')}")
    w("- Topology: one private `redis-server` (random port, `--save \"\" --appendonly no`), two gateway nodes")
    w("  (`RUST_LOG=warn`, default options) started fresh for every run, and `gateway-bench` (one process, current-thread")
    w("  runtime, `--threads 1`), all on the same cores. Subscribers alternate between the nodes; publishers start on the")
    w("  second node, so half of the deliveries cross Redis.")
    w("")
    w("## Commands")
    w("")
    w("```sh")
    w(f"{'QUICK=1 ' if quick else ''}bench/run.sh   # REPEATS={machine.get('repeats')} DURATION={machine.get('duration')} HOLD={machine.get('hold')}")
    w("```")
    w("")
    w("which builds `cargo build --release -p gateway -p gateway-bench`, starts")
    w("`redis-server --port $REDIS_PORT --bind 127.0.0.1 --save \"\" --appendonly no` and, per run, two nodes")
    w("`RUST_LOG=warn target/release/gateway --listen 127.0.0.1:$PORTn --redis-url redis://127.0.0.1:$REDIS_PORT --node-id bench-n`,")
    w("then runs (`target/release/gateway-bench`):")
    w("")
    w("```sh")
    for c in command_templates(commands_path):
        w(c)
    w("```")
    w("")
    w("## Results")
    w("")
    if fan:
        w("### Fan-out")
        w("")
        w("`fanout-1k`: 1000 subscribers on one channel, 2 publishers, 1000 msgs/s in total, 100-byte payload (1 M deliveries/s")
        w("asked for); `fanout-5k`: 5000 subscribers, 200 msgs/s (1 M deliveries/s asked for, more sockets). Latency is publish")
        w("send → receive on the load generator's monotonic clock. Loss counts what had not arrived when the drain ended")
        w("(2 s without a delivery, at most 15 s after the last send). Server CPU = utime+stime of both nodes over publishing and")
        w("drain, divided by deliveries.")
        w("")
        w("| scenario | runs | subscribers | sent / target | delivered/s | loss | reordered (sum) | p50 | p90 | p99 | p99.9 | max | server CPU µs / delivery | server cores | Redis CPU s | bench cores | notes |")
        w("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
        out.extend(fan)
        w("")
    if idle:
        w("### Idle connections")
        w("")
        w("10 000 connections, each subscribed to one of 100 channels, held. Per-connection memory = (sum over both nodes of")
        w("`process_resident_memory_bytes` at the end of the hold − before the first connection) / connections; the `/proc`")
        w("column is the same from `VmRSS`. The kernel's socket buffers are outside RSS.")
        w("")
        w("| scenario | runs | connected | RSS / connection (`/metrics`) | RSS / connection (`/proc`) | nodes' RSS before → held | connect rate | connect p99 | server CPU µs / connect | server cores while idle | dropped while held |")
        w("|---|---|---|---|---|---|---|---|---|---|---|")
        out.extend(idle)
        w("")
    if churn:
        w("### Churn")
        w("")
        w("Workers each repeating connect → subscribe → close (through the typed client `gateway-client`) as fast as they can.")
        w("")
        w("| scenario | runs | workers | cycles/s | connect p50 / p99 | subscribe p50 / p99 | close p50 / p99 | cycle p99 | server CPU µs / cycle | bench cores | errors |")
        w("|---|---|---|---|---|---|---|---|---|---|---|")
        out.extend(churn)
        w("")
    if mr:
        w("### Max sustainable rate")
        w("")
        w("1000 subscribers, 2 publishers, 100-byte payload. The highest publish rate whose probe had loss ≤ 0.1 %, p99 ≤ 100 ms,")
        w("no reordering, no disconnect, no publish error and ≥ 98 % of the target sent, found by bisection between 100 and")
        w("10 000 msgs/s down to the resolution (each probe a fresh fan-out run; a delivery later than 3 s after the last send")
        w("counts as lost). The load generator is one thread on the same two cores: near the top of the range it, not the")
        w("gateway, may be what fails a probe (see `bench cores` in the raw summaries).")
        w("")
        w("| scenario | runs | max rate | = deliveries/s asked | measured delivered/s | p99 at max | server CPU µs / delivery at max | probes | verdict | per run |")
        w("|---|---|---|---|---|---|---|---|---|---|")
        out.extend(mr)
        w("")
        w("Probes (✓ passed, ✗ failed):")
        w("")
        out.extend(probes)
        w("")
    w("### Spread (every run)")
    w("")
    out.extend(spread(groups))
    w("")
    w("## Reading the figures")
    w("")
    w("- `bench cores` is the load generator's own CPU (1.0 = one core). With 2 cores shared by Redis, two nodes and the")
    w("  generator, figures where it approaches 1.0 are limited by the generator, not by the gateway.")
    w("- Both fan-out scenarios ask for 1 M deliveries/s, which is overload on this machine: they show how the gateway behaves")
    w("  under overload (queueing, push-back, slow-consumer disconnects) as much as its throughput. `max-rate` gives the")
    w("  sustainable rate.")
    w("- Raw JSON summaries (one per run, every field) are in `target/bench/run-*/runs.jsonl`; `gateway-bench --help` documents")
    w("  the fields' meaning.")
    w("")
    if preserved:
        w(preserved)
        w("")
    with open(doc_path, "w") as f:
        f.write("\n".join(out))


if __name__ == "__main__":
    main()
