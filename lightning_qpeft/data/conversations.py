"""Conversation records: the layouts turns come in, and the checks every conversation passes.

Layouts, recognised by their columns for every task that reads files or the hub (`sources.GENERIC`):
    messages:    `messages`: [{role, content}] (transformers' chat templates, TRL); an optional `system` column;
                 in CSV/TSV files (and any text column) the turns are JSON text
    sharegpt:    `conversations`: [{from, value}] with roles human / gpt / system; an optional `system` column
    oasst table: OASST1's message table (`message_id`, `parent_id`, `role`, `text`, `rank`; the hub's
                 OpenAssistant/oasst1), one conversation a message tree
    oasst trees: OASST1's tree export (`message_tree_id`, `prompt` holding nested `replies`), one a tree
and, as task `samsum-chat`, SAMSum's dialogue/summary turned into a two-exchange conversation (summarize the
chat; who took part in it: the speakers, read from the dialogue).

Roles: system, user (also human, prompter) and assistant (also gpt). An OASST tree becomes the path of its
top-ranked replies (rank 0 at every level), as Guanaco was built: one conversation per path to a leaf would
train a tree's first answer once per leaf (ten times for a tree with ten leaves) and train on replies the
reviewers ranked lower. A path's unanswered last prompt is dropped, and so are trees without an answer.

A valid conversation: at most one system turn, first; then user and assistant turns alternating, starting with
user; every content non-empty text; at least one assistant turn; and, for training and evaluation, an
assistant turn last (the target evaluation scores). A `predict` record may end with a user turn: the model
answers it. The system prompt comes from the record (a system turn or the `system` column; both at once are
refused) or from `data.system_prompt` when the record has none (`chat_tokens.py`).

The canonical record of a conversation: `messages` ([{role, content}], roles canonical) besides the
canonical columns of `sources.CANONICAL`: `output` is the last assistant turn's content (the reference of the
generation metrics), `instruction` and `input` are empty.
"""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import dataclass
from typing import Any, Callable, Optional

import datasets

from lightning_qpeft.core.data_error import DataError

ROLES = {"system": "system", "user": "user", "human": "user", "prompter": "user", "assistant": "assistant",
         "gpt": "assistant"}
MESSAGES_COLUMN = "messages"


@dataclass(frozen=True)
class ConversationLayout:
    """A column layout whose records are conversations.

    Attributes:
        name: for messages.
        columns: source columns that must all be present.
        turns: batch -> one raw turn list a record (each turn a dict with `role_key` and `content_key`).
        role_key: the key of a turn's role.
        content_key: the key of a turn's content.
        system: the column of a record-level system prompt, used when present.
        prepare: whole dataset -> dataset with a `turns` and a `row` column, for layouts whose conversations
            span several rows (OASST's message table).
        oasst: a message-tree path: an unanswered last prompt is dropped, a tree without an answer skipped.
        crlf: turn CRLF line breaks into LF.
        template: the prompt template the layout implies (always the chat template).
    """

    name: str
    columns: tuple[str, ...]
    turns: Callable[[dict[str, list]], list]
    role_key: str = "role"
    content_key: str = "content"
    system: Optional[str] = "system"
    prepare: Optional[Callable[[datasets.Dataset], datasets.Dataset]] = None
    oasst: bool = False
    crlf: bool = False
    template: str = "chat"

    def fits(self, columns: set[str], need_output: bool) -> bool:
        return all(c in columns for c in self.columns)

    def canonicalise(self, ds: datasets.Dataset, origin: str, word: str, need_output: bool) -> datasets.Dataset:
        """Raw records -> canonical conversation records (`CONVERSATION_COLUMNS`), as a batched map."""
        if self.prepare is not None:
            ds = self.prepare(ds)
        return ds.map(_canonical_batch, batched=True, with_indices=True, remove_columns=ds.column_names,
                      fn_kwargs=dict(layout=self, origin=origin, word=word, need_output=need_output),
                      desc="canonicalise conversations")


CONVERSATION_COLUMNS = ("instruction", "input", "output", "references", "row", MESSAGES_COLUMN)


