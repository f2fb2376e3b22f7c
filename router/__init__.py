"""The global front door: residency-filtered, latency-aware routing across appliances.

Empty until the router issue lands; the package exists so the layout and import rules of
DESIGN.md hold from the first commit.
"""

__all__: list[str] = []
