"""Heads named by what they do in a causal circuit, not by their index: a head's index is arbitrary per seed
(seed 0's previous-token head is 0.2, seed 1's is 0.3), its role is what replicates share.

Roles, read from the circuit's edges alone (model.edges names them; no torch, no weights):

- `induction`: a head of layer 1 or later whose key reads an earlier head's output (K-composition) and whose output
  reaches the logits through the circuit;
- `previous_token`: a head whose output feeds an induction head's key;
- `copying`: a head that writes to the logits directly without K-composition into its key (1-layer models' heads,
  a 2-layer model's heads that copy from context);
- `other`: any other head in the circuit.

An edge is named by role by replacing each head with its role (`0.2 -> 1.1.k` becomes
`previous_token -> induction.k`); the embedding, MLPs and the logits keep their names, so `embed -> logits` is
the direct path. Several edges may share a role-edge (four induction heads each reading the same previous-token
head); circuits compare across seeds and grid points by their sets of role-edges.
"""

from __future__ import annotations

from .edges import EMBED, LOGITS

ROLES = ("previous_token", "induction", "copying", "other")


def _is_head(node: str) -> bool:
    return node not in (EMBED, LOGITS) and not node.startswith("mlp")


def _head_of(receiver: str) -> str:
    """The head a receiver belongs to (`1.2.k` -> `1.2`); other receivers are their own node."""
    return receiver.rsplit(".", 1)[0] if receiver.count(".") == 2 else receiver


def head_roles(circuit: list[str]) -> dict[str, str]:
    """head -> its role in the circuit, for every head an edge of the circuit names."""
    pairs = [edge.split(" -> ") for edge in circuit]
    feeds: dict[str, set[str]] = {}
    for sender, receiver in pairs:
        feeds.setdefault(sender, set()).add(_head_of(receiver))
    reaches: set[str] = {LOGITS}
    changed = True
    while changed:  # nodes with a path to the logits: a fixed point over a graph of a few dozen edges
        changed = False
        for node, targets in feeds.items():
            if node not in reaches and targets & reaches:
                reaches.add(node)
                changed = True
    heads = {node for sender, receiver in pairs for node in (sender, _head_of(receiver)) if _is_head(node)}
    keyed = {_head_of(receiver) for sender, receiver in pairs if _is_head(sender) and receiver.endswith(".k")}
    induction = {head for head in heads if head in keyed and head in reaches and not head.startswith("0.")}
    previous = {sender for sender, receiver in pairs
                if _is_head(sender) and receiver.endswith(".k") and _head_of(receiver) in induction}
    direct = {sender for sender, receiver in pairs if receiver == LOGITS}
    roles = {}
    for head in sorted(heads):
        if head in induction:
            roles[head] = "induction"
        elif head in previous:
            roles[head] = "previous_token"
        elif head in direct:
            roles[head] = "copying"
        else:
            roles[head] = "other"
    return roles


def role_edge(edge: str, roles: dict[str, str]) -> str:
    """`edge` with each head replaced by its role (a head the roles do not name is `other`)."""
    sender, receiver = edge.split(" -> ")
    if _is_head(sender):
        sender = roles.get(sender, "other")
    head = _head_of(receiver)
    if _is_head(head) and head != receiver:
        receiver = f"{roles.get(head, 'other')}.{receiver.rsplit('.', 1)[1]}"
    return f"{sender} -> {receiver}"


def role_edges(circuit: list[str], roles: dict[str, str] | None = None) -> dict[str, int]:
    """role-edge -> how many of the circuit's edges it stands for, in the circuit's order (roles: head_roles of the
    circuit unless given)."""
    roles = head_roles(circuit) if roles is None else roles
    counts: dict[str, int] = {}
    for edge in circuit:
        name = role_edge(edge, roles)
        counts[name] = counts.get(name, 0) + 1
    return counts
