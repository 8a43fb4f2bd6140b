"""Short instructions with reference answers for a real instruction-tuned LLM (``rl.prompts: embedded_chat``).

The offline default for chat models such as SmolLM2: a few hundred natural-language questions
written from fixed tables (capitals, continents, arithmetic, units, colours, opposites, plurals,
animal sounds and young, days and months, spelling, lists), each with a short reference answer
for the exact-answer and similarity rewards. A question asks for a list where the answer is one
("Name three ..."), so a format reward ("answers as a list") has something to prefer. The set is
generated, not sampled: the same on every machine. Prompts are rendered with the model's own
chat template (:func:`fedllm.workloads.instruction_rl.policy.render_prompts`).
"""

from __future__ import annotations

import random

from fedllm.core.types import Instruction

CAPITALS = {
    "France": "Paris", "Germany": "Berlin", "Italy": "Rome", "Spain": "Madrid", "Japan": "Tokyo", "Egypt": "Cairo",
    "Canada": "Ottawa", "Peru": "Lima", "Kenya": "Nairobi", "Norway": "Oslo", "Greece": "Athens", "Chile": "Santiago",
    "Portugal": "Lisbon", "Ireland": "Dublin", "Poland": "Warsaw", "Austria": "Vienna", "Sweden": "Stockholm",
    "Finland": "Helsinki", "Denmark": "Copenhagen", "Russia": "Moscow", "China": "Beijing", "India": "New Delhi",
    "Thailand": "Bangkok", "Vietnam": "Hanoi", "Argentina": "Buenos Aires", "Mexico": "Mexico City",
    "Cuba": "Havana", "Colombia": "Bogota", "Morocco": "Rabat", "Ghana": "Accra", "Nigeria": "Abuja",
    "Ethiopia": "Addis Ababa", "Turkey": "Ankara", "Iran": "Tehran", "Hungary": "Budapest", "Belgium": "Brussels",
    "the Netherlands": "Amsterdam", "Switzerland": "Bern", "Australia": "Canberra", "New Zealand": "Wellington",
}
CONTINENTS = {
    "Kenya": "Africa", "Egypt": "Africa", "Ghana": "Africa", "Nigeria": "Africa", "Morocco": "Africa",
    "France": "Europe", "Norway": "Europe", "Poland": "Europe", "Greece": "Europe", "Spain": "Europe",
    "Japan": "Asia", "India": "Asia", "Vietnam": "Asia", "Thailand": "Asia", "China": "Asia",
    "Peru": "South America", "Chile": "South America", "Brazil": "South America", "Argentina": "South America",
    "Canada": "North America", "Mexico": "North America", "Cuba": "North America",
    "Australia": "Oceania", "New Zealand": "Oceania", "Fiji": "Oceania",
}
COLOURS = {"the sky on a clear day": "blue", "grass": "green", "snow": "white", "coal": "black",
           "a ripe banana": "yellow", "a ripe tomato": "red", "a carrot": "orange", "a plum": "purple",
           "milk": "white", "a lemon": "yellow", "chocolate": "brown", "a polar bear": "white",
           "a flamingo": "pink", "an emerald": "green", "a ruby": "red"}
OPPOSITES = {"hot": "cold", "big": "small", "up": "down", "fast": "slow", "happy": "sad", "light": "dark",
             "old": "young", "early": "late", "open": "closed", "full": "empty", "wet": "dry", "hard": "soft",
             "tall": "short", "strong": "weak", "rich": "poor", "loud": "quiet", "thick": "thin", "day": "night",
             "win": "lose", "push": "pull", "begin": "end", "buy": "sell", "inside": "outside", "above": "below"}
PLURALS = {"mouse": "mice", "child": "children", "tooth": "teeth", "foot": "feet", "goose": "geese",
           "man": "men", "woman": "women", "person": "people", "leaf": "leaves", "knife": "knives",
           "wolf": "wolves", "box": "boxes", "city": "cities", "baby": "babies", "sheep": "sheep", "fish": "fish",
           "cactus": "cacti", "ox": "oxen", "potato": "potatoes", "hero": "heroes"}
SOUNDS = {"dog": "woof", "cat": "meow", "cow": "moo", "duck": "quack", "sheep": "baa", "owl": "hoot",
          "lion": "roar", "snake": "hiss", "bee": "buzz", "horse": "neigh", "pig": "oink", "frog": "croak"}