def normalise(turns: Any, where: str, need_output: bool, role_key: str = "role", content_key: str = "content",
              system: Any = None) -> list[dict[str, str]]:
    """One record's raw turns -> checked messages [{role, content}] with canonical roles.

    Args:
        turns: the record's turn list.
        where: `file: line N` (or record N) for messages.
        need_output: the conversation must end with an assistant turn (training and evaluation records).
        role_key: the key of a turn's role.
        content_key: the key of a turn's content.
        system: a record-level system prompt (None or '': none).

    Raises:
        DataError: no turns, an unknown role, roles out of order, empty content, no assistant turn.
    """
    if isinstance(turns, str):  # a CSV/TSV column (or a string column anywhere) holding the turns as JSON
        try:
            turns = json.loads(turns)
        except json.JSONDecodeError as e:
            raise DataError(f"{where}: the turns are text but not JSON ({e.msg} at character {e.pos})") from None
    if not isinstance(turns, list) or not turns:
        raise DataError(f"{where}: no turns (got {turns!r}); a conversation is a list of {{{role_key}, "
                        f"{content_key}}} turns")
    messages = []
    for k, turn in enumerate(turns, 1):
        if not isinstance(turn, dict):
            raise DataError(f"{where}: turn {k} is not an object with '{role_key}' and '{content_key}' (got {turn!r})")
        raw, content = turn.get(role_key), turn.get(content_key)
        role = ROLES.get(raw.strip().lower()) if isinstance(raw, str) else None
        if role is None:
            raise DataError(f"{where}: turn {k} has {role_key} {raw!r}, which is not a known role (known: "
                            f"{', '.join(ROLES)}); rename it in the file, or remove the turn")
        if not isinstance(content, str) or not content.strip():
            raise DataError(f"{where}: turn {k} ({raw}) has no content (got {content!r}); remove the turn or the "
                            "record: an empty turn would train the model to answer nothing")
        messages.append({"role": role, "content": content})
    if system is not None and not isinstance(system, str):
        raise DataError(f"{where}: 'system' is not text (got {system!r})")
    if system and system.strip():
        if messages[0]["role"] == "system":
            raise DataError(f"{where}: two system prompts, the 'system' field and a system turn; keep one")
        messages.insert(0, {"role": "system", "content": system})
    _check_order(messages, where, need_output)
    return messages


def _check_order(messages: list[dict[str, str]], where: str, need_output: bool) -> None:
    start = 1 if messages[0]["role"] == "system" else 0
    expected = "user"
    for k in range(start, len(messages)):
        role = messages[k]["role"]
        if role != expected:
            place = f"follows a {messages[k - 1]['role']} turn" if k > start else "opens the conversation"
            if role == "system":
                raise DataError(f"{where}: turn {k + 1} (system) {place}; a system prompt comes first, once")
            raise DataError(f"{where}: turn {k + 1} ({role}) {place}: user and assistant turns must alternate, "
                            "starting with user (merge or remove the extra turn)")
        expected = "assistant" if role == "user" else "user"
    if len(messages) == start:
        raise DataError(f"{where}: only a system prompt, no user turn")
    if need_output:
        if not any(m["role"] == "assistant" for m in messages):
            raise DataError(f"{where}: no assistant turn: nothing to train on or to score against; add the answer "
                            "or remove the record")
        if messages[-1]["role"] != "assistant":
            raise DataError(f"{where}: ends with a user turn that no assistant turn answers; add the answer or "
                            "remove the last turn")


def _canonical_batch(batch: dict[str, list], indices: list[int], layout: ConversationLayout, origin: str,
                     word: str, need_output: bool) -> dict[str, list]:
    raw = layout.turns(batch)
    rows = batch["row"] if "row" in batch and layout.prepare is not None else [i + 1 for i in indices]
    systems = batch[layout.system] if layout.system and layout.system in batch else [None] * len(raw)
    out: dict[str, list] = {k: [] for k in CONVERSATION_COLUMNS}
    for turns, row, system in zip(raw, rows, systems):
        where = f"{origin}: {word} {row}"
        if layout.crlf and isinstance(turns, list):
            turns = [{k: v.replace("\r\n", "\n") if isinstance(v, str) else v for k, v in t.items()} for t in turns]
        if layout.oasst:
            turns = _answered(turns)
            if not turns:
                continue  # a tree nobody answered
        messages = normalise(turns, where, need_output, layout.role_key, layout.content_key, system)
        answer = messages[-1]["content"] if messages[-1]["role"] == "assistant" else None
        out["instruction"].append("")
        out["input"].append("")
        out["output"].append(answer or "")
        out["references"].append([answer] if answer else [])
        out["row"].append(row)
        out[MESSAGES_COLUMN].append(messages)
    return out


def _answered(turns: list[dict]) -> list[dict]:
    """An OASST path without its unanswered last prompts ([] when no answer is left)."""
    end = len(turns)
    while end and ROLES.get(str(turns[end - 1].get("role")).lower()) != "assistant":
        end -= 1
    return turns[:end]


# ---------------------------------------------------------------------------------------------- layouts
def _column(name: str) -> Callable[[dict[str, list]], list]:
    return lambda batch: batch[name]


