"""KV checkpoints at trie nodes: the checkpoint manager of one namespace.

A checkpoint at a node of depth d holds the materialized serving KV of the node's path (the
cache one prefill of path[:d] produces: raw, in the model's dtype, or per-vector quantized with
``seqkv.quant``) and the path's token ids (4 bytes a token, beside ~23 KB of KV a token on
SmolLM2). Restoring a session then starts at its deepest checkpoint: the prefix ids come from
the checkpoint, only the edges below it are decoded (whose context needs at most ``chunk``
tokens before them, as the context resets at fixed positions), and only the suffix is prefilled
on top of the checkpoint's KV. With a raw checkpoint the result equals a full prefill bit for
bit (tested); a quantized one trades that for size.

Which nodes get one, and which edges stay raw, is a :class:`~.policies.Policy`'s choice
(``policies.py``: LRU and prior-guided, three tiers per node: checkpoint, raw, coded); the
:class:`CheckpointManager` (the namespace's tier manager) keeps the store's checkpoint records
and its ``tier`` records (the edges kept raw, loaded with the trie), counts observed restores
of each session (``hits`` records, every process's, merged at each rebalance), and follows
the policy under the byte budget: it materializes and drops checkpoints, swaps an edge that
became hot back from coded to raw (compare-and-swap, the edge and its ``tier`` record in one
transaction, so a kill -9 at any moment leaves either the coded edge or the raw one, never
neither) and deletes the ``tier`` record of one that cooled, which the next compaction then
codes. Without a budget nothing is kept raw: every edge is coded.
"""

from __future__ import annotations

import json
import threading
import time
from typing import TYPE_CHECKING

import numpy as np
import torch
from transformers import DynamicCache

from ..core.blob import pack
from ..core.cache import RestoredCache, prefill_cache
from ..core.errors import BlobError
from ..core.kvsize import kv_geometry
from ..core.stepper import cache_kwarg
from .backend import StoreError
from .policies import RAW_BYTES_PER_TOKEN, NodeInfo, Policy, Tier, as_tier_policy, tiers_bytes
from .records import StoreCorruptError, pack_edge, parse
from .trie import info_bits

if TYPE_CHECKING:
    from .store import Store
    from .trie import Node

# A checkpoint's KV covers its path cut down to a multiple of ALIGN positions: a prefill
# continued from there reproduces one full prefill bit for bit (CPU kernels block by 16 rows;
# at other cuts results differ in the last ulp), so restoring from a raw checkpoint is exact.
ALIGN = 16


def cache_tensors(cache: DynamicCache) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(layer.keys, layer.values) for layer in cache.layers]


def serialize_kv(
    cache: DynamicCache, quant: str | None = None, bits: float | None = None
) -> tuple[dict, bytes]:
    """A cache's K/V as bytes: raw safetensors, or each tensor per-vector quantized."""
    from safetensors.torch import save

    layers = cache_tensors(cache)
    if quant is None:
        tensors = {}
        for i, (k, v) in enumerate(layers):
            tensors[f"k{i}"], tensors[f"v{i}"] = k.contiguous().cpu(), v.contiguous().cpu()
        return {"format": "raw", "layers": len(layers), "kv_bits": sum(
            8 * t.numel() * t.element_size() for t in tensors.values())}, save(tensors)
    from ..quant import get_quantizer

    q = get_quantizer(quant, bits)
    parts, kv_bits = [], 0
    for k, v in layers:
        for t in (k, v):
            qt = q.quantize(t.float().cpu())
            kv_bits += qt.bits
            parts.append(qt.to_bytes())
    lengths = [len(p) for p in parts]
    meta = {"format": "quant", "method": quant, "bits": bits, "layers": len(layers),
            "parts": lengths, "kv_bits": kv_bits}
    return meta, b"".join(parts)


