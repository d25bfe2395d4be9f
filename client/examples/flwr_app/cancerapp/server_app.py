"""cancerapp: the ServerApp, which builds the first global model and runs FedAvg."""

import torch
from flwr.app import ArrayRecord, Context
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg

from cancerapp.task import Net

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Start FedAvg from a freshly initialised Net and save the final model."""
    num_rounds = int(context.run_config["num-server-rounds"])
    fraction_train = float(context.run_config["fraction-train"])

    initial_arrays = ArrayRecord(Net().state_dict())
    strategy = FedAvg(fraction_train=fraction_train)
    result = strategy.start(grid=grid, initial_arrays=initial_arrays, num_rounds=num_rounds)

    torch.save(result.arrays.to_torch_state_dict(), "final_model.pt")
