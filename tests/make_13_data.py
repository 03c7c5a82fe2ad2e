"""Builds lesson 13's course-written data, deterministically: `python -m tests.make_13_data` rewrites
data/13_facts.jsonl and data/13_preference_pairs.jsonl (then `python -m utils.data --update-checksums`).

The house style the lesson teaches: answer a question in ONE short sentence (at most 10 words, ending
with a full stop) that states the answer. A program checks it (`tests/test_reward_model.py` runs the checks below on the files).

* 13_facts.jsonl: simple questions the course wrote, each with a short model answer in the house style,
  the accepted answers (aliases) and a plausible wrong answer; split "train" / "heldout".
* 13_preference_pairs.jsonl: for each fact, pairs (prompt, chosen, rejected). chosen is always the short,
  correct answer; rejected is either the same answer drowned in filler ("long") or a short, wrong answer
  ("wrong"). Train facts give two "long" pairs and one "wrong" pair each, held-out facts one of each.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

DATA = Path(__file__).resolve().parent.parent / "data"
MAX_WORDS = 10  # the house style's limit

# (question, short answer in the house style, accepted answers, a wrong answer that replaces aliases[0])
FACTS = [
    ("What is the capital of France?", "The capital of France is Paris.", ["Paris"], "Lyon"),
    ("What is the capital of Japan?", "The capital of Japan is Tokyo.", ["Tokyo"], "Osaka"),
    ("What is the capital of Italy?", "The capital of Italy is Rome.", ["Rome"], "Milan"),
    ("What is the capital of Spain?", "The capital of Spain is Madrid.", ["Madrid"], "Seville"),
    ("What is the capital of Germany?", "The capital of Germany is Berlin.", ["Berlin"], "Munich"),
    ("What is the capital of Egypt?", "The capital of Egypt is Cairo.", ["Cairo"], "Alexandria"),
    ("What is the capital of Russia?", "The capital of Russia is Moscow.", ["Moscow"], "Kazan"),
    ("What is the capital of China?", "The capital of China is Beijing.", ["Beijing", "Peking"], "Shanghai"),
    ("What is the capital of England?", "The capital of England is London.", ["London"], "Leeds"),
    ("What is the capital of Canada?", "The capital of Canada is Ottawa.", ["Ottawa"], "Toronto"),
    ("What is the capital of Greece?", "The capital of Greece is Athens.", ["Athens"], "Patras"),
    ("What is the capital of Portugal?", "The capital of Portugal is Lisbon.", ["Lisbon"], "Porto"),
    ("What is the capital of Ireland?", "The capital of Ireland is Dublin.", ["Dublin"], "Cork"),
    ("What is the capital of Norway?", "The capital of Norway is Oslo.", ["Oslo"], "Bergen"),
    ("What is the capital of Austria?", "The capital of Austria is Vienna.", ["Vienna"], "Graz"),
    ("What is the capital of India?", "The capital of India is New Delhi.", ["New Delhi", "Delhi"], "Mumbai"),
    ("What is the capital of Kenya?", "The capital of Kenya is Nairobi.", ["Nairobi"], "Mombasa"),
    ("What is the capital of Mexico?", "The capital of Mexico is Mexico City.", ["Mexico City"], "Cancun"),
    ("What is the largest planet in the solar system?", "Jupiter is the largest planet.", ["Jupiter"], "Saturn"),
    ("Which planet is closest to the Sun?", "Mercury is closest to the Sun.", ["Mercury"], "Venus"),
    ("Which planet is known as the Red Planet?", "Mars is the Red Planet.", ["Mars"], "Venus"),
    ("What do bees make?", "Bees make honey.", ["honey"], "milk"),
    ("What gas do plants take in from the air?", "Plants take in carbon dioxide.", ["carbon dioxide", "CO2"],
     "helium"),
    ("What is the chemical symbol for gold?", "The chemical symbol for gold is Au.", ["Au"], "Ag"),
    ("What is the chemical formula of water?", "The formula of water is H2O.", ["H2O"], "CO2"),
    ("How many legs does a spider have?", "A spider has eight legs.", ["eight", "8"], "six"),
    ("How many legs does an insect have?", "An insect has six legs.", ["six", "6"], "ten"),
    ("How many days are there in a week?", "A week has seven days.", ["seven", "7"], "five"),
    ("How many months are there in a year?", "A year has twelve months.", ["twelve", "12"], "ten"),
    ("How many hours are there in a day?", "A day has 24 hours.", ["24", "twenty-four"], "20"),
    ("How many minutes are there in an hour?", "An hour has 60 minutes.", ["60", "sixty"], "100"),
    ("How many sides does a triangle have?", "A triangle has three sides.", ["three", "3"], "four"),
    ("How many sides does a hexagon have?", "A hexagon has six sides.", ["six", "6"], "eight"),
    ("How many continents are there?", "There are seven continents.", ["seven", "7"], "nine"),
    ("What colour is the sky on a clear day?", "The sky is blue.", ["blue"], "green"),
    ("What colour is grass?", "Grass is green.", ["green"], "purple"),
    ("What colour do you get by mixing blue and yellow?", "Blue and yellow make green.", ["green"], "red"),
    ("What colour are ripe bananas?", "Ripe bananas are yellow.", ["yellow"], "blue"),
    ("What is frozen water called?", "Frozen water is called ice.", ["ice"], "steam"),
    ("At what temperature in Celsius does water boil at sea level?", "Water boils at 100 degrees Celsius.",
     ["100"], "50"),
    ("At what temperature in Celsius does water freeze?", "Water freezes at 0 degrees Celsius.",
     ["0", "zero"], "10"),
    ("What is the largest ocean on Earth?", "The Pacific is the largest ocean.", ["Pacific"], "Atlantic"),
    ("What is the longest river in Africa?", "The Nile is the longest river in Africa.", ["Nile"], "Congo"),
    ("Which animal is known as the king of the jungle?", "The lion is the king of the jungle.", ["lion"],
     "zebra"),
    ("What is the largest mammal?", "The blue whale is the largest mammal.", ["blue whale", "whale"],
     "elephant"),
    ("What do cows drink?", "Cows drink water.", ["water"], "milk"),
    ("Who wrote Romeo and Juliet?", "Shakespeare wrote Romeo and Juliet.", ["Shakespeare"], "Dickens"),
    ("Who painted the Mona Lisa?", "Da Vinci painted the Mona Lisa.", ["Da Vinci", "Leonardo"], "Picasso"),
    ("Which language is spoken in Brazil?", "People in Brazil speak Portuguese.", ["Portuguese"], "Spanish"),
    ("What is the main language of Argentina?", "Argentina's main language is Spanish.", ["Spanish"], "French"),
    ("What is the opposite of hot?", "The opposite of hot is cold.", ["cold"], "warm"),
    ("What is the opposite of up?", "The opposite of up is down.", ["down"], "left"),
    ("What is the plural of mouse?", "The plural of mouse is mice.", ["mice"], "mouses"),
    ("Which organ pumps blood through the body?", "The heart pumps blood.", ["heart"], "liver"),
    ("How many bones does an adult human have?", "An adult human has 206 bones.", ["206"], "300"),
    ("What is the square root of 81?", "The square root of 81 is 9.", ["9", "nine"], "8"),
    ("What is 10 times 10?", "10 times 10 is 100.", ["100"], "1000"),
    ("What is half of 50?", "Half of 50 is 25.", ["25"], "20"),
]
NUMBER_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten",
                "eleven", "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen"]
N_SUMS = 32  # one-digit additions, generated below

# Filler a verbose assistant wraps around an answer: the "long" rejected responses.
FILLERS = [
    ("That is a great question, and I am happy to help. ", " I hope this helps!"),
    ("Thank you for asking! Let me think about it. ", " Many people find that interesting."),
    ("Sure! Here is a detailed answer to your question. ", " Let me know if you want more."),
    ("Certainly. It helps to start from the basics here. ", " I am glad you asked."),
]


def sums() -> list[tuple]:
    """One-digit additions 'What is a plus b?' with answers as digits or words, a fixed seeded sample."""
    rng = random.Random(13)
    pairs = sorted({(rng.randint(1, 9), rng.randint(1, 9)) for _ in range(200)})
    rows = []
    for a, b in rng.sample(pairs, N_SUMS):
        total = a + b
        wrong = total + rng.choice([-2, -1, 1, 2])
        rows.append((f"What is {a} plus {b}?", f"{a} plus {b} is {total}.", [str(total), NUMBER_WORDS[total]],
                     str(wrong)))
    return rows


def facts() -> list[dict]:
    rows = FACTS + sums()
    order = random.Random(0).sample(range(len(rows)), len(rows))  # shuffle, then a fixed held-out third
    out = []
    for rank, i in enumerate(order):
        question, short, aliases, wrong = rows[i]
        out.append({"id": f"f{rank + 1:02d}", "split": "heldout" if rank % 3 == 2 else "train",
                    "question": question, "short": short, "aliases": aliases, "wrong": wrong})
    return out


def wrong_answer(fact: dict) -> str:
    """The short answer with the accepted answer swapped for the wrong one: 'The capital of France is Lyon.'"""
    for alias in fact["aliases"]:
        if alias in fact["short"]:
            return fact["short"].replace(alias, fact["wrong"], 1)
    raise ValueError(f"{fact['id']}: no alias appears in the short answer {fact['short']!r}")


def preference_pairs(fact_rows: list[dict]) -> list[dict]:
    pairs = []
    for i, fact in enumerate(fact_rows):
        kinds = ["long", "long", "wrong"] if fact["split"] == "train" else ["long", "wrong"]
        for j, kind in enumerate(kinds):
            if kind == "long":
                before, after = FILLERS[(i + j) % len(FILLERS)]
                rejected = before + fact["short"] + after
            else:
                rejected = wrong_answer(fact)
            pairs.append({"id": f"p{len(pairs) + 1:03d}", "fact": fact["id"], "split": fact["split"],
                          "kind": kind, "prompt": fact["question"], "chosen": fact["short"],
                          "rejected": rejected})
    return pairs


def write_jsonl(name: str, rows: list[dict]) -> None:
    (DATA / name).write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


if __name__ == "__main__":
    fact_rows = facts()
    write_jsonl("13_facts.jsonl", fact_rows)
    write_jsonl("13_preference_pairs.jsonl", preference_pairs(fact_rows))
    print(f"{len(fact_rows)} facts, {len(preference_pairs(fact_rows))} pairs")
