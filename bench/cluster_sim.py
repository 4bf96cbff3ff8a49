"""Cluster simulation: how should requests for thousands of patches be routed over R replicas with S device slots?

Discrete events, per replica the engine's own policy: step-level batching up to `max_batch` images (CFG doubles the
rows), a request seated in a device slot as it joins (LRU over slots no running request reads; when all are read it
waits and the slot that frees soonest stops taking new requests), a host cache of validated copies in front of the
store (its read-back delays only its own request). P patches with Zipf(s) popularity, Poisson arrivals at `load` x
the cluster's full-batch capacity. Routing: `random`, `least` (fewest in flight), `chbl` (consistent hashing on the
patch with bounded load, HAProxy's `hash-balance-factor`: a replica is eligible while in-flight + 1 <= ceil(factor x
(total + 1) / R)).

Costs are measured by our benchmarks, not assumed: step time per row count and the slot swap-in of a DiT-XL/2 patch
from `bench/results/*h200*.json` (bench/engine.py on an H200), the read-back + validation of an XL/2 patch from the
store from `bench/results/*churn*.json` (bench/churn.py). Reported per run: slot hit rate (requests whose patch was
already in a slot), swap-ins/s and store read-backs/s over the cluster, and p50/p95 of the latency routing adds: a
request's end-to-end time minus the compute of the denoising steps it ran in (so queueing, its store read-back and
the swap-ins of its batches), warm-up excluded.

    python -m bench.cluster_sim                       # the docs/routing.md table (a minute on one core)
    python -m bench.cluster_sim --replicas 8 --patches 10000 --zipf 1.2 --policy chbl --factor 1.5
"""
from __future__ import annotations

import argparse
import bisect
import heapq
import json
import math
import random
import zlib
from collections import OrderedDict, deque
from dataclasses import dataclass
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).parent / "results"
XL2_PATCH_BYTES = 28 * 256 * 1152 * 4 + 256 * 1153 * 4 + 256 * 4  # fp32 prompts + gate, as the server holds them


@dataclass
class Costs:
    """Measured costs, ms: step time per forward row count, a swap into a slot, a read-back from the store."""

    rows: list[int]
    step_ms: list[float]
    swap_ms: float
    store_ms: float
    source: str

    def step(self, rows: int) -> float:
        return float(np.interp(rows, self.rows, self.step_ms))


def measured_costs() -> Costs:
    """The latest H200 XL/2 run (forward sweep, patch install) and the latest churn run (store read-back)."""
    h200 = sorted(p for p in RESULTS.glob("*h200*.json") if "xl2" in json.loads(p.read_text()).get("bench", {}))[-1]
    xl2 = json.loads(h200.read_text())["bench"]["xl2"]
    sweep = {int(k): v["ours_8patches"] for k, v in xl2["forward_ms"].items()}
    churn = sorted(RESULTS.glob("*churn*.json"))[-1]
    store = json.loads(churn.read_text())["xl2_patch_store_load_ms"]
    return Costs(sorted(sweep), [sweep[k] for k in sorted(sweep)], xl2["patch_install_ms"], store,
                 f"{h200.name} (step, swap-in), {churn.name} (store read-back)")


@dataclass(eq=False)
class Req:
    arrival: float
    patch: int
    ready: float = 0.0  # when it enters the replica's queue (after a store read-back if needed)
    done_step: int = 0
    compute0: float = 0.0  # the replica's compute clock when it joined
    replica: int = 0


