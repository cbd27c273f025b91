"""prompts.py: where unlearn.py's step 2 finds its prompts; not the method itself.

- A prompt grammar: sentences with a `{concept}` slot and other slots filled at random, words
  that name the same thing as a concept (synonyms), and what to keep in its place (preserve).
  Built in (`BUILT_IN`): sentences a person would write, in many scenes, subjects, lights,
  cameras and styles. A model folder may carry its own as `prompts.json` (toy/ does: toy.py
  writes its small language there), and `--grammar FILE` gives one for any model.
- An optional language model that rewrites each prompt richly (`refine_prompts`).
- A prompts file, for unlearn.py and sample.py alike: a CSV with a 'prompt' (and 'seed') column,
  the paper's prompt sets as published among them, or one prompt a line (`read_prompts`); the
  prompts that name the concept, with a line on those dropped (`keep_naming`).
- What "a text names the concept" means, and the text with the concept taken out or replaced
  (`concept_pattern`, `substitute`): one definition for every step that asks.
"""

import csv
import io
import json
import os
import re

from tqdm.auto import tqdm

from runs import UserError, why

GRAMMAR_FILE = "prompts.json"  # a model folder's own prompt grammar (toy/ carries one)
BUILT_IN = {  # for real models: sentences a person would write, the concept named in them once
    "sentences": [
        "{camera} of {subject} who {action} {place} {light}. The video shows {concept}. {style}.",
        "{Concept} {place}: {subject} {action} {light}. {camera}. {style}.",
        "A film scene with {concept}. {Subject} {action} {place} {light}. {camera}. {style}.",
        "{Subject} {action} {place} {light}, in a video about {concept}. {camera}. {style}.",
        "{camera}: {concept}, as {subject} {action} {place}. {style}, {light}."],
    "slots": {
        "subject": ["a young woman", "a man in his thirties", "an elderly man", "a dancer",
                    "a woman with long dark hair", "a tall man with a beard", "an athlete", "a painter",
                    "a woman in her fifties", "a swimmer", "a young man with curly hair", "a singer"],
        "action": ["walks slowly toward the camera", "turns around and smiles", "stretches in the morning sun",
                   "dances to soft music", "sits by the window and looks outside",
                   "laughs and talks to someone off-screen", "steps into clear water", "lies back on a blanket",
                   "poses for a photographer", "runs along the shore", "brushes their hair", "leans against a wall"],
        "place": ["on a sunny beach", "in a dimly lit bedroom", "on a crowded city street at night",
                  "in a forest clearing", "by a swimming pool", "in an artist's studio", "in a modern kitchen",
                  "on a mountain trail", "at a rooftop party", "in a rainy alley", "in a sauna", "on a theatre stage",
                  "in a hotel room", "in a field of tall grass"],
        "light": ["at golden hour", "under warm lamp light", "in soft morning light", "under neon signs",
                  "by candlelight", "in bright midday sun", "under a single spotlight", "in the blue light of dusk"],
        "camera": ["A close-up shot", "A wide shot", "A slow dolly shot", "Handheld footage", "An aerial view",
                   "A tracking shot", "A static shot", "Slow-motion footage"],
        "style": ["Cinematic, 4k", "Shot on 35mm film, film grain", "Documentary style", "Photorealistic, high detail",
                  "Shallow depth of field", "Vivid colours", "Soft focus, dreamy mood", "Natural colours, realistic"]},
    "synonyms": [["nudity", "nude", "naked"]],
    "preserve": {"nudity": ["a fully clothed woman", "a fully clothed man", "people in casual clothes",
                            "a person in a coat"],
                 "": ["a man", "a woman", "a dog", "a car"]},  # "": for any other concept
}
SLOT = re.compile(r"\{(\w+)\}")  # {name} takes one of the slot's choices; {Name}, the same capitalised
REFINER_TRIES = 3  # outputs sampled per prompt until one names the concept
REFINER_INSTRUCTIONS = (
    "Rewrite the user's short video idea as one detailed paragraph for a text-to-video model: the subject, what "
    "happens, the setting, the light and the camera. Keep every element of the idea, including '{concept}', "
    "word for word. Reply with the paragraph only.")


def load_grammar(folder=None, path=None):
    """The prompt grammar of step 2: the file `path`, else the model folder's prompts.json, else BUILT_IN.

    A grammar is JSON: "sentences" (strings with slots), "slots" (name: the strings it may take,
    themselves with slots; a choice that is a list stands for one of its strings), "synonyms" (lists
    of words that name one thing) and "preserve" (concept: what to put in its place; "" for any).
    """
    if path is None:
        path = os.path.join(folder, GRAMMAR_FILE) if folder else ""
        if not os.path.isfile(path):
            return BUILT_IN
    try:
        with open(path, encoding="utf-8") as f:
            grammar = json.load(f)
        ok = (isinstance(grammar["sentences"], list) and grammar["sentences"]
              and all(isinstance(v, list) and v for v in grammar.get("slots", {}).values())
              and isinstance(grammar.get("synonyms", []), list) and isinstance(grammar.get("preserve", {}), dict))
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise UserError(f"prompt grammar {path}: cannot read it ({why(e)}); it needs a 'sentences' list")
    if not ok:
        raise UserError(f"prompt grammar {path}: 'sentences' must be a non-empty list, each slot a non-empty list")
    return {"slots": {}, "synonyms": [], "preserve": {}, **grammar}


