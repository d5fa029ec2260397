"""Shipped training configurations (copy one and pass its path to ``mbv3-train --config``)."""
