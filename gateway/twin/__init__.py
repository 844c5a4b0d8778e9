"""Twin rules, pure and sans-IO: no sockets, no clocks, no storage in here.

``model`` holds the twin's types; ``engine`` applies reported and desired values by the
rules in DESIGN.md, on top of ``writes`` (desired writes with backoff) and ``outbox``
(one composed pending patch per device); ``conflict`` is the rule between cloud and edge
writes; ``status`` renders a twin as Device status shows it; ``hlc`` is the hybrid
logical clock that stamps desired writes; ``patch`` composes status merge patches.
Callers pass time in and carry the returned decisions out.
"""
