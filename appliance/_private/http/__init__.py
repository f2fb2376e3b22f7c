"""The appliance's HTTP layer: routes and rendering, over the node core (`node.py`)."""
