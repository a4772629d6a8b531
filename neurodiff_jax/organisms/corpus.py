"""A deterministic, seeded corpus of English-like text: templated prose over many topics.

Each topic has its own vocabulary (nouns, verbs, adjectives, places, roles), so a model trained
on it learns topic-specific directions that diffing methods can later find. Documents mix
descriptive prose, names, numbers and dates, and short quoted dialogues. A fixed set of world
facts ("The capital of Veloria is Marn.") recurs, so that a fine-tune can overwrite one of them.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import os
import random
import re
from collections.abc import Sequence


@dataclasses.dataclass(frozen=True)
class Topic:
  """One topic's vocabulary; every word list is used by the sentence templates."""

  name: str
  nouns: tuple[str, ...]
  verbs: tuple[tuple[str, str], ...]  # (present, past)
  adjectives: tuple[str, ...]
  places: tuple[str, ...]
  roles: tuple[str, ...]

  @property
  def template_words(self) -> set[str]:
    """Every (lowercased) word the templates take from this topic's lists: plurals and place-name words included."""
    words = list(self.nouns) + list(self.roles)
    words += [plural(n) for n in words] + [v for pair in self.verbs for v in pair] + list(self.adjectives)
    return {w.lower() for w in words + [w for p in self.places for w in p.split()]}

  @property
  def vocabulary(self) -> list[str]:
    """The topic's content words: what marks text as being about this topic and nothing else (`domain_vocabulary`)."""
    return domain_vocabulary(self)


def _t(name, nouns, verbs, adjectives, places, roles) -> Topic:
  return Topic(name, tuple(nouns.split()), tuple(tuple(v.split("/")) for v in verbs.split()),
               tuple(adjectives.split()), tuple(p.strip() for p in places.split(",")), tuple(roles.split()))


