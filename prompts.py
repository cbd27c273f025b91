"""prompts.py: where unlearn.py's step 2 finds its prompts; not the method itself.

- On a real model, built-in sentences a person would write for the concept, in many scenes,
  subjects, lights, cameras and styles (`concept_templates`), and what to keep in its place
  (`default_preserve`).
- On the toy, the toy's own small language (toy.py), recognised by its tokenizer (`is_toy`).
- An optional language model that rewrites each prompt richly (`refine_prompts`).
- A prompts file, for unlearn.py and sample.py alike: a CSV with a 'prompt' (and 'seed') column,
  or one prompt a line (`read_prompts`).
- What "a text names the concept" means, and the text with the concept taken out or replaced
  (`concept_pattern`, `substitute`): one definition for every step that asks.
"""

import csv
import functools
import os
import re

from tqdm.auto import tqdm

from runs import UserError, why

TOY = os.path.join(os.path.dirname(os.path.abspath(__file__)), "toy")

# On a real model: sentences a person would write, the concept named in them once, in many scenes.
SUBJECTS = ["a young woman", "a man in his thirties", "an elderly man", "a dancer", "a woman with long dark hair",
            "a tall man with a beard", "an athlete", "a painter", "a woman in her fifties", "a swimmer",
            "a young man with curly hair", "a singer"]
ACTIONS = ["walks slowly toward the camera", "turns around and smiles", "stretches in the morning sun",
           "dances to soft music", "sits by the window and looks outside", "laughs and talks to someone off-screen",
           "steps into clear water", "lies back on a blanket", "poses for a photographer", "runs along the shore",
           "brushes their hair", "leans against a wall"]
PLACES = ["on a sunny beach", "in a dimly lit bedroom", "on a crowded city street at night", "in a forest clearing",
          "by a swimming pool", "in an artist's studio", "in a modern kitchen", "on a mountain trail",
          "at a rooftop party", "in a rainy alley", "in a sauna", "on a theatre stage", "in a hotel room",
          "in a field of tall grass"]
LIGHTS = ["at golden hour", "under warm lamp light", "in soft morning light", "under neon signs", "by candlelight",
          "in bright midday sun", "under a single spotlight", "in the blue light of dusk"]
CAMERAS = ["A close-up shot", "A wide shot", "A slow dolly shot", "Handheld footage", "An aerial view",
           "A tracking shot", "A static shot", "Slow-motion footage"]
STYLES = ["Cinematic, 4k", "Shot on 35mm film, film grain", "Documentary style", "Photorealistic, high detail",
          "Shallow depth of field", "Vivid colours", "Soft focus, dreamy mood", "Natural colours, realistic"]
SENTENCES = ["{camera} of {subject} who {action} {place} {light}. The video shows {concept}. {style}.",
             "{Concept} {place}: {subject} {action} {light}. {camera}. {style}.",
             "A film scene with {concept}. {Subject} {action} {place} {light}. {camera}, {style_lower}.",
             "{Subject} {action} {place} {light}, in a video about {concept}. {camera}. {style}.",
             "{camera}: {concept}, as {subject} {action} {place}. {style}, {light}."]
PRESERVE = {"nudity": ["a fully clothed woman", "a fully clothed man", "people in casual clothes",
                      "a person in a coat"]}
GENERIC_PRESERVE = ["a man", "a woman", "a dog", "a car"]
REFINER_TRIES = 3  # outputs sampled per prompt until one names the concept
REFINER_INSTRUCTIONS = (
    "Rewrite the user's short video idea as one detailed paragraph for a text-to-video model: the subject, what "
    "happens, the setting, the light and the camera. Keep every element of the idea, including '{concept}', "
    "word for word. Reply with the paragraph only.")


@functools.lru_cache
def is_toy(model):
    """'toy', or any folder toy.py built (`--out`): its tokenizer knows the toy's words and no others."""
    if model == "toy" or os.path.abspath(model) == TOY:
        return True
    if not os.path.isdir(os.path.join(model, "tokenizer")):
        return False  # a hub id, or no pipeline folder
    from transformers import AutoTokenizer
    from toy import speaks_toy
    return speaks_toy(AutoTokenizer.from_pretrained(model, subfolder="tokenizer"))


