"""Slow, obvious references (Python loops, numpy float64) the fast code is checked against."""

import numpy as np


def softmax64(logits):
    z = np.asarray(logits, np.float64)
    z = z - z.max(-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(-1, keepdims=True)


def topk_lower_index_ties(p, k):
    """Indices of the k largest entries, ties to the lower index."""
    return sorted(range(len(p)), key=lambda e: (-p[e], e))[:k]


def tokens_choose_ref(logits, k, capacity, priority="choice", batch_prioritized=False,
                      normalize=False, token_mask=None, keep_second=None):
    """Returns (slot_token [G,E,C], weight {(g,s,e): w}, dropped count, requested count).

    keep_second [G, S] bool: GShard random policy draws (None: keep all).
    """
    probs = softmax64(logits)
    G, S, E = probs.shape
    mask = np.ones((G, S), bool) if token_mask is None else np.asarray(token_mask)
    slot_token = -np.ones((G, E, capacity), np.int64)
    weights = {}
    dropped = requested = 0
    for g in range(G):
        top = [topk_lower_index_ties(probs[g, s], k) for s in range(S)]
        order = list(range(S))
        if batch_prioritized:
            order = sorted(range(S), key=lambda s: (-probs[g, s, top[s][0]], s))
        if priority == "choice":
            sequence = [(s, j) for j in range(k) for s in order]
        else:
            sequence = [(s, j) for s in order for j in range(k)]
        fill = [0] * E
        for s, j in sequence:
            if not mask[g, s]:
                continue
            if j == 1 and keep_second is not None and not keep_second[g, s]:
                continue
            requested += 1
            e = top[s][j]
            if fill[e] < capacity:
                slot_token[g, e, fill[e]] = s
                fill[e] += 1
                p = probs[g, s, e]
                if normalize:
                    p = p / sum(probs[g, s, x] for x in top[s])
                weights[(g, s, e)] = p
            else:
                dropped += 1
    return slot_token, weights, dropped, requested


def experts_choose_ref(logits, capacity, token_mask=None):
    probs = softmax64(logits)
    G, S, E = probs.shape
    mask = np.ones((G, S), bool) if token_mask is None else np.asarray(token_mask)
    slot_token = -np.ones((G, E, capacity), np.int64)
    weights = {}
    for g in range(G):
        for e in range(E):
            ranked = sorted((s for s in range(S) if mask[g, s]), key=lambda s: (-probs[g, s, e], s))
            for c, s in enumerate(ranked[:capacity]):
                slot_token[g, e, c] = s
                weights[(g, s, e)] = probs[g, s, e]
    return slot_token, weights


def plan_weights(plan):
    """{(g, s, e): weight} of the kept assignments of a jmoe plan."""
    expert = np.asarray(plan.token_expert)
    slot = np.asarray(plan.token_slot)
    weight = np.asarray(plan.token_weight)
    out = {}
    for g, s, j in zip(*np.nonzero(slot >= 0)):
        out[(int(g), int(s), int(expert[g, s, j]))] = float(weight[g, s, j])
    return out


