"""The seam between the site agent and whatever trains the model.

`protocols` defines what the agent needs (`LocalTrainer`, `PrivateTrainer`) and what it
gets back; `tasks` and `data` are the built-in torch tasks on data sets shipped by
packages; `flower_host` hosts a Flower ClientApp in-process. Only the protocols are
imported here: the tasks pull in torch, which the agent loads only when it trains.
"""

from client.training.protocols import (
    ChargePreview,
    EvalResult,
    FitResult,
    LocalTrainer,
    Parameters,
    PrivateTrainer,
)

__all__ = ["ChargePreview", "EvalResult", "FitResult", "LocalTrainer", "Parameters", "PrivateTrainer"]
