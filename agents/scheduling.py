"""DualPath's scheduling rules (paper §5; digest `dualpath-paper.md` §5), as pure functions
over engine states, so they can be read beside the pseudo-code and tested on hand-built
states. The scheduler agent feeds them what the engines report on each fetch.

Token count stands in for GPU, disk-read and network load alike (§5), so every balance
here is a balance of tokens.
"""

from __future__ import annotations

from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class Request:
    id: int
    context: int        # hit tokens: KV read from storage
    append: int         # miss tokens: prefill computes them
    generate: int = 0

    @property
    def tokens(self) -> int:
        """tokens(r) / len(r) of the pseudo-code: the prompt, cached and new."""
        return self.context + self.append

    @property
    def hbm_need(self) -> int:
        """need(r): the KV a decode engine must hold, in tokens, once fully generated."""
        return self.context + self.append + self.generate


@dataclass
class EngineState:
    """What an engine reports on each fetch (§5.1), plus its free HBM for decode engines."""
    name: str
    node: str
    seq: int = 0               # seq_e: unfinished requests
    tok: int = 0               # tok_e: tokens of those requests
    free_hbm: int = 0          # decode engines: KV tokens that still fit in HBM


# -- PE scheduling (§5.2) -----------------------------------------------------------------

def pe_schedule(waiting: deque[Request], group: list[EngineState], read_q: dict[str, int],
                alpha: int, beta: int, categories: Counter | None = None,
                ) -> list[tuple[Request, EngineState]]:
    """Run when a PE group fetches: assign waiting requests, FIFO, to the group's engines.

    Categories are recomputed after every assignment, so an engine that crosses beta
    stops receiving work within the same fetch. `categories` counts where each assignment
    came from (pe_short, pe_long) and fetches that stopped with every engine over beta.
    """
    categories = Counter() if categories is None else categories
    assigned = []
    while waiting:
        r = waiting[0]
        c_short = [e for e in group if read_q[e.node] <= alpha and e.tok <= beta]
        c_long = [e for e in group if read_q[e.node] > alpha and e.tok <= beta]
        # C_over = {e : tok_e > beta} never receives new work.
        if c_short:
            pe = min(c_short, key=lambda e: e.tok)
            categories["pe_short"] += 1
        elif c_long:
            pe = min(c_long, key=lambda e: e.tok)
            categories["pe_long"] += 1
        else:
            categories["pe_over_beta"] += 1
            break
        assigned.append((r, pe))
        pe.tok += r.tokens
        pe.seq += 1
        waiting.popleft()
    return assigned


# -- DE scheduling (§5.3) -----------------------------------------------------------------

def de_group_schedule(global_queue: deque[Request], groups: dict[str, list[EngineState]],
                      private: dict[str, deque[Request]]) -> None:
    """Phase 1, across groups: drain the global queue, each request to the group with the
    fewest tokens in sum (counting what this drain already gave it)."""
    load = {g: sum(e.tok for e in engines) for g, engines in groups.items()}
    while global_queue:
        r = global_queue.popleft()
        group = min(load, key=lambda g: (load[g], g))
        private[group].append(r)
        load[group] += r.tokens


def de_schedule(private: deque[Request], group: list[EngineState], z_factor: float = 1.05,
                categories: Counter | None = None) -> list[tuple[Request, EngineState]]:
    """Phase 2, within the fetching group: the free-HBM filter, then the Z rule.
    `categories` counts the assignments to low and high engines, and fetches that stopped
    with no engine having the HBM."""
    categories = Counter() if categories is None else categories
    h = sum(e.free_hbm for e in group)
    prefix, need = [], 0
    for r in private:                 # R: the longest prefix that fits in all free HBM
        if need + r.hbm_need > h:
            break
        prefix.append(r)
        need += r.hbm_need
    z = z_factor * (sum(r.tokens for r in prefix) + sum(e.tok for e in group)) / len(group)

    assigned = []
    while private:
        r = private[0]
        f = [e for e in group if e.free_hbm >= r.hbm_need]
        if not f:
            categories["de_no_hbm"] += 1
            break
        low = [e for e in f if e.tok + r.tokens <= z]
        high = [e for e in f if e.tok + r.tokens > z]
        if low:
            de = min(low, key=lambda e: e.seq)      # balance the request count
            categories["de_low"] += 1
        else:
            de = min(high, key=lambda e: e.tok)     # least risk of exhausting HBM
            categories["de_high"] += 1
        assigned.append((r, de))
        de.tok += r.tokens
        de.seq += 1
        de.free_hbm -= r.hbm_need
        private.popleft()
    return assigned


