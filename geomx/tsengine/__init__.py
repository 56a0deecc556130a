"""TSEngine: throughput-aware aggregation trees (push) and relay broadcasts (pull) inside a tier.

``policy`` is the pure scheduling policy (throughput table, pairing, greedy/explore choice);
``coordinator`` runs it in a tier's scheduler; ``peer`` is a node's side (merge buffers, relays,
throughput measurements). See docs/Scheduling.md.
"""
