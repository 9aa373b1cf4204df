"""Builds the offline lm-eval task data in configs/lm_eval/data/ from the bundled Shakespeare corpus.

    python -m experiments.lm_eval_tasks        # rewrites the JSONL files (deterministic)

The tasks (YAMLs in configs/lm_eval/, used with `--include_path configs/lm_eval`):

  shakespeare_mc   multiple choice: the next line of a speech from a held-out play, among four
                   lines of that play (acc, acc_norm)
  shakespeare_qa   generation + exact match: "In <play>, who says '<line>'?" over the training
                   plays (the knowledge a model trained on the corpus can have), 3-shot
  shakespeare_ppl  rolling loglikelihood of every scene of the held-out plays (word/byte
                   perplexity, bits per byte), windows exactly as lm-eval's hf backend cuts them

The committed files must equal what this script writes (tests/test_lm_eval_tasks.py checks).
"""
from __future__ import annotations

import json
import random
import re
import sys
from pathlib import Path

from llamax.data import corpus

DATA_DIR = Path(__file__).resolve().parent.parent / "configs" / "lm_eval" / "data"
MC_DOCS = 250
QA_DOCS, QA_FEWSHOT_DOCS = 200, 24
SEED = 1234

_SPEECH = re.compile(r"^([A-Z][A-Z '\-]*[A-Z])\.\n(.+)", re.S)  # "PROSPERO.\n<lines>"
_SCENE = re.compile(r"^SCENE\s+[0-9IVXL]+\b.*$", re.M)  # "SCENE 2." / "SCENE IV. A heath."
_ACT = re.compile(r"^ACT\s+[0-9IVXL]+\.?\s*$", re.M)


def play_title(text: str) -> str:
    """'THE TEMPEST' -> 'The Tempest' (the first line of a Gutenberg play)."""
    first = next(line for line in text.splitlines() if line.strip())
    return " ".join(word.capitalize() for word in first.split())


def speeches(text: str) -> list[tuple[str, list[str]]]:
    """(speaker, verse lines) of every speech: a paragraph that starts with 'NAME.' on its own
    line. Stage directions ([Exit], ...) are dropped from the lines."""
    found = []
    for paragraph in re.split(r"\n\s*\n", text):
        match = _SPEECH.match(paragraph.strip("\n"))
        if not match or match.group(1).startswith(("ACT", "SCENE")):
            continue
        lines = [line.strip() for line in match.group(2).splitlines()]
        lines = [line for line in lines if line and not line.startswith("[")]
        if lines:
            found.append((match.group(1), lines))
    return found


def _is_verse(line: str, min_words: int) -> bool:
    return len(line.split()) >= min_words and not line.startswith("[")


def multiple_choice_docs(rng: random.Random) -> list[dict]:
    """Next line of a speech among 4 lines of the same held-out play."""
    per_play = []
    for path in corpus.shakespeare_files("validation"):
        text = corpus.read_play(path)
        play = speeches(text)
        pool = sorted({line for _, lines in play for line in lines if _is_verse(line, 4)})
        candidates = [(speaker, lines) for speaker, lines in play
                      if len(lines) >= 3 and all(_is_verse(line, 4) for line in lines[:3])]
        per_play.append((play_title(text), pool, candidates))
    docs = []
    for index in range(MC_DOCS):
        title, pool, candidates = per_play[index % len(per_play)]
        speaker, lines = candidates.pop(rng.randrange(len(candidates)))
        answer = lines[2]
        distractors = rng.sample([line for line in pool if line != answer], 3)
        choices = [answer, *distractors]
        rng.shuffle(choices)
        docs.append({"play": title, "context": f"{speaker}.\n{lines[0]}\n{lines[1]}\n",
                     "choices": choices, "label": choices.index(answer)})
    return docs


def question_answer_docs(rng: random.Random) -> tuple[list[dict], list[dict]]:
    """(validation docs, few-shot docs): who speaks a line that occurs once in the training plays."""
    items, counts = [], {}
    for path in corpus.shakespeare_files("train"):
        text = corpus.read_play(path)
        title = play_title(text)
        for speaker, lines in speeches(text):
            counts[lines[0]] = counts.get(lines[0], 0) + 1
            if _is_verse(lines[0], 6) and '"' not in lines[0] and speaker not in ("ALL", "BOTH"):
                items.append({"play": title, "line": lines[0], "answer": speaker})
    items = [item for item in items if counts[item["line"]] == 1]
    chosen = rng.sample(items, QA_DOCS + QA_FEWSHOT_DOCS)
    return chosen[:QA_DOCS], chosen[QA_DOCS:]


def scene_docs() -> list[dict]:
    """Every scene of the held-out plays (the text from its SCENE heading to the next heading)."""
    docs = []
    for path in corpus.shakespeare_files("validation"):
        text = corpus.read_play(path)
        title = play_title(text)
        starts = [m.start() for m in _SCENE.finditer(text)]
        for begin, end in zip(starts, starts[1:] + [len(text)]):
            acts = [m.group(0).strip().rstrip(".") for m in _ACT.finditer(text, 0, begin)]
            next_act = _ACT.search(text, begin, end)  # a scene ends where the next act begins
            scene = text[begin:next_act.start() if next_act else end].strip("\n") + "\n"
            heading = scene.splitlines()[0].strip()
            docs.append({"play": title, "scene": f"{acts[-1]}, {heading}" if acts else heading,
                         "text": scene})
    return docs


def build(out_dir: Path = DATA_DIR) -> dict[str, Path]:
    """Writes every task file into `out_dir`; returns {file name: path}."""
    rng = random.Random(SEED)
    qa, qa_fewshot = question_answer_docs(rng)
    files = {"shakespeare_mc.jsonl": multiple_choice_docs(rng), "shakespeare_qa.jsonl": qa,
             "shakespeare_qa_fewshot.jsonl": qa_fewshot, "shakespeare_ppl.jsonl": scene_docs()}
    out_dir.mkdir(parents=True, exist_ok=True)
    written = {}
    for name, docs in files.items():
        path = out_dir / name
        path.write_text("".join(json.dumps(doc, ensure_ascii=False) + "\n" for doc in docs), encoding="utf-8")
        written[name] = path
    return written


def main(argv: list[str] | None = None) -> int:
    for name, path in build().items():
        print(f"{path}: {sum(1 for _ in open(path, encoding='utf-8'))} docs")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