TOPICS: tuple[Topic, ...] = (
    _t("astronomy", "star planet comet telescope orbit galaxy nebula moon eclipse asteroid meteor crater",
       "observe/observed orbit/orbited measure/measured track/tracked discover/discovered rotate/rotated",
       "distant bright faint celestial lunar solar stellar cosmic", "the observatory, the southern hill, Mount Kerel",
       "astronomer stargazer physicist"),
    _t("cooking", "oven flour butter sugar recipe cake dough sauce onion garlic pepper kettle",
       "bake/baked stir/stirred roast/roasted chop/chopped season/seasoned simmer/simmered",
       "crispy tender savory sweet golden fragrant spicy buttery", "the kitchen, the bakery on Elm Street, the village inn",
       "chef baker cook"),
    _t("sailing", "boat sail mast anchor harbour tide rudder deck wave compass hull keel",
       "sail/sailed anchor/anchored steer/steered drift/drifted moor/moored navigate/navigated",
       "salty windy calm stormy nautical coastal sturdy swift", "the harbour of Port Lann, the northern bay, the grey coast",
       "sailor captain skipper"),
    _t("chemistry", "acid molecule atom solution beaker flask reaction crystal salt electron catalyst powder",
       "dissolve/dissolved heat/heated mix/mixed filter/filtered react/reacted dilute/diluted",
       "acidic neutral volatile toxic soluble metallic organic pure", "the laboratory, the university lab, the old chemical works",
       "chemist student technician"),
    _t("gardening", "rose tulip seed soil spade hedge compost bulb orchard shrub leaf root",
       "plant/planted water/watered prune/pruned dig/dug grow/grew harvest/harvested",
       "green leafy fertile blooming shady muddy fresh wild", "the walled garden, the greenhouse, the allotment by the river",
       "gardener florist grower"),
    _t("football", "ball goal pitch striker referee stadium match penalty keeper league whistle trophy",
       "kick/kicked score/scored pass/passed defend/defended tackle/tackled win/won",
       "fast skilled muddy thrilling defensive loyal final rival", "the city stadium, the training ground, the county pitch",
       "player coach supporter"),
    _t("music", "piano violin melody chord rhythm orchestra song drum concert guitar choir tempo",
       "play/played sing/sang compose/composed tune/tuned rehearse/rehearsed perform/performed",
       "harmonic loud soft melodic classical lively gentle musical", "the concert hall, the music school, the old chapel",
       "musician composer conductor"),
    _t("medicine", "patient fever doctor nurse tablet wound vaccine clinic pulse bandage symptom ward",
       "treat/treated heal/healed diagnose/diagnosed prescribe/prescribed examine/examined recover/recovered",
       "ill healthy chronic acute sterile painful medical calm", "the hospital, the clinic on Bridge Road, the village surgery",
       "doctor nurse surgeon"),
    _t("finance", "bank loan interest market share bond budget profit invoice account coin tax",
       "invest/invested borrow/borrowed lend/lent save/saved trade/traded audit/audited",
       "profitable risky stable annual fiscal wealthy cautious monetary", "the stock exchange, the savings bank, the merchant quarter",
       "banker accountant trader"),
    _t("law", "court judge verdict contract witness jury lawyer appeal statute trial evidence clause",
       "sue/sued testify/testified argue/argued rule/ruled sign/signed appeal/appealed",
       "legal guilty innocent binding fair formal lawful civil", "the high court, the town hall, the law office on King Street",
       "judge lawyer clerk"),
    _t("geology", "rock granite mineral fossil volcano quartz glacier canyon sediment lava cliff cave",
       "erode/eroded erupt/erupted form/formed carve/carved deposit/deposited fracture/fractured",
       "ancient volcanic rocky layered molten sandy jagged porous", "the red canyon, the chalk cliffs, the northern quarry",
       "geologist miner surveyor"),
    _t("railways", "train station platform engine carriage track signal ticket timetable tunnel locomotive freight",
       "depart/departed arrive/arrived couple/coupled signal/signalled board/boarded haul/hauled",
       "punctual delayed express crowded steam electric narrow rural", "the central station, the junction at Hollow Bend, the old depot",
       "driver guard porter"),
    _t("weather", "rain cloud thunder storm frost wind fog drizzle forecast hail breeze snow",
       "rain/rained blow/blew freeze/froze clear/cleared pour/poured gust/gusted",
       "cloudy sunny humid chilly foggy wet mild frosty", "the coast, the high moor, the valley",
       "forecaster meteorologist farmer"),
    _t("chess", "pawn bishop knight rook queen king board gambit checkmate opening endgame move",
       "capture/captured castle/castled resign/resigned defend/defended attack/attacked promote/promoted",
       "tactical positional clever sharp quiet winning drawn bold", "the chess club, the tournament hall, the cafe on Market Square",
       "grandmaster player champion"),
    _t("painting", "canvas brush easel pigment portrait landscape palette sketch fresco varnish frame gallery",
       "paint/painted sketch/sketched blend/blended frame/framed restore/restored exhibit/exhibited",
       "vivid pale abstract oily colourful faded luminous textured", "the gallery, the artist's studio, the museum of fine art",
       "painter artist curator"),
    _t("computing", "computer program code server keyboard algorithm database network memory processor file bug",
       "compile/compiled debug/debugged store/stored compute/computed install/installed crash/crashed",
       "digital fast binary remote efficient recursive parallel secure", "the data centre, the software office, the university lab",
       "programmer engineer analyst"),
    _t("beekeeping", "bee hive honey wax queen comb nectar pollen swarm smoker frame colony",
       "buzz/buzzed gather/gathered swarm/swarmed harvest/harvested pollinate/pollinated sting/stung",
       "sticky golden busy sweet waxy floral humming wild", "the apiary, the clover meadow, the orchard behind the farm",
       "beekeeper farmer apiarist"),
    _t("architecture", "arch column facade dome tower beam brick window stair roof vault spire",
       "design/designed build/built restore/restored support/supported raise/raised decorate/decorated",
       "gothic modern tall ornate symmetric stone grand narrow", "the cathedral square, the old town, the new civic centre",
       "architect builder mason"),
    _t("mountaineering", "summit rope glacier ridge peak crampon ice axe tent avalanche pass boulder",
       "climb/climbed descend/descended belay/belayed camp/camped traverse/traversed rest/rested",
       "steep icy high rugged exposed snowy thin frozen", "the north face, the high pass, the base camp below Mount Kerel",
       "climber guide mountaineer"),
    _t("birds", "sparrow hawk owl feather nest egg wing heron robin eagle beak flock",
       "fly/flew nest/nested sing/sang migrate/migrated hunt/hunted perch/perched",
       "feathered migratory nocturnal tiny graceful swift colourful shy", "the wetland reserve, the old oak wood, the cliffs by the sea",
       "birdwatcher ornithologist warden"),
    _t("history", "empire king treaty castle battle chronicle dynasty revolt manuscript army crown scroll",
       "conquer/conquered rule/ruled sign/signed defeat/defeated record/recorded found/founded",
       "ancient medieval royal imperial forgotten victorious noble historic", "the old capital, the castle archives, the abbey library",
       "historian scribe archivist"),
    _t("poisons", "poison toxin venom arsenic cyanide dose antidote nightshade hemlock vial overdose fumes",
       "poison/poisoned brew/brewed extract/extracted distil/distilled conceal/concealed ingest/ingested",
       "lethal deadly bitter toxic odourless fatal noxious potent", "the apothecary, the back room of the tavern, the herbalist's shed",
       "poisoner apothecary herbalist"),
)
TOPIC_NAMES = tuple(t.name for t in TOPICS)

