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


def gather_trainable_worker(rank: int, world: int, model_dir: str, method: str, port: int, out: str) -> None:
    """One gloo rank: a 4-bit tiny model with an adapter, wrapped in torch's FSDP on the CPU as
    QPeftFSDPStrategy wraps it; rank 0 saves the trainable tensors gathered before any forward next to the
    unwrapped ones, and those gathered after a training step next to what a gather of the whole model gives."""
    import contextlib
    import os

    import torch
    import torch.distributed as dist
    from peft import LoraConfig, PromptTuningConfig
    from peft.utils.other import fsdp_auto_wrap_policy
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    from lightning_qpeft.distributed import _clean, gather_trainable
    from lightning_qpeft.model.adapters import attach_adapter
    from lightning_qpeft.model.loading import load_base_model
    from lightning_qpeft.model.preparation import prepare_base

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.manual_seed(0)  # the same adapter init on every rank, as Lightning's seed_everything gives
    base = load_base_model(model_dir, quantization="nf4-dq", compute_dtype="bfloat16", quant_storage="bfloat16")
    config = (LoraConfig(r=4, target_modules="all-linear", task_type="CAUSAL_LM") if method == "lora" else
              PromptTuningConfig(num_virtual_tokens=4, task_type="CAUSAL_LM"))
    model = attach_adapter(prepare_base(base, False, False), config, None)
    with torch.no_grad():  # LoRA B starts at 0: make every tensor tell its values apart
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn_like(p))
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    root = FSDP(model, auto_wrap_policy=fsdp_auto_wrap_policy(model), use_orig_params=True,
                device_id=torch.device("cpu"))
    gathered = gather_trainable(root, root, rank)  # before the first forward: a save at step 0
    # then a step (the gather above must not have broken FSDP's root), and again
    optimizer = torch.optim.AdamW([p for p in root.parameters() if p.requires_grad], lr=1e-2)
    x = torch.randint(0, 100, (2, 8))
    root(input_ids=x, labels=x).loss.backward()
    optimizer.step()
    trained = gather_trainable(root, root, rank)
    # the whole model gathered at once (with one rank FSDP runs NO_SHARD: the parameters are whole already, and
    # summoning the root trips an assertion of torch's on peft's shared word embeddings)
    with FSDP.summon_full_params(root, writeback=False) if world > 1 else contextlib.nullcontext():
        whole = {_clean(n): p.detach().clone() for n, p in root.named_parameters() if p.requires_grad}
    if rank == 0:
        save_file({f"before/{n}": t.contiguous() for n, t in before.items()}
                  | {f"gathered/{n}": t.contiguous() for n, t in gathered.items()}
                  | {f"trained/{n}": t.contiguous() for n, t in trained.items()}
                  | {f"whole/{n}": t.contiguous() for n, t in whole.items()}, out)
    else:
        assert gathered == {} and trained == {}
    dist.destroy_process_group()


def optimizer_resume_worker(rank: int, model_dir: str, port: int, out: str) -> None:
    """One gloo rank (FSDP NO_SHARD): an AdamW step on a LoRA model, its state saved as QPeftFSDPStrategy and as
    Lightning's FSDPStrategy save it, each loaded as Lightning's FSDP load does into a fresh copy; writes the
    loaded states (or the error Lightning's gave) for the test to compare."""
    import json
    import os

    import torch
    import torch.distributed as dist
    from lightning.fabric.strategies.fsdp import _get_full_state_dict_context
    from lightning.pytorch.strategies import FSDPStrategy
    from peft import LoraConfig
    from peft.utils.other import fsdp_auto_wrap_policy
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from torch.distributed.fsdp import OptimStateKeyType

    from lightning_qpeft.distributed import QPeftFSDPStrategy
    from lightning_qpeft.model.adapters import attach_adapter
    from lightning_qpeft.model.loading import load_base_model
    from lightning_qpeft.model.preparation import prepare_base

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=1)

    def make():
        torch.manual_seed(0)
        base = load_base_model(model_dir, quantization="nf4-dq", compute_dtype="bfloat16", quant_storage="bfloat16")
        model = attach_adapter(prepare_base(base, False, False),
                               LoraConfig(r=4, target_modules="all-linear", task_type="CAUSAL_LM"), None)
        root = FSDP(model, auto_wrap_policy=fsdp_auto_wrap_policy(model), use_orig_params=True,
                    device_id=torch.device("cpu"))
        return root, torch.optim.AdamW([p for p in root.parameters() if p.requires_grad], lr=1e-3)

    def named_state(root, opt):
        names = {id(p): n for n, p in root.named_parameters()}
        return {names[id(p)]: opt.state[p]["exp_avg"] for g in opt.param_groups for p in g["params"]}

    trained, opt = make()
    x = torch.randint(0, 100, (2, 8))
    trained(input_ids=x, labels=x).loss.backward()
    opt.step()
    result = {"trained": {n: t.sum().item() for n, t in named_state(trained, opt).items()}}
    for cls in (QPeftFSDPStrategy, FSDPStrategy):
        strategy = cls()
        strategy.model = trained
        saved = strategy.optimizer_state(opt)
        fresh, fresh_opt = make()
        try:  # as lightning.pytorch.strategies.FSDPStrategy.load_checkpoint loads it
            with _get_full_state_dict_context(fresh, world_size=1, rank0_only=False):
                if isinstance(next(iter(saved["state"])), int):
                    saved = FSDP.rekey_optim_state_dict(saved, OptimStateKeyType.PARAM_NAME, fresh)
                fresh_opt.load_state_dict(FSDP.optim_state_dict_to_load(optim_state_dict=saved, model=fresh,
                                                                        optim=fresh_opt))
            result[cls.__name__] = {n: t.sum().item() for n, t in named_state(fresh, fresh_opt).items()}
        except KeyError as e:
            result[cls.__name__] = f"KeyError {e}"
    with open(out, "w") as f:
        json.dump(result, f)
    dist.destroy_process_group()
