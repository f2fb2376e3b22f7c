"""Engines: what runs a model behind the appliance's HTTP layer."""