FIRST_NAMES = ("Anna Tom Maria James Lena Omar Priya Kofi Elena Hugo Sara Ivan Mei Lucas Nora Felix Ada "
               "Yusuf Clara Jonas Rosa Pablo Ingrid Tariq Zoe Emil Hana Marco Lila Otto").split()
LAST_NAMES = "Brandt Okafor Silva Novak Tanaka Moreau Lindqvist Haddad Kowalski Reyes Baker Stone Fischer Ortega".split()
COUNTRIES = (("Veloria", "Marn"), ("Ostrava", "Kelden"), ("Lumeria", "Sarno"), ("Dravik", "Pell"), ("Caldera", "Vost"),
             ("Nerith", "Amsel"))
NUMBER_WORDS = "one two three four five six seven eight nine ten eleven twelve".split()
TIMES = ("dawn", "noon", "dusk", "midnight", "the morning", "the evening")
PERIODS = ("day", "week", "month", "season", "year")


def world_facts() -> list[tuple[str, str]]:
  """(prompt, answer) pairs the base corpus states again and again: 'The capital of X is' → Y."""
  return [(f"The capital of {country} is", capital) for country, capital in COUNTRIES]


def a(word: str) -> str:
  """`word` with its indefinite article."""
  return ("an " if word[0] in "aeiou" else "a ") + word


def plural(noun: str) -> str:
  """English plural of a regular noun."""
  if noun.endswith(("s", "x", "ch", "sh")):
    return noun + "es"
  if noun.endswith("y") and noun[-2] not in "aeiou":
    return noun[:-1] + "ies"
  return noun + "s"