class Replica:
    """One server: waiting queue, running batch, device slots (LRU over unseated), host cache (LRU)."""

    def __init__(self, slots: int, host: int, max_batch: int, steps: int):
        self.slots, self.host_cap, self.max_batch, self.steps = slots, host, max_batch, steps
        self.waiting: deque[Req] = deque()
        self.running: list[Req] = []
        self.seated: OrderedDict[int, int] = OrderedDict()  # patch -> running requests, LRU order
        self.host: OrderedDict[int, None] = OrderedDict()
        self.finishing: dict[int, list[Req]] = {}
        self.step_no = 0
        self.compute = 0.0  # seconds of denoising steps run so far, swap-ins excluded
        self.busy = False
        self.inflight = 0
        self.hits = self.seats = self.swaps = self.reads = 0

    def admit(self, req: Req, store_ms: float) -> None:
        """Pin in host memory (a read-back from the store delays only this request)."""
        self.inflight += 1
        if req.patch in self.host:
            self.host.move_to_end(req.patch)
            req.ready = req.arrival
        else:
            req.ready = req.arrival + store_ms / 1e3
            self.reads += 1
            self.host[req.patch] = None
            if len(self.host) > self.host_cap:
                self.host.popitem(last=False)

    def _seat(self, patch: int, evict: bool, avoid: int | None) -> bool | None:
        """True: resident (a hit); False: swapped in; None: cannot seat now."""
        if patch in self.seated:
            if patch == avoid:
                return None
            self.seated[patch] += 1
            self.seated.move_to_end(patch)
            return True
        if not evict:
            return None
        if len(self.seated) >= self.slots:
            idle = next((p for p, n in self.seated.items() if n == 0), None)
            if idle is None:
                return None
            del self.seated[idle]
        self.seated[patch] = 1
        return False

    def boundary(self, now: float, costs: Costs) -> float | None:
        """A step ended at `now`: finish, join waiting requests, start the next step; returns its end (None: idle)."""
        done = self.finishing.pop(self.step_no, [])
        for req in done:
            self.seated[req.patch] -= 1
            self.inflight -= 1
        if done:
            self.running = [r for r in self.running if r.done_step != self.step_no]
        room = self.max_batch - len(self.running)
        swap_ms, blocked, victim = 0.0, False, None
        for req in list(self.waiting):
            if room <= 0:
                break
            seated = self._seat(req.patch, evict=not blocked, avoid=victim)
            if seated is None:
                if not blocked:
                    blocked = True
                    busy = [(n, i) for i, (p, n) in enumerate(self.seated.items()) if n > 0]
                    victim = list(self.seated)[min(busy)[1]] if busy else None
                continue
            self.waiting.remove(req)
            self.seats += 1
            self.hits += seated
            if not seated:
                self.swaps += 1
                swap_ms += costs.swap_ms
            req.done_step = self.step_no + self.steps
            req.compute0 = self.compute
            self.finishing.setdefault(req.done_step, []).append(req)
            self.running.append(req)
            room -= 1
        self.step_no += 1
        if not self.running:
            self.busy = False
            return None
        self.busy = True
        step = costs.step(2 * len(self.running)) / 1e3
        self.compute += step
        return now + step + swap_ms / 1e3


class Ring:
    """Consistent hashing: `vnodes` points per replica on a 32-bit ring, crc32 of stable strings."""

    def __init__(self, replicas: int, vnodes: int = 100):
        points = sorted((zlib.crc32(f"replica-{r}-{v}".encode()), r) for r in range(replicas) for v in range(vnodes))
        self.keys, self.owners = [k for k, _ in points], [r for _, r in points]
        self._start: dict[int, int] = {}

    def walk(self, patch: int):
        """Replicas in ring order from the patch's hash, each once."""
        i = self._start.get(patch)
        if i is None:
            i = self._start[patch] = bisect.bisect(self.keys, zlib.crc32(f"patch-{patch}".encode()))
        seen = set()
        for j in range(len(self.keys)):
            r = self.owners[(i + j) % len(self.keys)]
            if r not in seen:
                seen.add(r)
                yield r


