"""The "same training" check: the peer recipe's first optimizer steps on OUR batches, and the comparison.

    python benchmarks/peer_reference.py run --ckpt CKPT --out DIR --steps 3 --data-json '{...NLGDataModule kwargs}'
    python benchmarks/peer_reference.py compare --ref DIR --ours-logdir LOGDIR --ours-adapter DIR2

`run` builds the model exactly as the peer scripts do (from_pretrained with NF4 + double quant in bf16,
`prepare_model_for_kbit_training` with non-reentrant checkpointing, `get_peft_model` with LoRA r=64 alpha 16 on
all linear layers) but with LoRA dropout 0 (dropout draws differ between processes) and a seeded LoRA init that
it saves to DIR/init, so that our fit can start from the very same adapter (`--model.adapter_path DIR/init`).
It trains `--steps` steps on the first batches of our NLGDataModule (the batches our fit sees: same seed, same
order) under bf16 autocast, as HF Trainer's `bf16=True` does, with paged AdamW 32-bit at 2e-4, no weight decay,
max grad norm 0.3 (peer_trainer.py's settings), and saves the losses and the trained adapter (DIR/final).
That our tokenization equals the peer's own `build()` is checked separately (qlora_speed.py, `tokens_match`).

`compare` reads our fit's per-step `train/loss` (TensorBoard, log_every_n_steps=1) and exported adapter and
reports the loss differences and the cosine between the two adapters' updates (final - init): equal gradients
give a cosine near 1 whatever the (tiny, on random weights) loss change.

`run --precision fp32 --init DIR/init` trains the same 4-bit model from the same adapter in fp32 (no autocast):
the training that bf16 rounds. Comparing the bf16 peer and our fit each against it (`compare --ref FP32DIR
--ours-ref DIR` / `--ours-logdir`) says how far each is from it: the noise floor our bf16 paths are held to.
"""

import argparse
import json
import sys
import time
from pathlib import Path


def run(a: argparse.Namespace) -> None:
    import bitsandbytes as bnb
    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from lightning_qpeft.data.datamodule import NLGDataModule

    t0 = time.time()
    data = NLGDataModule(**json.loads(a.data_json))
    data.setup("fit")
    batches = []
    for batch in data.train_dataloader():
        batches.append({k: v for k, v in batch.items() if k in ("input_ids", "attention_mask", "labels")})
        if len(batches) == a.steps:
            break
    qc = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                            bnb_4bit_compute_dtype=torch.bfloat16)
    # cpu: a smoke test of this script; fp32: the same 4-bit weights trained without bf16 rounding
    bf16 = a.device == "cuda" and a.precision == "bf16"
    dtype = torch.bfloat16 if bf16 else torch.float32
    qc.bnb_4bit_compute_dtype = dtype
    model = AutoModelForCausalLM.from_pretrained(a.ckpt, quantization_config=qc, dtype=dtype,
                                                 device_map={"": 0 if a.device == "cuda" else "cpu"})
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True,
                                            gradient_checkpointing_kwargs={"use_reentrant": False})
    out = Path(a.out)
    if a.init:  # another reference's init: the same starting adapter, whatever this run's dtype
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, a.init, is_trainable=True)  # adapter weights in fp32 (peft's
        # autocast_adapter_dtype), as get_peft_model makes them
    else:
        torch.manual_seed(0)
        model = get_peft_model(model, LoraConfig(r=64, lora_alpha=16, lora_dropout=0.0,
                                                 target_modules="all-linear", task_type="CAUSAL_LM"))
    model.train()
    model.save_pretrained(out / "init")
    params = [p for p in model.parameters() if p.requires_grad]
    if a.device == "cuda":
        opt = bnb.optim.PagedAdamW32bit(params, lr=2e-4, weight_decay=0.0)
    else:
        opt = torch.optim.AdamW(params, lr=2e-4, weight_decay=0.0)
    losses = []
    for batch in batches:
        batch = {k: v.to(a.device) for k, v in batch.items()}
        with torch.autocast(a.device, dtype=torch.bfloat16, enabled=bf16):
            loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 0.3)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    model.save_pretrained(out / "final")
    res = {"losses": losses, "records_per_step": [int(b["input_ids"].shape[0]) for b in batches],
           "seconds": round(time.time() - t0, 1)}
    (out / "reference.json").write_text(json.dumps(res))
    print(json.dumps(res), flush=True)