def concept_words(grammar, concept):
    """The concept and every synonym of a word in it ('crimson' on the toy: red, crimson, scarlet)."""
    named = [g for g in grammar["synonyms"] if any(concept_pattern(w).search(concept) for w in g)]
    return [concept] + [w for g in named for w in g]


def names_any(text, words):
    return any(concept_pattern(w).search(SLOT.sub(" ", text)) for w in words)


def expand(text, grammar, rng, banned, depth=0):
    """`text` with every slot but {concept} filled at random, left to right, never with a banned word."""
    def one(match):
        name = match.group(1)
        key = name[:1].lower() + name[1:]
        if key == "concept":
            return match.group(0)
        if key not in grammar["slots"] or depth > 20:
            why_not = "refers to itself in a loop" if depth > 20 else "has no such slot"
            raise UserError(f"prompt grammar: '{{{name}}}' {why_not}; fix the grammar file")
        choices = [[w for w in c if not names_any(w, banned)] if isinstance(c, list) else c
                   for c in grammar["slots"][key]]  # a list: one of its strings, the list as likely as a string
        choices = [c for c in choices if (c if isinstance(c, list) else not names_any(c, banned))]
        if not choices:
            raise UserError(f"prompt grammar: every choice of slot '{key}' names the concept; add others")
        choice = rng.choice(choices)
        out = expand(rng.choice(choice) if isinstance(choice, list) else choice, grammar, rng, banned, depth + 1)
        return out[:1].upper() + out[1:] if name[:1].isupper() else out
    return SLOT.sub(one, text)


def concept_templates(grammar, rng, n, concept, banned=None):
    """n prompts with a `{concept}` slot, drawn from the grammar; no other slot takes the concept's words (nor
    the `banned` words: in a run of several concepts, the others')."""
    banned = banned or concept_words(grammar, concept)
    templates = [tidy(expand(s, grammar, rng, banned)) for s in balanced_choices(rng, grammar["sentences"], n)]
    for t in templates:
        if "{concept}" not in t.lower():
            raise UserError(f"prompt grammar: '{t}' came out with no {{concept}} slot; every sentence needs one")
    return templates