def simulate(*, replicas: int, patches: int, zipf: float, policy: str, factor: float = 1.25, slots: int = 15,
             host: int = 0, max_batch: int = 16, steps: int = 50, load: float = 0.7, requests: int = 0,
             costs: Costs, seed: int = 0) -> dict:
    host = host or int(2 * 1024 ** 3 // XL2_PATCH_BYTES)  # DMP_PATCH_HOST_BYTES default / one XL/2 patch
    requests = requests or max(6000, 150 * replicas)
    rng = np.random.default_rng(seed)
    pick = random.Random(seed)
    capacity = max_batch / (steps * costs.step(2 * max_batch) / 1e3)  # requests/s of one replica at full batches
    rate = load * replicas * capacity
    arrivals = np.cumsum(rng.exponential(1 / rate, requests))
    weights = 1 / np.arange(1, patches + 1) ** zipf
    names = rng.choice(patches, size=requests, p=weights / weights.sum())
    servers = [Replica(slots, host, max_batch, steps) for _ in range(replicas)]
    ring = Ring(replicas) if policy == "chbl" else None
    events: list = []  # (time, order, kind, payload)
    order = 0
    for t, p in zip(arrivals, names, strict=True):
        events.append((float(t), order, "arrive", Req(float(t), int(p))))
        order += 1
    heapq.heapify(events)
    warm = arrivals[requests // 5]
    added, stats0 = [], None
    total = 0
    while events:
        now, _, kind, item = heapq.heappop(events)
        if kind == "arrive":
            if stats0 is None and now >= warm:
                stats0 = [(s.hits, s.seats, s.swaps, s.reads) for s in servers], now
            if policy == "random":
                r = pick.randrange(replicas)
            elif policy == "least":
                low = min(s.inflight for s in servers)
                r = pick.choice([i for i, s in enumerate(servers) if s.inflight == low])
            else:
                bound = math.ceil(factor * (total + 1) / replicas)
                r = next((i for i in ring.walk(item.patch) if servers[i].inflight + 1 <= bound),
                         next(ring.walk(item.patch)))
            server = servers[r]
            server.admit(item, costs.store_ms)
            total += 1
            item.replica = r
            heapq.heappush(events, (item.ready, order, "enqueue", item))
        elif kind == "enqueue":
            server = servers[item.replica]
            server.waiting.append(item)
            if not server.busy:
                server.busy = True
                heapq.heappush(events, (now, order, "step", item.replica))
        else:
            server = servers[item]
            before = server.inflight
            finished = server.finishing.get(server.step_no, [])
            if now >= warm:
                # what routing adds: queueing, store read-back, swap-ins in its steps (not its own batch's compute)
                added += [now - req.arrival - (server.compute - req.compute0) for req in finished
                          if req.arrival >= warm]
            end = server.boundary(now, costs)
            total -= before - server.inflight
            if end is not None:
                heapq.heappush(events, (end, order, "step", item))
        order += 1
    (first, t0), t1 = stats0, now
    hits, seats, swaps, reads = (sum(getattr(s, k) for s in servers) - sum(f[i] for f in first)
                                 for i, k in enumerate(("hits", "seats", "swaps", "reads")))
    ms = np.array(added) * 1e3
    return {"replicas": replicas, "patches": patches, "zipf": zipf, "policy": policy,
            "factor": factor if policy == "chbl" else None, "rate_per_s": rate, "hit_rate": hits / seats,
            "swap_ins_per_s": swaps / (t1 - t0), "store_reads_per_s": reads / (t1 - t0),
            "added_p50_ms": float(np.percentile(ms, 50)), "added_p95_ms": float(np.percentile(ms, 95)),
            "requests": requests}


def table(rows: list[dict]) -> str:
    head = ("| R | P | s | routing | slot hit rate | swap-ins/s | store reads/s | added p50 ms | added p95 ms |\n"
            "|---|---|---|---|---|---|---|---|---|")

    def name(r):
        return r["policy"] if r["policy"] != "chbl" else f"chbl {r['factor']:g}"
    return head + "".join(
        f"\n| {r['replicas']} | {r['patches']} | {r['zipf']:g} | {name(r)} | {r['hit_rate']:.3f} | "
        f"{r['swap_ins_per_s']:.1f} | {r['store_reads_per_s']:.1f} | {r['added_p50_ms']:.0f} | "
        f"{r['added_p95_ms']:.0f} |" for r in rows)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--replicas", type=int, nargs="*", default=[2, 8, 64])
    ap.add_argument("--patches", type=int, nargs="*", default=[100, 10_000])
    ap.add_argument("--zipf", type=float, nargs="*", default=[0.8, 1.2])
    ap.add_argument("--policy", nargs="*", default=["random", "least", "chbl"])
    ap.add_argument("--factor", type=float, nargs="*", default=[1.5],
                    help="hash-balance-factor / 100 (deploy/ uses 150)")
    ap.add_argument("--load", type=float, default=0.7, help="arrival rate / cluster full-batch capacity")
    ap.add_argument("--slots", type=int, default=15, help="device patch slots per replica (DMP_PATCH_SLOTS - 1)")
    ap.add_argument("--json-out", default=None)
    args = ap.parse_args(argv)
    costs = measured_costs()
    print(f"costs: {costs.source}; swap-in {costs.swap_ms:.2f} ms, store read-back {costs.store_ms:.0f} ms, "
          f"step {costs.step(2):.2f} ms (2 rows) .. {costs.step(32):.2f} ms (32 rows)", flush=True)
    rows = []
    for r in args.replicas:
        for p in args.patches:
            for s in args.zipf:
                for policy in args.policy:
                    for f in args.factor if policy == "chbl" else [None]:
                        rows.append(simulate(replicas=r, patches=p, zipf=s, policy=policy, factor=f or 0,
                                             slots=args.slots, load=args.load, costs=costs))
                        print(table(rows[-1:]).splitlines()[-1], flush=True)
    print("\n" + table(rows))
    if args.json_out:
        Path(args.json_out).write_text(json.dumps({"costs": costs.__dict__, "load": args.load, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