def compare(a: argparse.Namespace) -> None:
    from safetensors.torch import load_file
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ref = json.loads((Path(a.ref) / "reference.json").read_text())
    if a.ours_ref:  # another reference run (the bf16 peer against the fp32 one)
        ours = json.loads((Path(a.ours_ref) / "reference.json").read_text())["losses"]
    else:
        ea = EventAccumulator(str(a.ours_logdir))
        ea.Reload()
        ours = [e.value for e in sorted(ea.Scalars("train/loss"), key=lambda e: e.step)]
    ours = ours[: len(ref["losses"])]
    init = load_file(str(Path(a.ref) / "init" / "adapter_model.safetensors"))
    theirs = load_file(str(Path(a.ref) / "final" / "adapter_model.safetensors"))
    mine = load_file(str(Path(a.ours_adapter) / "adapter_model.safetensors"))
    missing = sorted(set(theirs) ^ set(mine))
    dot = nt = nm = diff = 0.0
    for k in sorted(set(theirs) & set(mine)):
        dt = (theirs[k].double() - init[k].double()).flatten()
        dm = (mine[k].double() - init[k].double()).flatten()
        dot += float(dt @ dm)
        nt += float(dt @ dt)
        nm += float(dm @ dm)
        diff += float((dt - dm) @ (dt - dm))
    cosine = dot / max((nt * nm) ** 0.5, 1e-30)
    deltas = [abs(x - y) for x, y in zip(ours, ref["losses"])]
    res = {
        "reference_losses": ref["losses"], "our_losses": ours,
        "max_abs_loss_diff": max(deltas) if deltas else None,
        "adapter_update_cosine": cosine, "adapter_update_rel_diff": (diff / max(nt, 1e-30)) ** 0.5,
        "tensors_compared": len(set(theirs) & set(mine)), "tensors_mismatched": missing[:5],
    }
    res["losses_pass"] = bool(deltas and len(ours) == len(ref["losses"]) and res["max_abs_loss_diff"] <= a.loss_tol)
    res["pass"] = bool(res["losses_pass"] and not missing and cosine >= a.cosine_min)
    print(json.dumps(res), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run")
    r.add_argument("--ckpt", required=True)
    r.add_argument("--out", required=True)
    r.add_argument("--steps", type=int, default=3)
    r.add_argument("--data-json", required=True, help="NLGDataModule keyword arguments, as our fit gets them")
    r.add_argument("--device", default="cuda", help="cpu: fp32 and torch AdamW, to smoke-test this script only")
    r.add_argument("--precision", default="bf16", choices=["bf16", "fp32"],
                   help="fp32: compute in fp32 without autocast (the training bf16 rounds; compare's --ref for both)")
    r.add_argument("--init", help="start from this adapter (another reference's DIR/init) instead of a seeded one")
    c = sub.add_parser("compare")
    c.add_argument("--ref", required=True)
    c.add_argument("--ours-logdir", help="our fit's TensorBoard folder (its train/loss per step)")
    c.add_argument("--ours-ref", help="or another `run`'s DIR (its losses; --ours-adapter DIR/final)")
    c.add_argument("--ours-adapter", required=True)
    c.add_argument("--loss-tol", type=float, default=0.02, help="bf16 tolerance on each step's loss (nats)")
    c.add_argument("--cosine-min", type=float, default=0.99, help="the adapter updates' cosine; with an fp32 "
                   "reference qlora_speed.py judges against the peer's own distance to it instead (against_fp32)")
    a = ap.parse_args()
    if a.command == "compare" and not (a.ours_logdir or a.ours_ref):
        ap.error("compare: --ours-logdir or --ours-ref")
    (run if a.command == "run" else compare)(a)


if __name__ == "__main__":
    sys.exit(main())
