"""Check the compatibility table's cells on a GPU: every (method, quantization) pair, forced through peft.

    PYTHONPATH=. python benchmarks/adapter_cuda_cells.py [--device cuda] [--methods dora,loftq] [--modes int8]

For each cell the compatibility checks are bypassed (the base is loaded, prepared and wrapped directly) and
the same things as the CPU tests are measured on the tiny 2-layer LLaMA, float32 compute:
  init   max |Δlogit| of the wrapped model against the bare base before any step (identity methods: ~0);
  steps  3 AdamW steps: loss finite, some trainable tensor changed, no frozen tensor changed;
  reload the exported adapter on a fresh base in plain peft: max |Δlogit| (should be ~0);
  gen    generate runs.
Each line ends with the table's verdict and whether the GPU agrees: `AGREE`, or `DISAGREE` when a cell the
table refuses (or allows on CUDA only) behaves otherwise here. For LoftQ it also prints how far the bare
4-bit base and the LoftQ-initialised model are from the unquantized model (LoftQ should be closer).
Needs torch, transformers, peft, bitsandbytes (and PyYAML); not lightning, and jsonargparse only if present.
Expected on an H200: under a minute after imports; the lines that matter are the CUDA cells (dora int8,
loftq on 4-bit) and the refusals said to hold on CUDA too (loha/lokr/hra on 4-bit, hra int8, full on
quantized bases).
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time
import traceback
import warnings
from pathlib import Path

import torch

warnings.filterwarnings("ignore")

SMALL = dict(hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, initializer_range=64**-0.5)  # the tests' tiny LLaMA
TINY_OVERRIDES = {"adalora": dict(tinit=0, tfinal=1, deltaT=1, total_step=3)}


def load_config(method, model_dir: str):
    """The row's YAML as the CLI loads it (jsonargparse); plain YAML + import where jsonargparse is missing."""
    overrides = TINY_OVERRIDES.get(method.name, {})
    try:
        import jsonargparse  # noqa: F401
    except ImportError:
        import importlib

        import yaml

        from lightning_qpeft.model.adapters import complete_run_fields

        spec = yaml.safe_load(method.yaml.read_text())
        module, name = spec["class_path"].rsplit(".", 1)
        args = argparse.Namespace(**{**spec.get("init_args", {}), **overrides})
        complete_run_fields(argparse.Namespace(class_path=spec["class_path"], init_args=args), model_dir)
        return getattr(importlib.import_module(module), name)(**vars(args))
    from lightning_qpeft.model import compat

    return compat.load_method_config(method, base_model=model_dir, **overrides)


