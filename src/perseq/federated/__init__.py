"""Federated training: each client (a user's device, or a group of users) trains on its own
events with the library's ``train_step`` and sends only weight updates; the server combines
them. ``simulate`` runs the rounds in one process (the research engine and the reference);
the Flower apps deploy the same client step. Flower itself is imported only by the Flower
apps, never here."""
from .config import FederatedConfig

__all__ = ["FederatedConfig"]
