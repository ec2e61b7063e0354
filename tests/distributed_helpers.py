"""Callbacks the distributed tests inject through the CLI (`--trainer.callbacks+=...`)."""

from pathlib import Path

from lightning.pytorch import Callback
from safetensors.torch import save_file


class DumpTrainableTensors(Callback):
    """At the end of fit, every rank writes its trainable tensors to `<dirpath>/rank<N>.safetensors`."""

    def __init__(self, dirpath: str) -> None:
        self.dirpath = dirpath

    def on_fit_end(self, trainer, pl_module) -> None:
        Path(self.dirpath).mkdir(parents=True, exist_ok=True)
        tensors = {n: p.detach().cpu().contiguous() for n, p in pl_module.named_parameters() if p.requires_grad}
        save_file(tensors, str(Path(self.dirpath) / f"rank{trainer.global_rank}.safetensors"))
