"""Ignite engine of DrasCLR pretraining: a MONAI ``SupervisedTrainer`` whose iteration is one contrastive step."""

from __future__ import annotations

from typing import Any, Callable

import torch
from monai.engines import SupervisedTrainer
from monai.engines.utils import IterationEvents

# batch keys the DrasCLR module takes, in its forward's argument names
CONTRASTIVE_KEYS = ("image_q", "image_k", "location", "location_index", "neighbour_images", "neighbour_locations")
MONITORED = ("loss", "loss_local", "loss_neighbour", "acc_local", "acc_neighbour")


class DrasCLRTrainer(SupervisedTrainer):
    """Pretraining engine: ``network`` is a :class:`~drasclr_ext.networks.DrasCLR` (or DDP around one).

    ``engine.state.output`` holds the scalars ``loss``, ``loss_local``, ``loss_neighbour``, ``acc_local`` and
    ``acc_neighbour`` (floats), ready for ``StatsHandler``/``TensorBoardStatsHandler`` with
    ``output_transform="$lambda x: x"``. All other arguments are those of ``SupervisedTrainer``.
    """

    def __init__(self, *args: Any, loss_function: Callable | None = None, **kwargs: Any) -> None:
        kwargs.setdefault("decollate", False)
        super().__init__(*args, loss_function=loss_function or contrastive_loss, **kwargs)

    def _iteration(self, engine: SupervisedTrainer, batchdata: dict[str, torch.Tensor]) -> dict[str, float]:
        if batchdata is None:
            raise ValueError("Must provide batch data for current iteration.")
        inputs = {
            key: torch.as_tensor(batchdata[key]).to(engine.state.device, non_blocking=engine.non_blocking)
            for key in CONTRASTIVE_KEYS
            if key in batchdata
        }
        engine.network.train()
        engine.optimizer.zero_grad(set_to_none=engine.optim_set_to_none)
        if engine.amp and engine.scaler is not None:
            with torch.autocast("cuda", **engine.amp_kwargs):
                out = engine.network(**inputs)
            engine.fire_event(IterationEvents.FORWARD_COMPLETED)
            loss = engine.loss_function(out)
            engine.fire_event(IterationEvents.LOSS_COMPLETED)
            engine.scaler.scale(loss).backward()
            engine.fire_event(IterationEvents.BACKWARD_COMPLETED)
            engine.scaler.step(engine.optimizer)
            engine.scaler.update()
        else:
            out = engine.network(**inputs)
            engine.fire_event(IterationEvents.FORWARD_COMPLETED)
            loss = engine.loss_function(out)
            engine.fire_event(IterationEvents.LOSS_COMPLETED)
            loss.backward()
            engine.fire_event(IterationEvents.BACKWARD_COMPLETED)
            engine.optimizer.step()
        engine.fire_event(IterationEvents.MODEL_COMPLETED)
        return {key: float(out[key].detach()) for key in MONITORED if key in out}


def contrastive_loss(output: dict[str, torch.Tensor]) -> torch.Tensor:
    """The total DrasCLR loss (local + beta * neighbour) that the module already computed."""
    return output["loss"]
