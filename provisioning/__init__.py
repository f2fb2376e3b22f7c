"""Node bring-up: first boot, identity, enrollment into a fleet, pinned node config.

`palisade node init` gives the node its key and node.toml; `palisade node enroll` pins the
fleet CA and gets the node's certificate; `palisade node status` shows both
(docs/architecture.md, Fleet trust).
"""

from provisioning._private.bringup import BringupError, enroll_node, init_node, node_status
from provisioning._private.cli import node_cli

__all__ = ["BringupError", "enroll_node", "init_node", "node_cli", "node_status"]