def deserialize_kv(meta: dict, data: bytes, config, dtype: torch.dtype, device) -> DynamicCache:
    cache = DynamicCache(config=config)
    if meta["format"] == "raw":
        from safetensors.torch import load

        tensors = load(data)
        for i in range(int(meta["layers"])):
            cache.update(tensors[f"k{i}"].to(device), tensors[f"v{i}"].to(device), i)
        return cache
    from ..quant import QuantizedTensor, get_quantizer

    q = get_quantizer(meta["method"], meta["bits"])
    pos, tensors = 0, []
    for n in meta["parts"]:
        tensors.append(q.dequantize(QuantizedTensor.from_bytes(data[pos : pos + n])).to(dtype))
        pos += n
    if pos != len(data):
        raise BlobError("corrupt checkpoint (part lengths)")
    for i in range(int(meta["layers"])):
        cache.update(tensors[2 * i].to(device), tensors[2 * i + 1].to(device), i)
    return cache


@torch.inference_mode()
def continue_prefill(model, cache: DynamicCache, ids: list[int], held: int) -> RestoredCache:
    """Prefill ids[held:] on top of a cache holding ids[:held]."""
    device = next(model.parameters()).device
    all_ids = torch.as_tensor([list(ids)], dtype=torch.long, device=device)
    if held == len(ids):
        # Nothing to run, but the next-token logits need the last token: drop its position and
        # run it again as one step (its K/V then come from a one-token step, not the prefill).
        cache.crop(-1)
        held -= 1
    out = model(input_ids=all_ids[:, held:], use_cache=True, logits_to_keep=1,
                **{cache_kwarg(model): cache})
    return RestoredCache(cache, all_ids, out.logits[:, -1])


def _hits(key: str, data: bytes | None, content: str | None) -> tuple[int, float] | None:
    """A ``hits`` record's count and last restore time, if it counts restores of ``content``
    (the session's token hash now); None when absent, of other content, or when it fails its
    checksum (a ranking statistic: the session counts as never restored, and the next merge
    that adds to it writes it afresh)."""
    if data is None:
        return None
    try:
        h = parse("hits", key, data)[0]
        return (int(h["count"]), float(h["last"])) if h["hash"] == content else None
    except (BlobError, KeyError, TypeError, ValueError):
        return None


