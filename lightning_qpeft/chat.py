"""`python -m lightning_qpeft chat`: talk to a base model or a trained adapter in the terminal.

    python -m lightning_qpeft chat --model.base_model checkpoints/smollm2-135m-instruct
    python -m lightning_qpeft chat --model.adapter_path RUN/adapter        # its base: the adapter's own
    python -m lightning_qpeft chat --model.adapter_path RUN/adapter --prompt "Who took part in it?"

Interactive (a terminal, or any stdin): each line is a user turn; the answer streams as it is generated; the
conversation is kept and rendered again with the chat template every turn. `/reset` forgets it, `/exit` (or
the end of input, Ctrl-D) ends the session, Ctrl-C stops an answer, which is then not kept.
`--prompt TEXT`: one user turn, and the answer alone on stdout (loading messages go to stderr), for scripts.

Rendering is training's (`data/chat_tokens.py`): the tokenizer's chat template, or `--chat_template`; an
adapter trained with `data.chat_template` or `data.system_prompt` brings them in its `qpeft_training.json`,
so it is spoken to as it was trained. Generation stops at EOS and at the template's end-of-turn token
(`core.tokens.stop_token_ids`). A conversation that outgrows the model's context drops its oldest exchanges
(the system prompt stays).
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, TextIO

import torch

from lightning_qpeft.core.errors import ConfigError
from lightning_qpeft.core.tokens import stop_token_ids
from lightning_qpeft.data.chat_tokens import ChatOptions, ConversationTokenizer, check_template, use_chat_template
from lightning_qpeft.model.adapters import TRAINING_FILE

COMMANDS_HELP = "/reset forgets the conversation, /exit ends it"


@dataclass
class ChatModel:
    """The model to talk to.

    Args:
        base_model: hub id or folder of the base; default: the adapter's base (its adapter_config.json).
        adapter_path: a trained adapter folder (`<run>/adapter`), or the folder of a fully fine-tuned model.
        tokenizer: tokenizer folder or hub id, when it is not the base model's.
        quantization: `auto`: the quantization the adapter was trained on (its qpeft_training.json; none
            without one); or none, nf4, nf4-dq, fp4, int8 (`model/quantization.py`).
        dtype: dtype of the weights (and of the quantized layers' matmuls): auto is bfloat16 on a GPU,
            float32 on the CPU.
        device: auto (the GPU when there is one, else the CPU), cpu, cuda, cuda:1, ...
        trust_remote_code: allow the model folder's own Python code to run.
    """

    base_model: Optional[str] = None
    adapter_path: Optional[str] = None
    tokenizer: Optional[str] = None
    quantization: str = "auto"
    dtype: str = "auto"
    device: str = "auto"
    trust_remote_code: bool = False


def recorded_training(adapter_path: Optional[str]) -> dict[str, Any]:
    """The adapter folder's `qpeft_training.json` ({} when there is none)."""
    path = Path(adapter_path) / TRAINING_FILE if adapter_path else None
    if path is None or not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError("chat --model.adapter_path", f"{path} is not valid JSON ({e})") from None


def load_model(spec: ChatModel) -> tuple[torch.nn.Module, Any]:
    """The model (base, with the adapter when one is given) in eval mode, and its tokenizer."""
    from lightning_qpeft.base_models.tokenizer import load_tokenizer
    from lightning_qpeft.model.adapters import load_adapter_config
    from lightning_qpeft.model.loading import load_base_model

    adapter = spec.adapter_path
    full = adapter is not None and (Path(adapter) / "config.json").exists() and \
        not (Path(adapter) / "adapter_config.json").exists()
    recorded = recorded_training(adapter)
    if full:  # full fine-tuning exports a whole model folder
        base, adapter = adapter, None
    elif spec.base_model:
        base = spec.base_model
    elif adapter:
        base = load_adapter_config(adapter).base_model_name_or_path or recorded.get("base_model")
    else:
        base = None
    if not base:
        raise ConfigError("chat --model.base_model", "no model to talk to", "give --model.base_model (a folder or "
                          "hub id), or --model.adapter_path of a trained adapter")
    quantization = recorded.get("quantization", "none") if spec.quantization == "auto" else spec.quantization
    device = spec.device if spec.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = spec.dtype if spec.dtype != "auto" else ("bfloat16" if device.startswith("cuda") else "float32")
    model = load_base_model(base, quantization=quantization, compute_dtype=dtype, dtype=dtype, device=device,
                            trust_remote_code=spec.trust_remote_code)
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter)
    model.eval()
    tokenizer = load_tokenizer(spec.tokenizer or base, spec.trust_remote_code)
    return model, tokenizer