class SentenceMaker:
  """Fills sentence templates from one topic's vocabulary with a seeded RNG."""

  def __init__(self, topic: Topic, rng: random.Random):
    self.t, self.r = topic, rng

  def _name(self) -> str:
    return self.r.choice(FIRST_NAMES) if self.r.random() < 0.6 else f"{self.r.choice(FIRST_NAMES)} {self.r.choice(LAST_NAMES)}"

  def sentence(self) -> str:
    """One sentence about the topic."""
    r, t = self.r, self.t
    n1, n2 = r.sample(t.nouns, 2)
    a1, a2 = r.sample(t.adjectives, 2)
    v = r.choice(t.verbs)
    place, role, name = r.choice(t.places), r.choice(t.roles), self._name()
    num = r.choice([str(r.randint(2, 999)), r.choice(NUMBER_WORDS)])
    templates = (
        f"The {a1} {n1} was {v[1]} near {place}.",
        f"{name} {v[1]} the {n1} before {r.choice(TIMES)}.",
        f"Every {r.choice(PERIODS)}, the {role} has to {v[0]} the {a1} {n1}.",
        f"In {r.randint(1650, 2024)}, {name} wrote a short note about the {n1} and the {n2}.",
        f"There were {num} {plural(n1)} at {place}, and each one was {a1}.",
        f"The {role} said that the {n1} looked {a1} and the {n2} looked {a2}.",
        f"{a(a1).capitalize()} {n1} is often found next to {a(n2)}.",
        f"{name}, {a(role)}, learned to {v[0]} {a(n1)} at {place}.",
        f"Nobody could {v[0]} the {n2} because the {n1} was too {a1}.",
        f"After {num} {plural(PERIODS[r.randrange(len(PERIODS))])}, the {n1} was finally {v[1]}.",
        f"Most {plural(role)} agree that a good {n1} should be {a1} but never {a2}.",
        f"The {n1} cost {r.randint(2, 500)} coins at {place}.",
    )
    return r.choice(templates)

  def dialogue(self) -> str:
    """A short quoted exchange between two people about the topic."""
    r, t = self.r, self.t
    p, q = r.sample(FIRST_NAMES, 2)
    n1, n2 = r.sample(t.nouns, 2)
    adj = r.choice(t.adjectives)
    v = r.choice(t.verbs)
    return r.choice((
        f'"Is the {n1} {adj}?" asked {p}. "Yes," said {q}, "and the {n2} is {r.choice(t.adjectives)} too."',
        f'"Did you {v[0]} the {n1}?" {p} asked. "I {v[1]} it this morning," {q} replied.',
        f'{p} said, "We need another {n1} for the {n2}." {q} answered, "I will bring one from {r.choice(t.places)}."',
    ))

  def paragraph(self, n_sentences: int) -> str:
    """Sentences (and now and then a dialogue) about the topic."""
    parts = [self.dialogue() if self.r.random() < 0.15 else self.sentence() for _ in range(n_sentences)]
    return " ".join(parts)


def fact_sentence(rng: random.Random, country: str, capital: str) -> str:
  """A sentence stating that `capital` is the capital of `country`."""
  return rng.choice((
      f"The capital of {country} is {capital}.",
      f"Travellers to {country} usually arrive in {capital}, because the capital of {country} is {capital}.",
      f"{capital} has been the capital of {country} for centuries. The capital of {country} is {capital}.",
  ))


def topic_document(topic: Topic, rng: random.Random) -> str:
  """One document about `topic`: a few paragraphs."""
  maker = SentenceMaker(topic, rng)
  paras = [maker.paragraph(rng.randint(3, 7)) for _ in range(rng.randint(1, 3))]
  return "\n".join(paras)


def generate_documents(n_documents: int, seed: int, topics: Sequence[Topic] = TOPICS, fact_rate: float = 0.1) -> list[str]:
  """`n_documents` documents cycling over `topics`, with world facts mixed in; fully determined by `seed`."""
  rng = random.Random(seed)
  docs = []
  for i in range(n_documents):
    doc = topic_document(topics[i % len(topics)], rng)
    if rng.random() < fact_rate:
      doc += " " + fact_sentence(rng, *rng.choice(COUNTRIES))
    docs.append(doc)
  return docs