def run_cell(method, quantization: str, model_dir: str, device: torch.device, ids: torch.Tensor) -> str:
    import peft

    from lightning_qpeft.model.adapters import attach_adapter
    from lightning_qpeft.model.loading import load_base_model
    from lightning_qpeft.model.preparation import prepare_base

    def load(mode: str):
        return load_base_model(model_dir, mode, compute_dtype="float32", dtype="float32", device=device)

    def logits(model) -> torch.Tensor:
        with torch.no_grad():
            return model(input_ids=ids).logits[:, -ids.shape[1]:].float()

    stage = "build"
    try:
        adapter = load_config(method, model_dir)
        base = prepare_base(load(quantization), gradient_checkpointing=False).eval()
        bare = logits(base)
        model = attach_adapter(base, adapter, base_path=model_dir).eval()
        stage = "init"
        notes = [f"init Δ {(logits(model) - bare).abs().max().item():.2g}"]
        if method.name == "loftq":
            reference = logits(load("none").eval())
            notes.append(f"to unquantized: base Δ {(bare - reference).abs().max().item():.3g}, "
                         f"loftq Δ {(logits(model) - reference).abs().max().item():.3g}")
        trainable = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
        frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
        if not trainable:
            raise RuntimeError("nothing to train")
        if method.name == "full" and not any("proj" in n for n in trainable):
            raise RuntimeError(f"no linear weight is trainable (only {len(trainable)} norm/embedding tensors)")
        stage = "steps"
        model.train()
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        losses = []
        for step in range(3):
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            optimizer.step()
            if method.name == "adalora":
                model.base_model.update_and_allocate(step)
            optimizer.zero_grad()
            losses.append(loss.item())
        if not all(torch.isfinite(torch.tensor(losses))):
            raise RuntimeError(f"non-finite loss {losses}")
        params = dict(model.named_parameters())
        if all(torch.equal(params[n], v) for n, v in trainable.items()):
            raise RuntimeError("no trainable tensor changed")
        moved = [n for n, v in frozen.items() if not torch.equal(params[n], v)]
        if moved:
            raise RuntimeError(f"frozen tensors changed: {moved[:3]}")
        notes.append(f"loss {losses[0]:.3f}->{losses[-1]:.3f}")
        stage = "reload"
        model.eval()
        trained = logits(model)
        with tempfile.TemporaryDirectory() as folder:
            model.save_pretrained(folder)
            if isinstance(model, peft.PeftModel):
                reloaded = peft.PeftModel.from_pretrained(load(quantization), folder).eval()
                notes.append(f"reload Δ {(logits(reloaded) - trained).abs().max().item():.2g}")
        stage = "gen"
        model.generate(input_ids=ids[:1], attention_mask=torch.ones_like(ids[:1]), max_new_tokens=3,
                       do_sample=False, pad_token_id=model.config.eos_token_id)
        return "ok (" + "; ".join(notes) + ")"
    except Exception as e:  # noqa: BLE001 - the point is to report what peft does
        message = str(e).strip().splitlines()[0][:140] if str(e).strip() else ""
        return f"FAIL at {stage}: {type(e).__name__}: {message}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--methods", default="", help="comma-separated rows (default: all)")
    parser.add_argument("--modes", default="", help="comma-separated quantization modes (default: all)")
    args = parser.parse_args()

    import bitsandbytes
    import peft
    import transformers

    import lightning_qpeft.model.compat as compat
    from lightning_qpeft.base_models.tiny import build_tiny_llama

    transformers.utils.logging.set_verbosity_error()
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)  # one warning per int8 matmul of float32 inputs
    transformers.utils.logging.disable_progress_bar()
    device = torch.device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"# torch {torch.__version__}, transformers {transformers.__version__}, peft {peft.__version__}, "
          f"bitsandbytes {bitsandbytes.__version__}, {name}", flush=True)
    model_dir = str(build_tiny_llama(Path(tempfile.mkdtemp()) / "tiny-test", **SMALL))
    ids = torch.randint(3, 500, (2, 12), generator=torch.Generator().manual_seed(0)).to(device)
    methods = [compat.METHODS[m] for m in args.methods.split(",")] if args.methods else list(compat.METHODS.values())
    modes = args.modes.split(",") if args.modes else list(compat.QUANT_COLUMNS)
    disagreements = []
    start = time.time()
    for method in methods:
        for mode in modes:
            cell = method.cell(mode)
            torch.manual_seed(0)
            with warnings.catch_warnings():  # bitsandbytes warns on every int8 matmul with float32 inputs
                warnings.simplefilter("ignore")
                result = run_cell(method, mode, model_dir, device, ids)
            works = result.startswith("ok")
            identity_broken = works and method.identity_at_init and _init_delta(result) > 1e-3
            if identity_broken:
                result += " WRONG-MATHS (identity method does not start as the base)"
            allowed = cell.status is compat.Status.OK or (cell.status is compat.Status.CUDA and device.type == "cuda")
            agree = allowed == (works and not identity_broken)
            line = f"CELL {method.name:18s} {mode:7s} table={cell.status.value:7s} {device.type}: {result} " \
                   f"{'AGREE' if agree else 'DISAGREE'}"
            print(line, flush=True)
            if not agree:
                disagreements.append(line)
    print(f"# {len(methods) * len(modes)} cells in {time.time() - start:.0f} s; {len(disagreements)} disagree "
          "with lightning_qpeft/model/compat.py")
    for line in disagreements:
        print("DISAGREE", line)


def _init_delta(result: str) -> float:
    try:
        return float(result.split("init Δ ", 1)[1].split(";", 1)[0].split(")", 1)[0])
    except (IndexError, ValueError):
        return 0.0


if __name__ == "__main__":
    try:
        main()
    except Exception:
        traceback.print_exc()
        raise