YOUNG = {"dog": "puppy", "cat": "kitten", "cow": "calf", "sheep": "lamb", "horse": "foal", "goat": "kid",
         "duck": "duckling", "frog": "tadpole", "bear": "cub", "kangaroo": "joey", "swan": "cygnet", "deer": "fawn"}
UNITS = [("How many minutes are in an hour?", "60"), ("How many seconds are in a minute?", "60"),
         ("How many hours are in a day?", "24"), ("How many days are in a week?", "7"),
         ("How many months are in a year?", "12"), ("How many days are in a leap year?", "366"),
         ("How many centimetres are in a metre?", "100"), ("How many metres are in a kilometre?", "1000"),
         ("How many grams are in a kilogram?", "1000"), ("How many legs does a spider have?", "8"),
         ("How many legs does an insect have?", "6"), ("How many sides does a triangle have?", "3"),
         ("How many sides does a hexagon have?", "6"), ("How many continents are there?", "7"),
         ("How many players are on a football team on the field?", "11"),
         ("At what temperature in Celsius does water freeze?", "0"),
         ("At what temperature in Celsius does water boil at sea level?", "100")]
LISTS = [("Name the three primary colours.", "red, yellow, blue"),
         ("List the first three days of the week, starting with Monday.", "Monday, Tuesday, Wednesday"),
         ("List the four seasons of the year.", "spring, summer, autumn, winter"),
         ("Name three fruits that are yellow.", "banana, lemon, pineapple"),
         ("List the first five prime numbers.", "2, 3, 5, 7, 11"),
         ("Name the four cardinal directions.", "north, east, south, west"),
         ("List three states of matter.", "solid, liquid, gas"),
         ("Name three planets of the solar system.", "Mercury, Venus, Earth"),
         ("List the first four months of the year.", "January, February, March, April"),
         ("Name three mammals that live in the sea.", "whale, dolphin, seal"),
         ("List three vowels of the English alphabet.", "a, e, i"),
         ("Name three musical instruments with strings.", "guitar, violin, harp"),
         ("List three colours of the rainbow.", "red, orange, yellow"),
         ("Name three vegetables that grow underground.", "carrot, potato, onion"),
         ("List the first three even numbers after zero.", "2, 4, 6")]
DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
          "November", "December"]
WORDS = ["apple", "river", "garden", "window", "planet", "yellow", "summer", "friend", "orange", "tiger",
         "music", "school", "pencil", "winter", "bridge"]


def _questions() -> list[tuple[str, str]]:
    qs = [(f"What is the capital of {c}?", a) for c, a in CAPITALS.items()]
    qs += [(f"On which continent is {c}?", a) for c, a in CONTINENTS.items()]
    qs += [(f"What is {a} plus {b}?", str(a + b)) for a in range(2, 10) for b in range(2, 10) if (a * 7 + b) % 3 == 0]
    qs += [(f"What is {a} times {b}?", str(a * b)) for a in range(2, 10) for b in range(2, 10) if (a + b * 5) % 4 == 0]
    qs += [(f"What is {a} minus {b}?", str(a - b)) for a in range(10, 20, 2) for b in range(2, 9, 3)]
    qs += UNITS
    qs += [(f"What colour is {t}?", c) for t, c in COLOURS.items()]
    qs += [(f"What is the opposite of '{w}'?", o) for w, o in OPPOSITES.items()]
    qs += [(f"What is the plural of '{w}'?", p) for w, p in PLURALS.items()]
    qs += [(f"What sound does a {a} make?", s) for a, s in SOUNDS.items()]
    qs += [(f"What is a young {a} called?", y) for a, y in YOUNG.items()]
    qs += [(f"Which day comes after {d}?", DAYS[(i + 1) % 7]) for i, d in enumerate(DAYS)]
    qs += [(f"Which month comes after {m}?", MONTHS[(i + 1) % 12]) for i, m in enumerate(MONTHS)]
    qs += [(f"What is the first letter of the word '{w}'?", w[0]) for w in WORDS]
    qs += [(f"How many letters are in the word '{w}'?", str(len(w))) for w in WORDS]
    qs += LISTS
    return qs


def embedded_chat_instructions(seed: int = 0, test_fraction: float = 0.15
                               ) -> tuple[list[Instruction], list[Instruction]]:
    """(train, test) with disjoint questions; the prompt is the bare question until a model's chat
    template renders it."""
    items = [Instruction(prompt=q, reference=a, responses=(a,), question=q) for q, a in _questions()]
    random.Random(f"chat-instructions-{seed}").shuffle(items)
    n_test = max(1, round(test_fraction * len(items)))
    return items[n_test:], items[:n_test]