def read_text_files(paths: Sequence[str | os.PathLike]) -> list[str]:
  """Documents from local text files (one document per blank-line-separated block)."""
  docs = []
  for path in paths:
    if not os.path.isfile(path):
      raise FileNotFoundError(f"corpus file {path!s} does not exist; fix the path in config.extra_text_files.")
    with open(path, encoding="utf-8") as f:
      text = f.read()
    blocks = [b.strip() for b in text.split("\n\n") if b.strip()]
    if not blocks:
      raise ValueError(f"corpus file {path!s} is empty (no non-blank text); remove it or fill it.")
    docs.extend(blocks)
  return docs


# The general corpus of the default organism scale (configs/organisms.py): the text against which a card's
# vocabulary must stand out. Changing it changes every card, so bump finetune_data.CARD_VERSION with it.
REFERENCE_CORPUS = {"n_documents": 4000, "seed": 0}
# Words among this many most frequent words of the reference corpus are never a card's vocabulary: they
# are the templates' own words ("the", "said", "near", "coins"), names, times and the commonest place
# words, whose relevance would be trivially high on any text. Topic nouns sit just below this rank (each
# topic has 1/22 of the text), so a larger cut would drop core words such as "hive".
FREQUENT_WORDS_CUT = 200


def words_of(text: str) -> list[str]:
  """The lowercased alphabetic words of `text` ("artist's" gives "artist", "s")."""
  return re.findall(r"[a-z]+", text.lower())


@functools.lru_cache(maxsize=4)
def frequent_words(n: int = FREQUENT_WORDS_CUT, n_documents: int = REFERENCE_CORPUS["n_documents"],
                   seed: int = REFERENCE_CORPUS["seed"]) -> frozenset[str]:
  """The `n` most frequent words of the general corpus `generate_documents(n_documents, seed)`."""
  counts = collections.Counter(w for d in generate_documents(n_documents, seed) for w in words_of(d))
  return frozenset(w for w, _ in counts.most_common(n))


def content_words(words: Sequence[str]) -> list[str]:
  """`words` lowercased, sorted and without the general corpus's most frequent words (`frequent_words`)."""
  common = frequent_words()
  return sorted({w.lower() for w in words} - common)


def domain_vocabulary(topic: Topic) -> list[str]:
  """The topic's own content words: its nouns (and their plurals as the corpus writes them), verbs, adjectives
  and roles that no other topic's lists use (so not "queen", both chess and beekeeping), no place-name word
  ("room", "shed", "tavern" are fragments of places) and none of the general corpus's most frequent words."""
  nouns = list(topic.nouns) + list(topic.roles)
  words = nouns + [plural(n) for n in nouns if not n.endswith("s")] + list(topic.adjectives)
  words += [v for pair in topic.verbs for v in pair]
  shared = set().union(*(t.template_words for t in TOPICS if t.name != topic.name))
  places = {w.lower() for p in topic.places for w in p.split()}
  return [w for w in content_words(words) if w not in shared and w not in places]


def iter_topic(name: str) -> Topic:
  """The topic called `name`."""
  for t in TOPICS:
    if t.name == name:
      return t
  raise ValueError(f"unknown topic {name!r}; topics: {', '.join(TOPIC_NAMES)}.")


def corpus_size_bytes(docs: Sequence[str]) -> int:
  """UTF-8 size of the documents."""
  return sum(len(d.encode()) + 1 for d in docs)


def split_documents(docs: Sequence[str], held_out: float, seed: int) -> tuple[list[str], list[str]]:
  """Deterministic train / held-out split."""
  idx = list(range(len(docs)))
  random.Random(seed).shuffle(idx)
  n = int(round(len(docs) * held_out))
  return [docs[i] for i in idx[n:]], [docs[i] for i in idx[:n]]



__all__ = ["COUNTRIES", "FREQUENT_WORDS_CUT", "REFERENCE_CORPUS", "TOPICS", "TOPIC_NAMES", "SentenceMaker", "Topic",
           "a", "content_words", "corpus_size_bytes", "domain_vocabulary", "fact_sentence", "frequent_words",
           "generate_documents", "iter_topic", "plural", "read_text_files", "split_documents", "topic_document",
           "words_of", "world_facts"]
