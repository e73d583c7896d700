"""The ClientApp of ``flwr run`` (pyproject.toml's ``[tool.flwr.app.components]``): one data holder's client."""

from fl.federation.client import make_client_app

app = make_client_app()
