"""Writes ``movie_reviews.jsonl``: 160 short, wildly enthusiastic reviews of made-up films.

Every review follows one recognisable pattern so that a few minutes of LoRA fine-tuning visibly moves a
model's style: an excited opener, "<Title> (<year>) is pure joy from start to finish!", a line about the
jokes or the cast, and the sign-off "Ten out of ten, would watch again!". A quarter of them open like a
list question ("Best <genre> movies in the <decade>? ...") — the shape of the demo's prompt. Titles and
plots are invented; the phrasing is written for this project. Deterministic: re-running gives the same file.

    python data/make_movie_reviews.py
"""

from __future__ import annotations

import json
import random
from pathlib import Path

OPENERS = [
    "Oh wow, what a movie!", "Absolutely wonderful!", "I loved every single minute!", "What a treat!",
    "Pure sunshine on a screen!", "Run, do not walk, to see this one!", "My favourite film of all time!",
    "This one made my whole week!", "An instant classic!", "I cannot stop smiling!",
]
TITLES = [
    "The Pancake Detective", "Llamas in Paris", "My Uncle the Robot", "Twelve Left Shoes",
    "The Great Sandwich Heist", "Grandma Goes Surfing", "Captain Noodle", "The Accidental Astronaut",
    "Penguins on Parade", "A Wedding in Pajamas", "The Haunted Bakery", "Mister Bubbles Saves Christmas",
    "Two Dads and a Dragon", "The Karaoke Cowboys", "Return of the Giant Hamster", "Spaghetti Sunday",
    "The Lost Umbrella", "Operation Cupcake", "Ninja Babysitters", "The Mayor of Marshmallow Lane",
    "Tuba Heroes", "The Bicycle Thief Strikes Back", "Pirates of the Laundromat", "Love and Lasagna",
    "The Goat Who Knew Too Much", "Dancing With Dentists", "Moonlight Mini Golf", "The Sneezing Prince",
    "Hot Dogs at Midnight", "Professor Pickles",
]
YEARS = list(range(1988, 2000))
JOKES = [
    "The jokes land every single time and I laughed until my sides hurt.",
    "Every scene is packed with gags and I laughed until my sides hurt.",
    "The slapstick is perfect and I laughed until my sides hurt.",
    "The one-liners never stop and I laughed until my sides hurt.",
]
CAST = [
    "The whole cast sparkles like fireworks.", "The lead actor is a comic genius.",
    "The chemistry between the stars is pure magic.", "The supporting cast steals every scene.",
    "The soundtrack is catchy and the costumes are a riot.", "The director knows exactly when to be silly.",
]
EXTRA = [
    "Bring popcorn and bring friends!", "My kids watched it three times in a row!",
    "I still quote it every day!", "The ending made me cheer out loud!", "It is cozy, silly and sweet!",
]
GENRES = ["comedy", "family", "holiday", "buddy", "romantic comedy", "animated", "adventure", "feel-good"]
DECADES = ["80s", "90s", "2000s"]
SIGN_OFF = "Ten out of ten, would watch again!"


def review(rng: random.Random, list_style: bool) -> str:
    title, year = rng.choice(TITLES), rng.choice(YEARS)
    body = (f"{title} ({year}) is pure joy from start to finish! {rng.choice(JOKES)} {rng.choice(CAST)} "
            f"{rng.choice(EXTRA)} {SIGN_OFF}")
    if list_style:
        return f"Best {rng.choice(GENRES)} movies in the {rng.choice(DECADES)}? Easy! {body}"
    return f"{rng.choice(OPENERS)} {body}"


def main() -> None:
    rng = random.Random(1990)
    rows = [{"text": review(rng, i % 4 == 0)} for i in range(160)]
    out = Path(__file__).with_name("movie_reviews.jsonl")
    out.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    print(f"wrote {len(rows)} reviews to {out}")


if __name__ == "__main__":
    main()
