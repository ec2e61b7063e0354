"""End-of-turn rate of a chat model's answers on held-out conversations (a benchmark, not a test).

    python benchmarks/chat_eot_rate.py --conversations ../shared/data/summarization/samsum/test.csv \
        [--task samsum-chat] [--adapter_path RUN/adapter] [--base_model checkpoints/smollm2-135m-instruct] \
        [--quantization auto] [--records 20] [--max_new_tokens 96]

Every assistant turn of the first `--records` conversations of the file (read as `--task` reads it) is
generated greedily from the conversation before it, rendered with the chat template exactly as `chat` and
`predict` render it (`ChatSession`: the reference answers stand in the history). An answer *ends its turn*
when generation stops at a stop token (EOS or the template's end-of-turn, `core.tokens.stop_token_ids`)
before `--max_new_tokens`; the end-of-turn rate is the fraction that do: a model that never learned where its
turn ends runs to the limit. Also reported per turn position: ROUGE-L F1 against the reference (percent) and
the exact-match rate. Prints one JSON object; base model and adapter are measured alike.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def measure(session, conversations: list[list[dict]], max_new_tokens: int) -> dict:
    """Generate every assistant turn of `conversations`; rates and scores per turn position."""
    import torch
    from torchmetrics.functional.text import rouge_score

    stops = set(session.stop)
    by_turn: dict[int, dict[str, list]] = {}
    default = session.system_prompt
    start = time.perf_counter()
    for messages in conversations:
        system = [m for m in messages[:1] if m["role"] == "system"]
        turns = messages[len(system):]
        session.system_prompt = system[0]["content"] if system else default
        for k in range(1, len(turns), 2):
            session.history = turns[:k - 1]
            ids = session.prompt_ids(turns[k - 1]["content"])
            with torch.no_grad():
                out = session.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                             max_new_tokens=max_new_tokens, eos_token_id=session.stop,
                                             pad_token_id=session.tokenizer.pad_token_id, use_cache=True)
            new = out[0, ids.shape[1]:].tolist()
            answer = session.tokenizer.decode(new, skip_special_tokens=True).strip()
            reference = turns[k]["content"]
            row = by_turn.setdefault(k // 2 + 1, {"ended": [], "rougeL": [], "exact": [], "tokens": [], "examples": []})
            row["ended"].append(bool(new) and new[-1] in stops)
            row["rougeL"].append(100 * float(rouge_score(answer, reference, rouge_keys="rougeL")["rougeL_fmeasure"]))
            row["exact"].append(answer == reference)
            row["tokens"].append(len(new))
            if len(row["examples"]) < 3:
                row["examples"].append({"reference": reference, "answer": answer})
    ended = [e for row in by_turn.values() for e in row["ended"]]
    return {
        "answers": len(ended),
        "end_of_turn_rate": sum(ended) / max(len(ended), 1),
        "seconds": round(time.perf_counter() - start, 1),
        "turns": {k: {"answers": len(row["ended"]), "end_of_turn_rate": sum(row["ended"]) / len(row["ended"]),
                      "rougeL": sum(row["rougeL"]) / len(row["rougeL"]),
                      "exact_match": sum(row["exact"]) / len(row["exact"]),
                      "mean_new_tokens": sum(row["tokens"]) / len(row["tokens"]), "examples": row["examples"]}
                  for k, row in by_turn.items()},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--conversations", required=True, help="held-out conversations (a file the task reads)")
    parser.add_argument("--task", default="samsum-chat")
    parser.add_argument("--base_model", default=str(ROOT / "checkpoints" / "smollm2-135m-instruct"))
    parser.add_argument("--adapter_path", default=None)
    parser.add_argument("--quantization", default="auto", help="auto: the adapter's (none for a base alone)")
    parser.add_argument("--records", type=int, default=20)
    parser.add_argument("--max_new_tokens", type=int, default=96)
    args = parser.parse_args()

    import torch

    from lightning_qpeft.chat import ChatModel, ChatSession, load_model, recorded_training
    from lightning_qpeft.data.chat_tokens import ChatOptions, check_template, use_chat_template
    from lightning_qpeft.data.sources import TaskSource

    torch.manual_seed(0)
    records = TaskSource(args.task, {"test": args.conversations}).load("test")
    conversations = records.select(range(min(args.records, len(records))))["messages"]
    spec = ChatModel(base_model=None if args.adapter_path else args.base_model, adapter_path=args.adapter_path,
                     quantization=args.quantization)
    model, tokenizer = load_model(spec)
    recorded = recorded_training(args.adapter_path)
    options = ChatOptions(system_prompt=recorded.get("system_prompt"), chat_template=recorded.get("chat_template"))
    use_chat_template(tokenizer, options.chat_template)
    check_template(tokenizer, options)
    session = ChatSession(model, tokenizer, options.system_prompt, args.max_new_tokens)
    result = {"model": args.adapter_path or args.base_model, "quantization": args.quantization,
              "conversations": args.conversations,
              "max_new_tokens": args.max_new_tokens, **measure(session, conversations, args.max_new_tokens)}
    print(json.dumps(result, indent=2, ensure_ascii=False))


if __name__ == "__main__":
    main()
