"""Twin rules, pure and sans-IO: no sockets, no clocks, no storage in here.

``engine`` applies reported and desired values by the rules in DESIGN.md; ``hlc`` is the
hybrid logical clock that stamps desired writes; ``patch`` composes status merge patches
for the outbox. Callers pass time in and carry the returned decisions out.
"""