def balanced_choices(rng, choices, n):
    """n of `choices` in a random order, each as often as n allows (counts differ by one at most). Independent
    draws let the mix of a run's prompts vary by seed (on the toy, 10 to 16 two-square scenes in 32), and
    with it how well a run erased (docs/experiments.md, section 11)."""
    picks = list(choices) * (n // len(choices)) + rng.sample(list(choices), n % len(choices))
    rng.shuffle(picks)
    return picks


def fill(template, concept):
    """A template's `{concept}` slots filled; `{Concept}` (a sentence's start) capitalised."""
    return template.replace("{Concept}", concept[:1].upper() + concept[1:]).replace("{concept}", concept)


def default_preserve(grammar, concept, banned=None):
    """What must survive erasing `concept`: the grammar's choice for it, none of which names the concept (nor
    a `banned` word: no concept of a run is kept in another's place)."""
    named = banned or concept_words(grammar, concept)
    keep = [k for k in grammar["preserve"].get(concept.lower(), grammar["preserve"].get("", []))
            if not names_any(k, named)]
    if not keep:
        raise UserError(f"nothing to keep in the place of '{concept}': give --preserve WORDS")
    return keep


def concepts_named(text, concepts):
    """The concepts of `concepts` that `text` names."""
    return [c for c in concepts if concept_pattern(c).search(text)]


def concept_pattern(concept):
    """The concept as a whole phrase, in any case and spacing: the one test of 'this text names it'."""
    words = r"\s+".join(re.escape(w) for w in concept.split())
    return re.compile(rf"(?<!\w){words}(?!\w)", flags=re.IGNORECASE)


def substitute(prompt, concept, text):
    """The prompt with every mention of the concept replaced by `text` (removed when empty); given lists, each
    concept by its own text, the longest first ('red car' before 'red')."""
    out = prompt
    for c, t in sorted(zip(*([concept], [text]) if isinstance(concept, str) else (concept, text)),
                       key=lambda pair: -len(pair[0])):
        out = concept_pattern(c).sub(lambda _: t, out)
    out = tidy(out)
    return out[:1].upper() + out[1:] if prompt[:1].isupper() else out  # a sentence still starts as one


def tidy(text):
    """One space between words, none before punctuation, no empty clause, 'an' before a vowel."""
    out = re.sub(r"\s+([,.;:])", r"\1", re.sub(r"\s+", " ", text))  # no space before punctuation
    out = re.sub(r"([,;:])(?=[,.;:])", "", out).strip(" ,;:")  # "shows ." -> "shows."; ", ," -> ","
    return re.sub(r"\b([Aa]) (?=[aeiouAEIOU])", r"\1n ", out)


def refine_prompts(prompts, concepts, refiner, device, dtype, tries=REFINER_TRIES):
    """Rewrite prompts with a language model on `device`, keeping only outputs that still name each concept the
    prompt named, as the authors did. Returns the rewritten prompts and how many outputs were dropped."""
    from transformers import pipeline
    try:  # never trust_remote_code: the refiner's own code is not run
        generate = pipeline("text-generation", model=refiner, device=device, dtype=dtype,
                            model_kwargs={"use_safetensors": True})
    except Exception as e:
        raise UserError(f"cannot load refiner '{refiner}' ({why(e)})")
    chat = generate.tokenizer.chat_template is not None
    refined, dropped = [], 0
    for prompt in tqdm(prompts, desc="refining prompts"):
        named = concepts_named(prompt, concepts)
        system = REFINER_INSTRUCTIONS.format(concept="', '".join(named))
        for _ in range(tries):  # re-sample until the concept's words survive, as the authors did
            if chat:
                out = generate([{"role": "system", "content": system}, {"role": "user", "content": prompt}],
                               max_new_tokens=200, do_sample=True)[0]["generated_text"][-1]["content"]
            else:
                out = generate(f"{system}\nIdea: {prompt}\nParagraph:", max_new_tokens=200, do_sample=True,
                               return_full_text=False)[0]["generated_text"]
            out = " ".join(out.split())
            if concepts_named(out, named) == named:
                refined.append(out)
                break
            dropped += 1
    return refined, dropped


SEED_COLUMNS = ("seed", "evaluation_seed")  # the authors' prompt sets; the faces' set calls it evaluation_seed


def read_prompts(path, seed):
    """[{"prompt", "seed", "columns"}] from a prompts file: a CSV with a 'prompt' column, or one prompt a line.

    The CSV layouts of the paper's prompt sets read as published: `prompt,seed,concept,concept_type`,
    Ring-A-Bell's `prompt,normal prompt` and the faces' `case_number,prompt,class,evaluation_seed`. A seed
    column is used where present (else `seed`); every other column is kept as "columns". A byte-order mark
    is skipped, and a quoted prompt that spans lines is read as one line of words.
    """
    if not os.path.isfile(path):
        raise UserError(f"--prompts-file {path}: no such file")
    try:
        with open(path, encoding="utf-8-sig", newline="") as f:  # utf-8-sig: a BOM is not part of the header
            text = f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"--prompts-file {path}: cannot read it as UTF-8 text ({why(e)})")
    one_line = lambda s: " ".join((s or "").split())  # noqa: E731  a prompt quoted over several lines is one
    if not path.lower().endswith(".csv"):
        return [dict(prompt=one_line(line), seed=seed, columns={}) for line in text.splitlines() if line.strip()]
    reader = csv.DictReader(io.StringIO(text, newline=""))
    header = {name.strip().lower(): name for name in reader.fieldnames or [] if name}
    if "prompt" not in header:
        raise UserError(f"--prompts-file {path}: a CSV needs a 'prompt' column (and may have 'seed'); "
                        f"its header is {', '.join(reader.fieldnames or []) or 'empty'}")
    seed_column = next((header[c] for c in SEED_COLUMNS if c in header), None)
    rows = []
    for row in reader:
        prompt = one_line(row.get(header["prompt"]))
        if not prompt:
            continue
        try:
            own = int(float(row[seed_column])) if seed_column and (row.get(seed_column) or "").strip() else seed
        except ValueError:
            raise UserError(f"--prompts-file {path}, line {reader.line_num}: seed {row[seed_column]!r} is not a "
                            "whole number")
        others = {k: v for k, v in row.items() if k and k not in (header["prompt"], seed_column)}
        rows.append(dict(prompt=prompt, seed=own, columns=others))
    return rows


def keep_naming(prompts, grammar, concepts):
    """The prompts that name a concept (the concept mask needs its words), and a line on those dropped."""
    kept = [p for p in prompts if concepts_named(p, concepts)]
    dropped = [p for p in prompts if not concepts_named(p, concepts)]
    synonyms = [w for c in concepts for w in concept_words(grammar, c)[1:]]
    near = {w for p in dropped for w in synonyms if concept_pattern(w).search(p)}
    names = "' or '".join(concepts)
    said = (f"; {sum(names_any(p, synonyms) for p in dropped)} of them say {', '.join(sorted(near))}, which are "
            f"not '{names}': name it in them, or erase that word with its own --concept") if near else ""
    return kept, (f"--prompts-file: kept {len(kept)} of {len(prompts)} prompts; dropped {len(dropped)} that do not "
                  f"name '{names}' (only that phrase, in any case, counts){said}")
