"""Link soak: a served twin behind a damaged link, driven for a bounded time; does every call end right and in time?

For each transport (TCP on 127.0.0.1 and a pty; nothing leaves this machine), ``cimlab sim serve`` serves the
``ideal`` twin in a separate process, paced at ``--baud`` (0: unpaced), and this process drives it through
``URL#<faults>`` with a mix of calls: weight writes, read-backs, MACs of up to 128 vectors and MAC_RAWs of up to 4.
The faults act per write (one frame) and per chunk read; a paced line delivers replies in chunks of about 1 ms of
line time, so at 3 Mbaud a 40 kB reply spans some 130 chunks. The default, ``flip=0.001&drop=0.001``, damages about
1 % of the frames; ``flip=0.01&drop=0.01`` damages a third of them (a 40 kB reply arrives whole one time in 14). On the ideal twin every result has an exact
reference (numpy), so:

- a *silent corruption* is a call that returned a wrong result without raising (must be 0);
- a *false failure* is a call that raised although the device is healthy (must be 0);
- *worst call / deadline* is the largest ratio of a call's time to the deadline it ran under (must be <= 1);
- *damaged* counts the writes and chunks the fault wrapper damaged or dropped, against the frames that crossed the
  link (both ways, resends included).

Prints a table, then one JSON object of the figures as the last line.

    .venv/bin/python scripts/soak_link.py [--seconds 30] [--transports tcp,pty] [--baud 3000000]
        [--faults 'flip=0.01&drop=0.01'] [--seed 1] [--timeout 1]
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass, field

import numpy as np
from rich.console import Console
from rich.table import Table

from cimlab.driver import Chip
from cimlab.firmware_bridge.errors import CimError
from cimlab.links import open_link
from cimlab.twinproc import TwinProcess


@dataclass
class Tally:
    """What one transport's soak saw."""

    transport: str
    calls: int = 0
    silent_corruptions: int = 0
    false_failures: int = 0
    worst_ratio: float = 0.0
    worst_call_s: float = 0.0
    worst_deadline_s: float = 0.0
    damaged_writes: int = 0
    damaged_chunks: int = 0
    writes: int = 0
    chunks: int = 0
    frames: int = 0
    retries: int = 0
    timeouts: int = 0
    failures: list[str] = field(default_factory=list)

    @property
    def damaged_frames(self) -> int:
        return self.damaged_writes + self.damaged_chunks


def one_call(chip: Chip, w: np.ndarray, rng: np.random.Generator) -> bool:
    """One random call; True when its result equals the exact reference. ``w`` is the host's copy of the weights."""
    spec = chip.spec
    kind = rng.integers(4)
    if kind == 0:
        r0 = int(rng.integers(0, spec.rows - 1))
        n = int(rng.integers(1, spec.rows - r0 + 1))
        rows = rng.integers(spec.weight_min, spec.weight_max + 1, size=(n, spec.cols))
        bad = chip.write_weights(rows, r0)
        w[r0 : r0 + n] = rows
        return bad == []
    if kind == 1:
        return bool(np.array_equal(chip.read_weights(), w))
    x = rng.integers(0, spec.input_max + 1, size=(int(rng.integers(1, 129)), spec.rows))
    if kind == 2:
        return bool(np.array_equal(chip.mac(x), x @ w))
    x = x[: int(rng.integers(1, 5))]
    return bool(np.array_equal(chip.mac_raw(x), spec.ideal_codes(spec.ideal_levels(x, w))))


def soak(transport: str, seconds: float, baud: int, faults: str, seed: int, timeout: float) -> Tally:
    """Drive one served twin through the faults for ``seconds`` (``timeout``: the driver's resend interval, s)."""
    tally = Tally(transport)
    rng = np.random.default_rng(seed)
    with TwinProcess(pty=transport == "pty", profile="ideal", baud=baud or None) as url:
        rate = f"?baud={baud}" if baud else ""
        link = open_link(f"{url}{rate}#{faults}&fault_seed={seed}")
        chip = Chip(link, timeout=timeout)
        try:
            spec = chip.spec
            w = np.zeros((spec.rows, spec.cols), dtype=np.int64)
            chip.write_weights(w)
            end = time.monotonic() + seconds
            while time.monotonic() < end:
                try:
                    ok = one_call(chip, w, rng)
                except CimError as err:
                    tally.false_failures += 1
                    tally.failures.append(f"{type(err).__name__}: {str(err).splitlines()[0]}")
                    ok = True  # not silent: it raised
                tally.calls += 1
                tally.silent_corruptions += not ok
                t = chip.last_call
                if t.seconds / t.deadline_s > tally.worst_ratio:
                    tally.worst_ratio = t.seconds / t.deadline_s
                    tally.worst_call_s, tally.worst_deadline_s = t.seconds, t.deadline_s
            f = link.faults  # type: ignore[attr-defined]
            tally.damaged_writes, tally.damaged_chunks = f.damaged_writes, f.damaged_chunks
            tally.writes, tally.chunks = f.writes, f.chunks
            tally.retries, tally.timeouts = chip.stats.retries, chip.stats.timeouts
            tally.frames = chip.stats.frames_out + chip.stats.frames_in
        finally:
            chip.close()
    return tally


def main() -> None:
    """Run the soak and print the table and the JSON line."""
    ap = argparse.ArgumentParser(description="soak the wire under faults, loopback only, bounded in time")
    ap.add_argument("--seconds", type=float, default=30.0, help="soak time per transport, s")
    ap.add_argument("--transports", default="tcp,pty")
    ap.add_argument("--baud", type=int, default=3_000_000, help="line rate the served twin paces at (0: unpaced)")
    ap.add_argument("--faults", default="flip=0.001&drop=0.001", help="FaultLink options (URL fragment syntax)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--timeout", type=float, default=1.0, help="the driver's resend interval, s (its default: 1)")
    args = ap.parse_args()
    tallies = [soak(t, args.seconds, args.baud, args.faults, args.seed, args.timeout)
               for t in args.transports.split(",")]
    line = f"{args.baud:,} baud" if args.baud else "unpaced"
    t = Table(title=f"link soak: ideal twin, {line}, through #{args.faults}, {args.seconds:g} s each")
    for col in ("link", "calls", "damaged / frames", "retries", "timeouts", "silent corruptions", "false failures",
                "worst call / deadline"):
        t.add_column(col, justify="right")
    for r in tallies:
        t.add_row(r.transport, str(r.calls), f"{r.damaged_frames} / {r.frames}", str(r.retries),
                  str(r.timeouts), str(r.silent_corruptions), str(r.false_failures),
                  f"{r.worst_call_s:.2f} s / {r.worst_deadline_s:.2f} s = {r.worst_ratio:.3f}")
    Console().print(t)
    for r in tallies:
        for line in r.failures[:5]:
            Console(stderr=True).print(f"[red]{r.transport}[/]: {line}", highlight=False)
    figures = {
        "calls": sum(r.calls for r in tallies),
        "damaged_frames": sum(r.damaged_frames for r in tallies),
        "frames": sum(r.frames for r in tallies),
        "damaged_per_frame": round(sum(r.damaged_frames for r in tallies) / max(1, sum(r.frames for r in tallies)), 4),
        "silent_corruptions": sum(r.silent_corruptions for r in tallies),
        "false_failures": sum(r.false_failures for r in tallies),
        "worst_call_over_deadline": round(max(r.worst_ratio for r in tallies), 4),
    }
    figures["ok"] = (figures["silent_corruptions"] == 0 and figures["false_failures"] == 0
                     and figures["worst_call_over_deadline"] <= 1.0)
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