def _top_rank(nodes: list[tuple[Any, int]]) -> int:
    """The index of the best-ranked of (rank, position) pairs: rank 0 first, unranked last, then file order."""
    return min(range(len(nodes)), key=lambda i: (nodes[i][0] is None, nodes[i][0] or 0, nodes[i][1]))


def _oasst_table(ds: datasets.Dataset) -> datasets.Dataset:
    """OASST1's message table -> one row a tree: the top-ranked path from its root prompt, and the root's row."""
    keep = [c for c in ("message_id", "parent_id", "rank", "deleted", "role", "text") if c in ds.column_names]
    table = ds.select_columns(keep).to_dict()
    ids, parents = table["message_id"], table["parent_id"]
    ranks = table.get("rank", [None] * len(ids))
    deleted = table.get("deleted", [False] * len(ids))
    children: dict[Any, list[int]] = defaultdict(list)
    roots = []
    for i, parent in enumerate(parents):
        if deleted[i]:
            continue
        (children[parent] if parent else roots).append(i)
    turns, rows = [], []
    for root in roots:
        path = [root]
        while children.get(ids[path[-1]]):
            kids = children[ids[path[-1]]]
            path.append(kids[_top_rank([(ranks[i], i) for i in kids])])
        turns.append([{"role": table["role"][i], "content": table["text"][i]} for i in path])
        rows.append(root + 1)
    return datasets.Dataset.from_dict({"turns": turns, "row": rows})


def _oasst_trees(batch: dict[str, list]) -> list:
    paths = []
    for node in batch["prompt"]:
        path = []
        while isinstance(node, dict):
            path.append({"role": node.get("role"), "content": node.get("text")})
            replies = [r for r in (node.get("replies") or []) if isinstance(r, dict) and not r.get("deleted")]
            node = replies[_top_rank([(r.get("rank"), i) for i, r in enumerate(replies)])] if replies else None
        paths.append(path)
    return paths


def speakers(dialogue: str) -> list[str]:
    """The speakers of a `Name: text` chat, in order of their first line."""
    names: list[str] = []
    for line in dialogue.splitlines():
        name = line.split(":", 1)[0].strip() if ":" in line else ""
        if name and len(name) <= 40 and name not in names:
            names.append(name)
    return names


def _who(names: list[str]) -> str:
    if len(names) == 1:
        return f"Only {names[0]}."
    return f"{', '.join(names[:-1])} and {names[-1]}."


SAMSUM_SUMMARY_ASK = "Summarize this chat.\n\n{dialogue}"
SAMSUM_WHO_ASK = "Who took part in it?"


def _samsum_chat(batch: dict[str, list]) -> list:
    """SAMSum dialogue/summary -> [user: summarize, assistant: summary, user: who took part, assistant: names]."""
    conversations = []
    for dialogue, summary in zip(batch["dialogue"], batch["summary"]):
        dialogue = dialogue.replace("\r\n", "\n") if isinstance(dialogue, str) else dialogue
        summary = summary.strip() if isinstance(summary, str) else summary
        turns = [{"role": "user", "content": SAMSUM_SUMMARY_ASK.format(dialogue=dialogue)
                  if isinstance(dialogue, str) and dialogue.strip() else dialogue},
                 {"role": "assistant", "content": summary}]
        names = speakers(dialogue) if isinstance(dialogue, str) else []
        if names:
            turns += [{"role": "user", "content": SAMSUM_WHO_ASK}, {"role": "assistant", "content": _who(names)}]
        conversations.append(turns)
    return conversations


MESSAGES = ConversationLayout("messages [{role, content}]", (MESSAGES_COLUMN,), _column(MESSAGES_COLUMN))
SHAREGPT = ConversationLayout("sharegpt conversations [{from, value}]", ("conversations",),
                              _column("conversations"), role_key="from", content_key="value")
OASST_TABLE = ConversationLayout("oasst message table", ("message_id", "parent_id", "role", "text"),
                                 _column("turns"), system=None, prepare=_oasst_table, oasst=True)
OASST_TREES = ConversationLayout("oasst trees", ("message_tree_id", "prompt"), _oasst_trees, system=None, oasst=True)
SAMSUM_CHAT = ConversationLayout("dialogue/summary as a conversation", ("dialogue", "summary"), _samsum_chat,
                                 system=None)
CONVERSATIONS = (MESSAGES, SHAREGPT, OASST_TABLE, OASST_TREES)


def is_conversation(ds: Optional[datasets.Dataset]) -> bool:
    """Whether canonical records carry turns (`messages`)."""
    return ds is not None and MESSAGES_COLUMN in ds.column_names
