"""A small SFT example built offline from the bundled plays: who answers, and how.

Each record is one exchange between two speakers of a play:

    {"prompt": "HELENA says:\\nO, were that all!--I think not on my father;\\n\\nHow does LAFEU reply?",
     "response": "Farewell, pretty lady: you must hold the credit of your father."}

The prompt quotes the first lines of a speech and names who speaks next; the response is the first
lines of that next speech. Deterministic (no randomness, no downloads); the splits follow the
corpus's play split (`llamax.data.corpus`), so no play is in both. `shakespeare_sft_records`
serves `DataConfig(train='shakespeare_sft')`; `write_sft_example` writes the same records as
JSONL (`python -m experiments.make_sft_example --out DIR`).

Preference pairs for DPO demos (`shakespeare_dpo_records`, `DataConfig(train='shakespeare_dpo')`)
take the same prompts: chosen is the true reply, rejected the same reply garbled (the words of
each line in reverse order): the same words, a preference for well-formed verse that a tiny model
can learn in a hundred steps.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

from llamax.data.corpus import Split, read_play, shakespeare_files

MAX_LINES = 2  # lines quoted from each speech: keeps a record within ~100 tokens
_SPEAKER = re.compile(r"^([A-Z][A-Z' ]*[A-Z])\.$")  # 'LAFEU.' / 'FIRST LORD.'
_DIRECTION = re.compile(r"\[[^\]]*\]")  # '[Exit COUNTESS.]', '[To HELENA.]'


def speeches(text: str) -> list[tuple[str, str] | None]:
    """(speaker, first lines of the speech) in order; None marks a scene change or an exit,
    where the next speech is no reply to the previous one."""
    result: list[tuple[str, str] | None] = []
    for paragraph in re.split(r"\n\s*\n", text):
        lines = [line.strip() for line in paragraph.strip().split("\n")]
        if not lines or not lines[0]:
            continue
        match = _SPEAKER.match(lines[0])
        if match is None:
            if lines[0].startswith(("ACT", "SCENE", "[Exit", "[Exeunt")):
                result.append(None)
            continue
        body = [_DIRECTION.sub("", line).strip() for line in lines[1:]]
        body = [line for line in body if line][:MAX_LINES]
        if body:
            result.append((match.group(1), "\n".join(body)))
    return result


def exchange_records(text: str) -> list[dict[str, str]]:
    """Prompt/response records for consecutive speeches by two different speakers."""
    records = []
    spoken = speeches(text)
    for previous, current in zip(spoken, spoken[1:]):
        if previous is None or current is None or previous[0] == current[0]:
            continue
        (speaker, said), (replier, reply) = previous, current
        records.append({"prompt": f"{speaker} says:\n{said}\n\nHow does {replier} reply?",
                        "response": reply})
    return records


def shakespeare_sft_records(split: Split) -> list[dict[str, str]]:
    """Every exchange of the split's plays, play by play in sorted order."""
    return [record for path in shakespeare_files(split)
            for record in exchange_records(read_play(path))]


def garble(reply: str) -> str:
    """The words of each line in reverse order."""
    return "\n".join(" ".join(reversed(line.split())) for line in reply.split("\n"))


def preference_records(text: str) -> list[dict[str, str]]:
    """{"prompt", "chosen", "rejected"} of one play: the true reply against its garbled self."""
    pairs = []
    for record in exchange_records(text):
        rejected = garble(record["response"])
        if rejected != record["response"]:  # a one-word reply reads the same backwards
            pairs.append({"prompt": record["prompt"], "chosen": record["response"], "rejected": rejected})
    return pairs


def shakespeare_dpo_records(split: Split) -> list[dict]:
    """Preference pairs of every play of the split (parsed, as the DPO loader reads them)."""
    from llamax.data.preference import parse_preference_record

    return [parse_preference_record(pair) for path in shakespeare_files(split)
            for pair in preference_records(read_play(path))]


def write_sft_example(out_dir: str | Path, preference: bool = False) -> dict[str, Path]:
    """Writes `{out_dir}/train.jsonl` and `{out_dir}/validation.jsonl` (prompt/response, or with
    `preference` prompt/chosen/rejected pairs); returns their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = {}
    for split in ("train", "validation"):
        path = out / f"{split}.jsonl"
        records = ([pair for play in shakespeare_files(split) for pair in preference_records(read_play(play))]
                   if preference else shakespeare_sft_records(split))
        with open(path, "w", encoding="utf-8") as f:
            for record in records:
                f.write(json.dumps(record) + "\n")
        written[split] = path
    return written