def concept_templates(model, rng, n, concept):
    """Prompts with a `{concept}` slot. The toy speaks only its own small language (toy.py)."""
    if is_toy(model):
        from toy import augmentation_templates
        return augmentation_templates(rng, n, concept)
    templates = []
    for _ in range(n):
        words = dict(camera=rng.choice(CAMERAS), subject=rng.choice(SUBJECTS), action=rng.choice(ACTIONS),
                     place=rng.choice(PLACES), light=rng.choice(LIGHTS), style=rng.choice(STYLES))
        words.update(Subject=words["subject"][:1].upper() + words["subject"][1:], style_lower=words["style"].lower(),
                     concept="{concept}", Concept="{Concept}")
        templates.append(rng.choice(SENTENCES).format(**words))
    return templates


def fill(template, concept):
    """A template's `{concept}` slots filled; `{Concept}` (a sentence's start) capitalised."""
    return template.replace("{Concept}", concept[:1].upper() + concept[1:]).replace("{concept}", concept)


def default_preserve(model, concept):
    """What must survive erasing `concept`: for toy colours, every word of the other colours."""
    if is_toy(model):
        from toy import preserved_words
        return preserved_words(concept)
    return PRESERVE.get(concept.lower(), GENERIC_PRESERVE)


def concept_pattern(concept):
    """The concept as a whole phrase, in any case and spacing: the one test of 'this text names it'."""
    words = r"\s+".join(re.escape(w) for w in concept.split())
    return re.compile(rf"(?<!\w){words}(?!\w)", flags=re.IGNORECASE)


def substitute(prompt, concept, text):
    """The prompt with every mention of the concept replaced by `text` (removed when empty)."""
    out = concept_pattern(concept).sub(lambda _: text, prompt)
    out = re.sub(r"\s+([,.;:])", r"\1", re.sub(r"\s+", " ", out))  # no space before punctuation
    out = re.sub(r"([,;:])(?=[,.;:])", "", out).strip(" ,;:")  # "shows ." -> "shows."; ", ," -> ","
    return out[:1].upper() + out[1:] if prompt[:1].isupper() else out  # a sentence still starts as one


def refine_prompts(prompts, concept, refiner, device, dtype, tries=REFINER_TRIES):
    """Rewrite prompts with a language model on `device`, keeping only outputs that still name the concept,
    as the authors did. Returns the rewritten prompts and how many outputs were dropped."""
    from transformers import pipeline
    try:  # never trust_remote_code: the refiner's own code is not run
        generate = pipeline("text-generation", model=refiner, device=device, dtype=dtype,
                            model_kwargs={"use_safetensors": True})
    except Exception as e:
        raise UserError(f"cannot load refiner '{refiner}' ({why(e)})")
    system = REFINER_INSTRUCTIONS.format(concept=concept)
    chat = generate.tokenizer.chat_template is not None
    refined, dropped = [], 0
    for prompt in tqdm(prompts, desc="refining prompts"):
        for _ in range(tries):  # re-sample until the concept's words survive, as the authors did
            if chat:
                out = generate([{"role": "system", "content": system}, {"role": "user", "content": prompt}],
                               max_new_tokens=200, do_sample=True)[0]["generated_text"][-1]["content"]
            else:
                out = generate(f"{system}\nIdea: {prompt}\nParagraph:", max_new_tokens=200, do_sample=True,
                               return_full_text=False)[0]["generated_text"]
            out = " ".join(out.split())
            if concept_pattern(concept).search(out):
                refined.append(out)
                break
            dropped += 1
    return refined, dropped


def read_prompts(path, seed):
    """[(prompt, seed)] from a CSV with a 'prompt' column (and maybe 'seed'), or a text file, one a line."""
    if not os.path.isfile(path):
        raise UserError(f"--prompts-file {path}: no such file")
    with open(path, encoding="utf-8", newline="") as f:
        text = f.read()
    if path.lower().endswith(".csv"):
        rows = list(csv.DictReader(text.splitlines()))
        if not rows or "prompt" not in rows[0]:
            raise UserError(f"--prompts-file {path}: a CSV needs a 'prompt' column (and may have 'seed')")
        return [(r["prompt"].strip(), int(r["seed"]) if (r.get("seed") or "").strip() else seed) for r in rows
                if r["prompt"].strip()]
    return [(line.strip(), seed) for line in text.splitlines() if line.strip()]