class CheckpointManager:
    """One namespace's tiers: KV checkpoints, records ``ckptmeta`` (sizes, loaded with the
    trie) and ``ckpt`` (payloads, read on restore); edges kept raw, records ``tier``; observed
    restores; a policy and a byte budget."""

    def __init__(self, store: Store, budget: int, policy: Policy,
                 quant: tuple[str, float] | None) -> None:
        self.store, self.budget, self.quant = store, int(budget), quant
        self.policy = as_tier_policy(policy)
        self.meta: dict[str, dict] = {}  # node id -> checkpoint meta
        self.raw: dict[str, dict] = {}  # node id -> its tier record: the edge is kept raw
        # restores of each session (count, the last one's Unix time): every process's as of
        # the last merge plus this one's since, and this one's not yet in the ``hits`` records.
        # Per session, not per node: a restore walks its session's whole path, so a node's
        # count is its sessions' sum, whatever splits the trie's edges have had since.
        self.restores: dict[str, tuple[int, float]] = {}
        self._unmerged: dict[tuple[str, str], tuple[int, float]] = {}  # by (session, content)
        self._hits_lock = threading.Lock()  # readers touch while the rebalancer merges
        self._fits: dict = {}  # checkpoint sizes per tensor shape (kv_bytes)

    def load(self, records: dict[str, dict[str, bytes]]) -> None:
        """The namespace's ``ckptmeta`` and ``tier`` records, as the trie is loaded."""
        self.meta = {k: parse("ckptmeta", k, v)[0] for k, v in records["ckptmeta"].items()}
        self.raw = {k: parse("tier", k, v)[0] for k, v in records.get("tier", {}).items()}

    def apply(self, changes: dict[str, dict[str, bytes | None]]) -> None:
        """Changed ``ckptmeta`` and ``tier`` records (None: deleted), as a reader catches up."""
        for kind, held in (("ckptmeta", self.meta), ("tier", self.raw)):
            for k, v in changes.get(kind, {}).items():
                if v is None:
                    held.pop(k, None)
                else:
                    held[k] = parse(kind, k, v)[0]

    @property
    def bytes(self) -> int:
        return sum(int(c["bytes"]) for c in self.meta.values())

    @property
    def raw_bytes(self) -> int:
        """Bytes of the edges kept raw (4 a token), as the budget counts them."""
        nodes = self.store.trie.nodes
        return sum(RAW_BYTES_PER_TOKEN * nodes[i].n for i in self.raw if i in nodes)

    def delete_in(self, txn, node_id: str) -> None:
        """Inside a write: the node is gone, so are its checkpoint and its tier record."""
        if node_id in self.meta:
            txn.delete("ckptmeta", node_id)
            txn.delete("ckpt", node_id)
            del self.meta[node_id]
        if node_id in self.raw:
            txn.delete("tier", node_id)
            del self.raw[node_id]

    def forget_session_in(self, txn, session: str) -> None:
        """Inside a write: the session is deleted (or replaced), its recorded restores with
        it (restores still queued anywhere name its old content, and are dropped at merge)."""
        if txn.read("hits", session) is not None:
            txn.delete("hits", session)

    # -- restore ---------------------------------------------------------------------------
    def deepest(self, path: list[Node]) -> tuple[int, dict, list[bytes]] | None:
        """The deepest checkpoint on ``path``: (index in path, header, sections), or None."""
        s = self.store
        for i in range(len(path) - 1, -1, -1):
            if path[i].id in self.meta:
                data = s.backend.read(s.ns, "ckpt", path[i].id)
                if data is not None:
                    h, sections = parse("ckpt", path[i].id, data)
                    if len(sections[0]) != 4 * path[i].depth:
                        raise StoreCorruptError(f"checkpoint {path[i].id} has the wrong length")
                    return i, h, sections
        return None

    def touch(self, session: str) -> None:
        """A restore of this session (shared with other processes at the next
        ``merge_hits``), of its content as this process knows it (its token hash): if the
        session is replaced meanwhile, here or elsewhere, the count does not pass to the new
        content."""
        content = self.store.session_info[session]["hash"]
        self._requeue({(session, content): (1, time.time())}, count=True)

    def merge_hits(self) -> None:
        """Add this process's restores to the namespace's ``hits`` records and take every
        process's counts back: servers sharing a store (and a process started later, such as
        ``seqkv store rebalance``) rank nodes by the same accesses, and a restart loses none.
        The write holds the lock for the restored sessions' records alone; all are read
        after."""
        with self._hits_lock:
            unmerged, self._unmerged = self._unmerged, {}

        def work(txn) -> None:
            for (k, content), (n, ts) in unmerged.items():
                if self._content(k) != content:  # deleted or replaced meanwhile (current trie)
                    continue
                h = _hits(k, txn.read("hits", k), content) or (0, 0.0)
                txn.put("hits", k, pack({"kind": "hits", "session": k, "hash": content,
                                         "count": h[0] + n, "last": max(h[1], ts)}, []))

        if unmerged:
            try:
                self.store._write(work)
            except BaseException:
                self._requeue(unmerged, count=False)  # kept for the next merge
                raise
        records = self.store.backend.snapshot(self.store.ns, ("hits",))[1]["hits"]
        merged = {k: h for k, v in records.items()
                  if (h := _hits(k, v, self._content(k))) is not None}
        with self._hits_lock:  # with the restores touched since the swap above
            self.restores = merged
            for (k, _), (n, ts) in self._unmerged.items():
                m, last = self.restores.get(k, (0, 0.0))
                self.restores[k] = (m + n, max(last, ts))

    def _content(self, session: str) -> str | None:
        """The session's token hash as this process's trie has it (None: no such session)."""
        info = self.store.session_info.get(session)
        return info["hash"] if info is not None else None

    def absorb(self, other: CheckpointManager) -> None:
        """The restores another manager counted and has not merged (a server's reading Store,
        whose tiers another Store rebalances), to go into this one's next merge."""
        with other._hits_lock:
            counts, other._unmerged = other._unmerged, {}
        self._requeue(counts, count=True)

    def _requeue(self, counts: dict[tuple[str, str], tuple[int, float]], count: bool) -> None:
        """Unmerged restores, by (session, content), into the next merge (``count``: and into
        this process's view, where they were not counted yet)."""
        with self._hits_lock:
            for key, (n, ts) in counts.items():
                m, last = self._unmerged.get(key, (0, 0.0))
                self._unmerged[key] = (m + n, max(ts, last))
                if count:
                    m, last = self.restores.get(key[0], (0, 0.0))
                    self.restores[key[0]] = (m + n, max(ts, last))

    def forget_hits(self) -> None:
        """Drop every recorded restore of the namespace (all processes' counts)."""
        def work(txn) -> None:
            for k in txn.read_kind("hits"):
                txn.delete("hits", k)

        self.store._write(work)
        with self._hits_lock:
            self.restores, self._unmerged = {}, {}

    def node_hits(self) -> dict[str, tuple[int, float]]:
        """Each node's restores (count, last one's time): its sessions' summed."""
        out: dict[str, tuple[int, float]] = {}
        trie = self.store.trie
        with self._hits_lock:
            counts = list(self.restores.items())
        for session, (n, ts) in counts:
            node = trie.sessions.get(session)
            while node is not None and node is not trie.root:
                m, last = out.get(node.id, (0, 0.0))
                out[node.id] = (m + n, max(last, ts))
                node = node.parent
        return out

    def restore(self, header: dict, sections: list[bytes], ids: list[int]) -> RestoredCache:
        """A checkpoint's KV plus a prefill of the rest of ``ids``."""
        lm = self.store._need_model()
        dtype = next(lm.model.parameters()).dtype
        cache = deserialize_kv(header["kv"], sections[1], lm.config, dtype, lm.device)
        return continue_prefill(lm.model, cache, ids, int(header["held"]))

    # -- materialize / drop ----------------------------------------------------------------
    def kv_bytes(self, depth: int) -> int:
        """The size of a checkpoint record at ``depth`` (what the policy budgets with): the
        path's ids, the KV of its first ``held`` positions as ``serialize_kv`` writes it, and
        the record's header. Quantized tensors are a fixed header plus a fixed size per
        position, fitted once per tensor shape on two small tensors, so the estimate is the
        record's size (to the byte on Llama-family caches; a little above it on sliding-window
        layers, whose cache keeps one position less than the window); raw tensors are counted
        exactly, their safetensors header from a small one with room for longer numbers."""
        held = depth - depth % ALIGN
        if held == 0:
            return 4 * depth
        if self.quant is None:
            kv, meta = self._raw_kv_bytes(held)
        else:
            parts, bits = [], 0
            for heads, positions, dim in self._kv_shapes(held):
                size, tbits = self._quant_fit(heads, dim)
                parts += [int(np.ceil(size[0] + size[1] * positions))] * 2
                bits += 2 * int(np.ceil(tbits[0] + tbits[1] * positions))
            method, qbits = self.quant
            kv = sum(parts)
            meta = {"format": "quant", "method": method, "bits": qbits,
                    "layers": len(parts) // 2, "parts": parts, "kv_bits": bits}
        header = {"kind": "ckpt", "node": "0" * 16, "depth": depth, "held": held, "kv": meta}
        sections = [4 * depth, kv]  # pack() writes the section lengths into its header
        return (len(pack(header, [])) - len("[]") + len(json.dumps(sections).replace(" ", ""))
                + sum(sections))

    def _kv_shapes(self, held: int) -> list[tuple[int, int, int]]:
        """(kv heads, positions, head dim) of each layer's K (and V) for ``held`` positions."""
        return [(g.kv_heads, min(held, g.window) if g.window else held, g.head_dim)
                for g in kv_geometry(self.store._need_model().config)]

    def _quant_fit(self, heads: int, dim: int) -> tuple[tuple[float, float], ...]:
        """(bytes, bits) of one quantized [1, heads, n, dim] tensor as (fixed, per position)."""
        key = (heads, dim)
        if key not in self._fits:
            from ..quant import get_quantizer

            q = get_quantizer(*self.quant)
            gen = torch.Generator().manual_seed(0)
            qt = [q.quantize(torch.randn(1, heads, n, dim, generator=gen)) for n in (ALIGN,
                                                                                    2 * ALIGN)]
            size = [len(t.to_bytes()) for t in qt]
            bits = [int(t.bits) for t in qt]
            per = ((size[1] - size[0]) / ALIGN, (bits[1] - bits[0]) / ALIGN)
            self._fits[key] = ((size[0] - per[0] * ALIGN, per[0]),
                               (bits[0] - per[1] * ALIGN, per[1]))
        return self._fits[key]

    def _raw_kv_bytes(self, held: int) -> tuple[int, dict]:
        """Bytes of the raw (model dtype) KV of ``held`` positions and its meta."""
        from safetensors.torch import save

        dtype = next(self.store._need_model().model.parameters()).dtype
        size = torch.empty(0, dtype=dtype).element_size()
        shapes = self._kv_shapes(held)
        data = 2 * size * sum(h * p * d for h, p, d in shapes)
        if "raw" not in self._fits:  # the safetensors header of a small cache of these shapes
            small = {}
            for i, (h, _, d) in enumerate(self._kv_shapes(ALIGN)):
                for kv in "kv":
                    small[f"{kv}{i}"] = torch.zeros(1, h, ALIGN, d, dtype=dtype)
            small_data = sum(t.numel() * size for t in small.values())
            self._fits["raw"] = len(save(small)) - small_data
        # longer shapes and offsets take more digits in the header: 24 bytes a tensor of room
        return (data + self._fits["raw"] + 24 * 2 * len(shapes),
                {"format": "raw", "layers": len(shapes), "kv_bits": 8 * data})

    def checkpoint(self, target: str, cache=None) -> int:
        """Materialize a checkpoint at a session's node (or a node id); returns its bytes."""
        s = self.store
        lm = s._need_model()
        s.refresh()
        node = s.trie.sessions.get(target) or s.trie.nodes.get(target)
        if node is None or node is s.trie.root:
            raise StoreError(f"no session or node {target!r}")
        ids = s._path_ids(s.trie.path(node))[0]
        held = node.depth - node.depth % ALIGN
        if held == 0:
            raise StoreError(f"a checkpoint needs at least {ALIGN} tokens of path")
        if cache is not None and cache.get_seq_length() >= held:
            cache.crop(held - cache.get_seq_length())  # relative: the API of every version
        else:
            with s.model_lock:
                cache = prefill_cache(lm.model, ids[:held]).cache
        meta, kv = serialize_kv(cache, *(self.quant or (None, None)))
        record = pack({"kind": "ckpt", "node": node.id, "depth": node.depth, "held": held,
                       "kv": meta},
                      [np.asarray(ids, "<u4").tobytes(), kv])
        cmeta = {"kind": "ckptmeta", "node": node.id, "depth": node.depth, "bytes": len(record),
                 "format": meta["format"]}

        def work(txn) -> None:
            cur = s.trie.nodes.get(node.id)
            if cur is None or cur.depth != node.depth:
                raise StoreError("the node was deleted meanwhile")
            txn.put("ckpt", node.id, record)
            txn.put("ckptmeta", node.id, pack(cmeta, []))
            self.meta[node.id] = cmeta

        s._write(work)
        return len(record)

    def drop(self, node_id: str) -> None:
        def work(txn) -> None:
            txn.delete("ckpt", node_id)
            txn.delete("ckptmeta", node_id)
            self.meta.pop(node_id, None)

        self.store._write(work)

    # -- the policy ------------------------------------------------------------------------
    def _path_bits(self, n: Node) -> float:
        """-log2 P_M of an edge's tokens as far as known: coded bits, or (kept raw) the bits it
        had when coded, or its intervals; a raw edge never coded counts at its stored size."""
        if not n.raw:
            return float(n.bits)
        rec = self.raw.get(n.id) or {}
        if rec.get("bits") is not None and rec.get("n") == n.n:  # not split since
            return float(rec["bits"])
        if n.intervals is not None:
            return float(np.sum(info_bits(n.intervals)))
        return float(32 * n.n)

    def candidates(self) -> dict[str, NodeInfo]:
        """Every node, with its edge (the raw tier); session ends and branch points at least
        ``ALIGN`` deep may also hold a checkpoint."""
        trie = self.store.trie
        hits = self.node_hits()
        out: dict[str, NodeInfo] = {}
        bits: dict[str, float] = {"root": 0.0}
        ancestors: dict[str, list[str]] = {"root": []}
        stack = [trie.root]
        while stack:  # from the root down: a node's path bits and ancestors from its parent's
            node = stack.pop()
            for n in node.children.values():
                bits[n.id] = bits[node.id] + self._path_bits(n)
                above = ancestors[node.id]
                ancestors[n.id] = [*above, node.id] if node is not trie.root else []
                ckpt = bool(n.sessions or len(n.children) > 1) and n.depth >= ALIGN
                out[n.id] = NodeInfo(n.id, n.depth, self.kv_bytes(n.depth) if ckpt else 0,
                                     trie.refs(n), bits[n.id], *hits.get(n.id, (0, 0.0)),
                                     list(ancestors[n.id]), n.n, ckpt)
                stack.append(n)
        return out

    def tiers(self) -> dict[str, Tier]:
        """Each node's tier now (absent: coded)."""
        out = {i: Tier.RAW for i in self.raw}
        out.update({i: Tier.CHECKPOINT for i in self.meta})
        return out

    def rebalance(self, accessed: str | None = None) -> dict:
        """Let the policy pick each node's tier under the byte budget; materialize and drop
        checkpoints, keep the hot edges raw (swapping coded ones back) and release the others
        to the next compaction."""
        s = self.store
        s.refresh()
        self.merge_hits()
        nodes = self.candidates()
        acc = s.trie.sessions[accessed].id if accessed in s.trie.sessions else None
        current = {i: t for i, t in self.tiers().items() if i in nodes}
        chosen = self.policy.tiers(nodes, current, acc, self.budget)
        keep = {i for i, t in chosen.items() if t is Tier.CHECKPOINT}
        raw = {i for i, t in chosen.items() if t is Tier.RAW}
        dropped = [i for i in list(self.meta) if i not in keep]
        for i in dropped:
            self.drop(i)
        retier = self.keep_raw(raw)
        added = [i for i in keep if i not in self.meta]
        for i in added:
            self.checkpoint(i)
        return {"kept": sorted(keep), "added": added, "dropped": dropped, "bytes": self.bytes,
                "raw": sorted(self.raw), **retier, "raw_bytes": self.raw_bytes,
                "policy_bytes": tiers_bytes(nodes, chosen)}

    def keep_raw(self, raw: set[str]) -> dict:
        """Make ``raw`` the set of edges kept raw, in one transaction: a coded edge in it is
        swapped back to raw by compare-and-swap (its tokens decoded first, outside the lock;
        it keeps its id), a pending raw one is just marked; an edge no longer in it loses its
        mark and stays raw until the next compaction codes it."""
        s = self.store
        s.refresh()
        add = [i for i in sorted(raw) if i not in self.raw and i in s.trie.nodes]
        s._decode_paths([(s.trie.path(s.trie.nodes[i]), []) for i in add])  # model, unlocked
        expect = {i: (s.trie.nodes[i].parent.id, s.trie.nodes[i].start, s.trie.nodes[i].n,
                      s.trie.nodes[i].token_hash) for i in add}

        def work(txn) -> dict:
            cooled, heated, swapped, skipped = [], [], 0, 0
            for i in [i for i in self.raw if i not in raw]:
                txn.delete("tier", i)
                del self.raw[i]
                cooled.append(i)
            for i in add:
                cur = s.trie.nodes.get(i)  # the latest committed state
                if (i in self.raw or cur is None or not cur.known
                        or (cur.parent.id, cur.start, cur.n, cur.token_hash) != expect[i]):
                    skipped += i not in self.raw  # changed meanwhile: the next rebalance
                    continue
                header = {"kind": "tier", "node": i, "tier": Tier.RAW.value, "n": cur.n,
                          "bits": None if cur.raw else cur.bits}
                if not cur.raw:
                    cur.raw, cur.words = True, np.zeros(0, np.uint32)
                    txn.put("edge", i, pack_edge(cur))
                    swapped += 1
                txn.put("tier", i, pack(header, []))
                self.raw[i] = header
                heated.append(i)
            return {"raw_added": heated, "raw_dropped": cooled, "raw_swapped": swapped,
                    "raw_skipped": skipped}

        if not add and all(i in raw for i in self.raw):
            return {"raw_added": [], "raw_dropped": [], "raw_swapped": 0, "raw_skipped": 0}
        return s._write(work)