# -- read path (§5.4) ---------------------------------------------------------------------

def choose_read_path(pe: EngineState, de: EngineState, read_q: dict[str, int],
                     read_total: dict[str, int] | None = None) -> str:
    """Read the whole request on the side whose storage read queue is shorter. On a tie
    (common: requests are alike, and idle queues empty), on the side whose node has read
    fewer tokens so far (`read_total`; "pe" if even): a node compared with every node of the
    other side, as 1P2D's one prefill node is, would otherwise take every tie and read most."""
    if read_q[de.node] != read_q[pe.node]:
        return "de" if read_q[de.node] < read_q[pe.node] else "pe"
    total = read_total or {}
    return "de" if total.get(de.node, 0) < total.get(pe.node, 0) else "pe"


def read_plan(path: str, hit: list, pe_node: str, de_node: str,
              pe_share: float | None = None) -> list[list]:
    """Which node reads which hit blocks ([node, blocks] pairs, in the order of hit): all on
    the PE or the DE side, or split, the PE side reading the first blocks, its share of the
    tokens."""
    first_de = {"pe": len(hit), "de": 0}.get(path)
    if first_de is None:
        first_de = pe_blocks(hit, pe_share)
    return [[pe_node, hit[:first_de]], [de_node, hit[first_de:]]]


def pe_blocks(hit: list, share: float) -> int:
    """How many of the first hit blocks hold about `share` of its tokens."""
    want, taken = share * sum(t for _, t in hit), 0
    for count, (_, tokens) in enumerate(hit):
        if taken + tokens / 2 > want:
            return count
        taken += tokens
    return len(hit)


# -- intra-engine batching, prefill engines only (§5.5) -----------------------------------

Chunk = tuple[Request, int, int]       # (request, cached tokens, tokens computed now)


def prefill_batch(queue: deque[Chunk], attention_seconds: Callable[[list[Chunk]], float],
                  quota: float = 0.3) -> list[Chunk]:
    """Fill one forward batch, FIFO, under the attention-time quota; the request that does
    not fit is chunked to the largest size that does (binary search), and its rest stays
    at the head of the queue with the chunk counted as cached."""
    batch: list[Chunk] = []
    while queue:
        r, cached, todo = queue[0]
        if attention_seconds(batch + [(r, cached, todo)]) <= quota:
            batch.append(queue.popleft())
            continue
        lo, hi = 0, todo                   # largest b with the batch still under the quota
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if attention_seconds(batch + [(r, cached, mid)]) <= quota:
                lo = mid
            else:
                hi = mid - 1
        if lo > 0:
            batch.append((r, cached, lo))
            queue[0] = (r, cached + lo, todo - lo)
        elif not batch:                    # not even one token fits: run it alone
            batch.append(queue.popleft())
        break
    return batch


# -- thresholds (§5.2) --------------------------------------------------------------------

def alpha_tokens(snic_bytes_per_second: float, kv_bytes_per_token: float,
                 seconds: float = 3.0) -> int:
    """alpha: the tokens a node can read from storage in 3 s."""
    return int(seconds * snic_bytes_per_second / kv_bytes_per_token)


def beta_tokens(prefill_seconds_per_token: float, seconds: float = 5.0) -> int:
    """beta: the tokens one GPU can process in 5 s."""
    return int(seconds / prefill_seconds_per_token)