class ChatSession:
    """A conversation with a model: the history, rendered with the chat template for every answer.

    Args:
        model: a causal LM (a peft model too).
        tokenizer: its tokenizer, with the chat template to render with.
        system_prompt: the system turn (None: the template's default, if it has one).
        max_new_tokens: longest answer.
        temperature: 0: greedy; above 0: sampling at this temperature.
        top_p: nucleus sampling (with temperature > 0).
    """

    def __init__(self, model: torch.nn.Module, tokenizer: Any, system_prompt: Optional[str] = None,
                 max_new_tokens: int = 256, temperature: float = 0.0, top_p: float = 1.0) -> None:
        self.model, self.tokenizer = model, tokenizer
        self.system_prompt = system_prompt
        self.max_new_tokens, self.temperature, self.top_p = max_new_tokens, temperature, top_p
        self.history: list[dict[str, str]] = []
        self.stop = stop_token_ids(tokenizer)
        self.renderer = ConversationTokenizer(tokenizer, ChatOptions(system_prompt=system_prompt), False)
        config = getattr(model, "config", None)
        self.context = getattr(config, "max_position_embeddings", None) or 2048

    def messages(self, user: str) -> list[dict[str, str]]:
        system = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
        return system + self.history + [{"role": "user", "content": user}]

    def prompt_ids(self, user: str) -> torch.Tensor:
        """(1, T): the conversation and the new user turn, with the generation prompt, within the context."""
        ids, _ = self.renderer.prompt(self.messages(user), max(self.context - self.max_new_tokens, 1))
        return torch.tensor([ids], dtype=torch.long)

    @torch.no_grad()
    def reply(self, user: str, streamer: Any = None) -> str:
        """The model's answer to `user` (kept in the history), streamed to `streamer` as it is generated."""
        ids = self.prompt_ids(user)
        device = next(self.model.parameters()).device
        sampling = (dict(do_sample=True, temperature=self.temperature, top_p=self.top_p) if self.temperature > 0
                    else dict(do_sample=False))
        out = self.model.generate(
            input_ids=ids.to(device), attention_mask=torch.ones_like(ids).to(device), use_cache=True,
            max_new_tokens=self.max_new_tokens, eos_token_id=self.stop, pad_token_id=self.tokenizer.pad_token_id,
            streamer=streamer, **sampling)
        answer = self.tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()
        self.history += [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]
        return answer

    def reset(self) -> None:
        self.history = []


def interact(session: ChatSession, out: TextIO = sys.stdout) -> None:
    """Read user turns from stdin until /exit or the end of input; stream each answer to `out`."""
    from transformers import TextStreamer

    if sys.stdin.isatty():
        try:
            import readline  # noqa: F401  (line editing and history for input())
        except ImportError:
            pass
    while True:
        try:
            line = input("user> ").strip()
        except (EOFError, KeyboardInterrupt):
            print(file=out)
            return
        if not line:
            continue
        if line == "/exit":
            return
        if line == "/reset":
            session.reset()
            print("(conversation cleared)", file=out, flush=True)
            continue
        if line.startswith("/"):
            print(f"(unknown command {line}: {COMMANDS_HELP})", file=out, flush=True)
            continue
        print("assistant> ", end="", file=out, flush=True)
        try:
            session.reply(line, streamer=TextStreamer(session.tokenizer, skip_prompt=True, skip_special_tokens=True))
        except KeyboardInterrupt:
            print("\n(stopped; this answer is not kept)", file=out, flush=True)


def chat(model: ChatModel, prompt: Optional[str] = None, system_prompt: Optional[str] = None,
         chat_template: Optional[str] = None, max_new_tokens: int = 256, temperature: float = 0.0,
         top_p: float = 1.0, seed: int = 0) -> Optional[str]:
    """Talk to a model: interactively, or answer one `prompt`.

    Args:
        model: the model (base, adapter, quantization, device).
        prompt: answer this one user turn, print the answer alone and exit (for scripts).
        system_prompt: the system turn; default: the one the adapter was trained with, else the template's.
        chat_template: chatml, a Jinja file or Jinja text; default: the one the adapter was trained with, else
            the tokenizer's own.
        max_new_tokens: longest answer.
        temperature: 0 (default): greedy decoding; above 0: sampling.
        top_p: nucleus sampling, with temperature > 0.
        seed: sampling seed.
    """
    if max_new_tokens < 1:
        raise ConfigError("chat --max_new_tokens", str(max_new_tokens), "give at least 1")
    if temperature < 0:
        raise ConfigError("chat --temperature", str(temperature), "give 0 (greedy) or more")
    recorded = recorded_training(model.adapter_path)
    options = ChatOptions(system_prompt=system_prompt or recorded.get("system_prompt"),
                          chat_template=chat_template or recorded.get("chat_template"))
    print(f"loading {model.adapter_path or model.base_model} ...", file=sys.stderr, flush=True)
    net, tokenizer = load_model(model)
    use_chat_template(tokenizer, options.chat_template, "chat --chat_template")
    check_template(tokenizer, options, "chat --chat_template")
    torch.manual_seed(seed)
    session = ChatSession(net, tokenizer, options.system_prompt, max_new_tokens, temperature, top_p)
    if prompt is not None:
        answer = session.reply(prompt)
        print(answer, flush=True)
        return answer
    print(f"ready ({COMMANDS_HELP})", file=sys.stderr, flush=True)
    interact(session)
    return None


def main(argv: Optional[list[str]] = None) -> None:
    from jsonargparse import CLI

    CLI(chat, args=argv, as_positional=False)


if __name__ == "__main__":
    main()
