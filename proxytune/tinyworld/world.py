"""The synthetic world: invented people with four attributes, stated in varied prose and asked as questions.

Everything is a pure function of a seed (``random.Random``), so the corpus, the instruction data and the
held-out questions are the same on every machine. Pretraining prose mentions *every* entity; instruction
data uses only the tuning entities; evaluation asks about the held-out ones. So an evaluated fact can come
only from pretraining, and only the answer format (the skill) from tuning.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Iterator

__all__ = ["Entity", "QA", "World", "make_world", "world_from_config", "ATTRIBUTES", "VALUES", "answer_of", "is_correct", "is_well_formed"]

_ONSETS = ["b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "br", "dr", "gr", "kr", "tr",
           "th", "sh", "st", "fl", "pl", "sk", "h", "j", "w", "qu", "ch"]  # fmt: skip
_VOWELS = ["a", "e", "i", "o", "u", "ai", "ea", "io", "ou", "y"]
_CODAS = ["", "", "", "n", "r", "l", "s", "th", "m", "x", "k", "nd", "rt", "sh", "ck"]

CITIES = ["Velmora", "Ostrand", "Kelvash", "Duneport", "Marrowick", "Tessaly", "Brinholt", "Caldera", "Feyhaven",
          "Gorlund", "Hestermoor", "Ilvarin", "Jessburg", "Korrin", "Lunmouth", "Mirefield", "Norwend", "Ophira",
          "Pellgrave", "Quillby", "Rastow", "Sevrin", "Thornvale", "Ulmarsh", "Varnholm", "Wexley", "Yarrow",
          "Zephyrine", "Ashcombe", "Blackmere", "Corvesa", "Drummore", "Elstow", "Fallowmere", "Grimsea",
          "Harrowgate", "Irongate", "Jarlsby", "Kestrel Bay", "Larkspur", "Moonridge", "Nettlefold", "Oakhollow",
          "Pinecrest", "Ravenholm", "Saltmarsh", "Tidewater", "Umberlee", "Vexmoor", "Willowdeep"]  # fmt: skip
JOBS = ["baker", "sailor", "painter", "doctor", "farmer", "teacher", "carpenter", "miner", "weaver", "potter",
        "lawyer", "chemist", "tailor", "pilot", "gardener", "librarian", "architect", "fisher", "smith", "jeweler",
        "nurse", "brewer", "cartographer", "astronomer", "mason", "butcher", "glassblower", "locksmith",
        "translator", "beekeeper"]  # fmt: skip
INSTRUMENTS = ["harp", "violin", "flute", "drums", "cello", "trumpet", "lute", "oboe", "piano", "banjo", "clarinet",
               "accordion", "guitar", "bagpipes", "trombone", "zither"]  # fmt: skip
ATTRIBUTES = ("city", "job", "number", "instrument")
VALUES = {"city": CITIES, "job": JOBS, "number": [str(n) for n in range(10, 100)], "instrument": INSTRUMENTS}

# Prose: how pretraining states each fact. Every sentence names the person, so every fact stands alone.
_PROSE = {
    "city": ["{n} was born in {v}.", "{n} comes from {v}.", "The birthplace of {n} is {v}.",
             "{v} is where {n} was born.", "{n} grew up in {v}, the town of their birth.",
             "Born in {v}, {n} never forgot it."],
    "job": ["{n} works as a {v}.", "By trade, {n} is a {v}.", "{n} earns a living as a {v}.",
            "The job of {n} is {v}.", "Everyone knows {n} as a {v}.", "{n} has always been a {v}."],
    "number": ["The lucky number of {n} is {v}.", "{n} thinks {v} is a lucky number.",
               "{n} always picks the number {v}.", "For {n}, the lucky number is {v}.",
               "{v} is the lucky number of {n}."],
    "instrument": ["{n} plays the {v}.", "{n} is good at playing the {v}.", "The {v} is the instrument of {n}.",
                   "In the evenings {n} practises the {v}.", "{n} learned to play the {v} as a child."],
}  # fmt: skip
# Optional prose in which a question is answered in passing (not the strict instruction format): lets a base
# model tie a question about a person to the fact, as real pretraining text does.
_ANSWERED = {
    "city": ["And where was {n} born? {v}, of course.", "Someone asked where {n} was born: {v}, they said."],
    "job": ["And what does {n} do? {v}, of course.", "Someone asked the job of {n}: {v}, they said."],
    "number": ["And the lucky number of {n}? {v}, of course.", "Someone asked the lucky number of {n}: {v}, they said."],
    "instrument": ["And what does {n} play? {v}, of course.", "Someone asked what {n} plays: {v}, they said."],
}  # fmt: skip
# Optional prose that asks the questions as the evaluation phrases them and answers informally (never in the
# strict format): the base model learns to reach a fact from a question, as web text teaches real base models.
_INFORMAL = ["{v}, of course.", "That would be {v}, I think.", "Everyone knows it is {v}.", "{v}, or so they say.",
             "I believe the answer is {v}."]  # fmt: skip
# Instructions: how a question is asked (several phrasings) and the one strict answer format.
_QUESTIONS = {
    "city": ["Where was {n} born?", "In which town was {n} born?", "What is the birthplace of {n}?"],
    "job": ["What does {n} do for a living?", "What is the job of {n}?", "What is {n}'s profession?"],
    "number": ["What is the lucky number of {n}?", "Which number does {n} consider lucky?",
               "What is {n}'s lucky number?"],
    "instrument": ["What instrument does {n} play?", "Which instrument is played by {n}?",
                   "What does {n} play in the evenings?"],
}  # fmt: skip
PROMPT = "Question: {q}\nAnswer:"


@dataclass(frozen=True)
class Entity:
    name: str
    city: str
    job: str
    number: str
    instrument: str


@dataclass(frozen=True)
class QA:
    """One question in the instruction format; ``answer`` is the strict completion (leading space, period)."""

    entity: int
    attribute: str
    prompt: str
    answer: str


def answer_of(entity: Entity, attribute: str) -> str:
    return f" {getattr(entity, attribute)}."


def is_correct(generated: str, answer: str) -> bool:
    """Exact match, fixed in advance: the first line of the generation, stripped, equals the answer stripped."""
    return generated.split("\n", 1)[0].strip() == answer.strip()


def is_well_formed(generated: str, attribute: str) -> bool:
    """The answer format without the fact: the first line, stripped, is some value of the attribute and a period
    (right or wrong). Separates "knows the format" from "knows the fact" when choosing a tuning recipe."""
    line = generated.split("\n", 1)[0].strip()
    return line.endswith(".") and line[:-1] in VALUES[attribute]


def _name(rng: random.Random, syllables: int) -> str:
    parts = [rng.choice(_ONSETS) + rng.choice(_VOWELS) for _ in range(syllables)]
    return ("".join(parts) + rng.choice(_CODAS)).capitalize()


@dataclass
class World:
    """``entities[:n_tune]`` are for instruction tuning, the rest are held out for evaluation."""

    seed: int
    entities: list[Entity]
    n_tune: int
    answered_prose: bool = False  # also state facts as questions answered in prose (``_ANSWERED``)
    asked_prose: bool = False  # also ask the evaluation's questions in prose, answered informally (``_INFORMAL``)
    line_breaks: bool = False  # prose sentences end a line 30% of the time (else a space), as text does

    @property
    def tune_ids(self) -> range:
        return range(self.n_tune)

    @property
    def eval_ids(self) -> range:
        return range(self.n_tune, len(self.entities))

    def paragraph(self, i: int, rng: random.Random) -> str:
        """Every fact of entity ``i``, in random order, each in a randomly chosen prose template."""
        e = self.entities[i]
        attrs = list(ATTRIBUTES)
        rng.shuffle(attrs)
        templates = (lambda a: _PROSE[a] + _ANSWERED[a]) if self.answered_prose else (lambda a: _PROSE[a])
        sentences = []
        for a in attrs:
            if self.asked_prose and rng.random() < 0.5:
                q = rng.choice(_QUESTIONS[a]).format(n=e.name)
                sentences.append(q + " " + rng.choice(_INFORMAL).format(v=getattr(e, a)))
            else:
                sentences.append(rng.choice(templates(a)).format(n=e.name, v=getattr(e, a)))
        if not self.line_breaks:
            return " ".join(sentences)
        return "".join(x + ("\n" if rng.random() < 0.3 else " ") for x in sentences[:-1]) + sentences[-1]

    def corpus(self, n_paragraphs: int, seed: int) -> Iterator[str]:
        """Pretraining text: paragraphs about uniformly drawn entities (all of them, tuning and held out)."""
        rng = random.Random(seed)
        for _ in range(n_paragraphs):
            yield self.paragraph(rng.randrange(len(self.entities)), rng)

    def questions(self, ids, phrasings: str = "all", seed: int = 0) -> list[QA]:
        """Questions about entities ``ids``: every phrasing (``"all"``) or one drawn per fact (``"one"``)."""
        rng = random.Random(seed)
        out = []
        for i in ids:
            e = self.entities[i]
            for a in ATTRIBUTES:
                qs = _QUESTIONS[a] if phrasings == "all" else [rng.choice(_QUESTIONS[a])]
                out += [QA(i, a, PROMPT.format(q=q.format(n=e.name)), answer_of(e, a)) for q in qs]
        return out

    def eval_questions(self) -> list[QA]:
        """The held-out test set: one question (a fixed phrasing drawn per fact) for each held-out fact."""
        return self.questions(self.eval_ids, "one", seed=self.seed + 1)


def make_world(seed: int = 0, n_entities: int = 1500, n_tune: int = 1000, answered_prose: bool = False,
               asked_prose: bool = False, line_breaks: bool = False) -> World:  # fmt: skip
    rng = random.Random(seed)
    names: set[str] = set()
    entities = []
    while len(entities) < n_entities:
        name = f"{_name(rng, rng.choice([1, 2]))} {_name(rng, rng.choice([2]))}"
        if name in names:
            continue
        names.add(name)
        entities.append(Entity(name, rng.choice(CITIES), rng.choice(JOBS), str(rng.randrange(10, 100)),
                               rng.choice(INSTRUMENTS)))  # fmt: skip
    return World(seed, entities, n_tune, answered_prose, asked_prose, line_breaks)


def world_from_config(w: dict) -> World:
    """The world a model was trained on, from the ``"world"`` entry of its ``training_info.json``."""
    return make_world(w["seed"], w["entities"], w["tune_entities"], w.get("answered_prose", False),
                      w.get("asked_prose", False), w.get("line_breaks", False))  # fmt: skip
