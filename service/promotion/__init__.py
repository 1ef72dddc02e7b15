"""Safe promotion: quality gates, canary routing, shadow traffic, automatic rollback.

Kept apart from the registry's scan/load/swap machinery: the registry asks `gate` whether a
freshly loaded version may serve and asks `routing` which version a request gets; the
observers here watch answers and tell the registry when a canary must leave traffic.
"""
