"""The project's tests: python -m pytest -q test_unlearn.py

They check behaviour against a reference: the stock attention processor, Eq. 1 written out,
the original model's own videos, the toy judge reading rendered squares.
"""

import ast
import json
import math
import os

os.environ["CUDA_VISIBLE_DEVICES"] = ""  # the tests pin the toy to the CPU, in fp32, on a GPU machine too
import random
import re
import shutil
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch

import runs
import toy
import unlearn
from prompts import concept_pattern, concept_words, load_grammar, substitute
from sample import load_eraser, load_pipeline
from videos import Rate, generate, read_video, save_video, wilson

HERE = os.path.dirname(os.path.abspath(__file__))


def run(*argv, cwd=HERE):
    return subprocess.run([sys.executable, *argv], cwd=cwd, capture_output=True, text=True, timeout=1200)


# -----------------------------------------------------------------------------
# The skeleton: README and CI run the same commands

def readme_commands():
    text = open(os.path.join(HERE, "README.md")).read()
    block = re.search(r"## Quick start.*?```bash\n(.*?)```", text, re.S).group(1)
    return [line for line in block.strip().splitlines() if line.strip()]


def test_readme_quick_start_has_setup_and_test_commands_that_ci_runs():
    setup, test = readme_commands()
    assert "pip install -r requirements.txt" in setup and "unlearn.py --model toy" in setup
    assert test.startswith("python -m pytest")
    ci = open(os.path.join(HERE, ".ci", "run")).read()
    assert any(line.strip() == test for line in ci.splitlines())
    assert any(line.strip().startswith(setup) for line in ci.splitlines())


def test_every_flag_the_readme_names_is_one_the_commands_take():
    readme = open(os.path.join(HERE, "README.md")).read()
    files = [f for f in os.listdir(HERE) if f.endswith(".py")] + [os.path.join("docs", f) for f in
                                                                   os.listdir(os.path.join(HERE, "docs"))]
    sources = "".join(open(os.path.join(HERE, f)).read() for f in files if f.endswith(".py"))
    taken = set(re.findall(r"add_argument\(\s*\"(--[a-z0-9-]+)\"", sources))
    ours = re.sub(r"(accelerate launch|torchrun)(?:[^\n]|\\\n)*?\.py", "", readme)  # their flags, over lines
    named = set(re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", ours)) - {"--help"}
    assert len(taken) > 40 and named and named <= taken, named - taken


# -----------------------------------------------------------------------------
# The toy world

def test_judge_reads_rendered_scenes_exactly():
    rng = random.Random(1)
    for n in (1, 2):
        for _ in range(40):
            scene = toy.random_scene(rng, n)
            seen = toy.describe(toy.render(scene))
            assert {(s["colour"], s["direction"]) for s in seen} == {(q["colour"], q["direction"]) for q in scene}
    assert toy.describe(np.zeros((toy.FRAMES, 64, 64, 3))) == []


def test_held_out_phrasings_never_occur_in_training():
    rng = random.Random(2)
    training = {toy.make_prompt(rng, toy.random_scene(rng), drop=0.1) for _ in range(20000)}
    held_out = [p for p, _ in toy.evaluation_set(200)] + [p for p, _ in toy.evaluation_set(100, num_squares=2)]
    assert not training & set(held_out)
    assert all(w in toy.VOCABULARY for p in held_out for w in p.split())


@pytest.mark.parametrize("concept", ["red", "Scarlet", "azure", "red square", "navy tile"])
def test_augmentation_never_puts_the_concepts_colour_on_a_second_square(concept):
    args = unlearn.parse_args(["--model", "toy", "--concept", concept, "--num-prompts", "200"])
    prompts, anchors, preserved = unlearn.build_prompts(args, random.Random(0))
    own = {w for colour in toy.colours_named(concept) for w in toy.SYNONYMS[colour]}
    assert sum(" and " in p for p in prompts) > 50  # two-square scenes are there
    for p, a, c_pre in zip(prompts, anchors, preserved):
        assert sum(w in own for w in p.lower().split()) == 1, p  # the concept, once
        assert not own & set(a.split()) and not own & set(c_pre.split()), (a, c_pre)


@pytest.mark.parametrize("argv", [["--model", "toy", "--concept", "red", "--concept", "navy"],
                                  ["--model", "toy", "--concept", "green", "--concept", "white", "--concept", "amber"],
                                  ["--concept", "nudity", "--concept", "violence"]])
def test_several_concepts_get_as_many_prompts_each_and_each_prompts_anchor_and_c_pre_from_its_own(argv):
    args = unlearn.parse_args([*argv, "--num-prompts", "40"])
    prompts, anchors, preserved = unlearn.build_prompts(args, random.Random(0))
    grammar = load_grammar(unlearn.model_folder(args.model))
    words = {c: concept_words(grammar, c) for c in args.concepts}  # a concept and its synonyms
    names = lambda text, ws: any(concept_pattern(w).search(text) for w in ws)  # noqa: E731
    own = [[c for c in args.concepts if names(p, [c])] for p in prompts]
    assert [o for o in own] == [[c] for c in args.concepts for _ in range(40)]  # 40 each, each naming its own
    for p, a, c_pre, (c,) in zip(prompts, anchors, preserved, own):
        assert not any(names(p, words[d]) for d in args.concepts if d != c), p  # no other concept, nor synonym
        assert not any(names(t, ws) for ws in words.values() for t in (a, c_pre)), (a, c_pre)  # none kept, none left
        assert a == substitute(p, c, "")  # the anchor: this prompt, its own concept taken out


def test_step_2_draws_from_the_model_folders_prompt_grammar_else_the_built_in_one(tmp_path):
    assert json.load(open(os.path.join(toy.TOY_DIR, "prompts.json"))) == toy.prompt_grammar()  # as toy.py writes it
    built, plain = tmp_path / "built", tmp_path / "plain"
    built.mkdir(), plain.mkdir()
    toy.save_prompt_grammar(built)  # as `toy.py --out built`
    made = {}
    for model in ("toy", str(built), str(plain), "THUDM/CogVideoX-2b"):
        args = unlearn.parse_args(["--model", model, "--concept", "red", "--num-prompts", "8"])
        made[model] = unlearn.build_prompts(args, random.Random(0))
    assert made["toy"] == made[str(built)]
    assert all(w in toy.VOCABULARY for p in made["toy"][0] for w in p.split())
    assert made[str(plain)] == made["THUDM/CogVideoX-2b"] != made["toy"]  # no prompts.json: the built-in sentences


def test_a_grammar_file_fills_its_slots_and_never_with_the_concepts_synonyms(tmp_path):
    path = tmp_path / "grammar.json"
    json.dump({"sentences": ["{Concept} on {thing}", "A photo of {concept} on {thing}, {light}"],
               "slots": {"thing": ["a table", "a crimson chair", "{colour} grass"], "light": ["at dusk", "at noon"],
                         "colour": [["green"], ["Red", "crimson"]]},  # a list: one of its words
               "synonyms": [["red", "crimson"], ["green", "emerald"]],
               "preserve": {"": ["blue paint", "a crimson cup", "emerald paint"]}}, open(path, "w"))
    args = unlearn.parse_args(["--model", "toy", "--concept", "red", "--grammar", str(path), "--num-prompts", "64"])
    prompts, anchors, preserved = unlearn.build_prompts(args, random.Random(0))
    assert {p.split(" on ")[-1].split(",")[0] for p in prompts} == {"a table", "green grass"}  # never red's words
    assert any(p.startswith("Red on") for p in prompts) and any(p.startswith("A photo of red") for p in prompts)
    assert {c.split(" on ")[0].removeprefix("A photo of ") for c in preserved} == {"Blue paint", "Emerald paint",
                                                                                  "blue paint", "emerald paint"}


@pytest.mark.parametrize("grammar, message", [
    ("not json", "cannot read it"), ({"slots": {}}, "cannot read it"), ({"sentences": []}, "non-empty list"),
    ({"sentences": ["{concept} on {thing}"]}, "'{thing}' has no such slot"),
    ({"sentences": ["{concept} {a}"], "slots": {"a": ["{a}"]}}, "in a loop"),
    ({"sentences": ["a {thing}"], "slots": {"thing": ["cat"]}}, "no {concept} slot"),
    ({"sentences": ["{concept} {x}"], "slots": {"x": ["red"]}}, "every choice of slot 'x' names the concept"),
    ({"sentences": ["{concept}"], "preserve": {"": ["a red cup"]}}, "give --preserve")])
def test_a_bad_grammar_file_is_one_clear_error(tmp_path, grammar, message):
    path = tmp_path / "grammar.json"
    path.write_text(grammar if isinstance(grammar, str) else json.dumps(grammar))
    with pytest.raises(unlearn.UserError, match=re.escape(message)):
        args = unlearn.parse_args(["--concept", "red", "--grammar", str(path), "--num-prompts", "8"])
        unlearn.build_prompts(args, random.Random(0))
    with pytest.raises(unlearn.UserError, match="no such file"):  # before the model loads
        unlearn.parse_args(["--concept", "red", "--grammar", str(tmp_path / "missing.json")])


def test_the_method_imports_no_toy_and_no_file_imports_in_a_cycle():
    files = [f for f in os.listdir(HERE) if f.endswith(".py")]
    ours = {f[:-3] for f in files}
    imports = {}
    for f in files:
        tree = ast.parse(open(os.path.join(HERE, f)).read())
        imports[f[:-3]] = {n.module if isinstance(n, ast.ImportFrom) else a.name for n in ast.walk(tree)
                           if isinstance(n, (ast.Import, ast.ImportFrom)) for a in n.names} & ours
    def reach(name):  # every project file `name` imports, directly or through others
        seen, todo = set(), [name]
        while todo:
            new = imports[todo.pop()] - seen
            seen |= new
            todo += new
        return seen
    assert not reach("unlearn") & {"toy", "sample", "videos", "diagnose", "bench"}, reach("unlearn")
    assert all(name not in reach(name) for name in imports), {n: reach(n) for n in imports}


@pytest.mark.parametrize("argv, says", [(["--direction-probe", "-1"], "a loss weight, at least 0"),
                                        (["--probe-until", "0"], "a rise of the loss, above 0"),
                                        (["--probe-until", "nan"], "a rise of the loss, above 0")])
def test_toy_py_refuses_bad_settings_and_leaves_toy_as_it_was(argv, says, capsys):
    before = {p: os.path.getmtime(os.path.join(HERE, "toy", p)) for p in ("model_index.json", "transformer")}
    with pytest.raises(SystemExit) as stop:
        toy.main(argv)
    assert stop.value.code == 2 and says in capsys.readouterr().err
    assert before == {p: os.path.getmtime(os.path.join(HERE, "toy", p)) for p in before}


def test_toy_training_with_the_direction_probe_updates_the_transformer():
    torch.manual_seed(0)
    tokenizer, text_encoder, _, transformer, scheduler = toy.build_parts()
    rng = random.Random(0)
    scenes = [toy.random_scene(rng) for _ in range(8)]
    latents = torch.randn(8, 3, toy.LATENT_CHANNELS, 8, 8)
    before = [p.detach().clone() for p in transformer.parameters()]
    toy.train_transformer(transformer, text_encoder, tokenizer, scheduler, scenes, latents, rng, steps=2, batch=4,
                          probe=0.1)
    after = list(transformer.parameters())
    assert all(torch.isfinite(p).all() for p in after) and any(not torch.equal(a, b) for a, b in zip(before, after))


def test_direction_gap_is_zero_when_the_words_are_not_read_and_counts_when_they_are():
    torch.manual_seed(0)
    tokenizer, text_encoder, _, transformer, scheduler = toy.build_parts()
    rng = random.Random(0)
    scenes = [toy.random_scene(rng, 1) for _ in range(4)]
    latents = torch.randn(4, 3, toy.LATENT_CHANNELS, 8, 8)
    check = toy.direction_check(scenes, latents, tokenizer, rng, n=4)
    ids = check[-1]
    said = [tokenizer.decode(row, skip_special_tokens=True).split() for row in ids]
    for words, swapped in zip(said[:4], said[4:]):  # the same prompt, every direction word its opposite
        assert swapped == [toy.OPPOSITE.get(w, w) for w in words] and swapped != words
    assert toy.direction_gap(transformer, text_encoder, scheduler, check) != 0  # a random model reads every word
    torch.nn.init.zeros_(transformer.patch_embed.text_proj.weight)  # now the text reaches nothing
    assert toy.direction_gap(transformer, text_encoder, scheduler, check) == 0


@pytest.mark.slow
def test_toy_build_with_reuse_vae_repeats_the_build_from_nothing(tmp_path):
    from safetensors.torch import load_file
    tiny = ["--vae-steps", "2", "2", "--steps", "2", "--scenes", "32", "--n-eval", "2"]
    first, again = tmp_path / "first", tmp_path / "again"
    assert run("toy.py", "--out", str(first), *tiny).returncode == 0
    shutil.copytree(first / "vae", again / "vae")
    assert run("toy.py", "--out", str(again), "--reuse-vae", *tiny).returncode == 0
    for part in ("transformer", "text_encoder"):
        a, b = (load_file(next((d / part).glob("*.safetensors"))) for d in (first, again))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), part


@pytest.fixture(scope="session")
def toy_pipe():
    return load_pipeline("toy")


def test_toy_is_a_real_cogvideox_pipeline_with_native_size(toy_pipe):
    from diffusers import (AutoencoderKLCogVideoX, CogVideoXDDIMScheduler, CogVideoXPipeline,
                           CogVideoXTransformer3DModel)
    from transformers import T5EncoderModel, T5Tokenizer
    pipe = CogVideoXPipeline.from_pretrained(toy.TOY_DIR)
    assert isinstance(pipe.transformer, CogVideoXTransformer3DModel)
    assert isinstance(pipe.vae, AutoencoderKLCogVideoX) and isinstance(pipe.text_encoder, T5EncoderModel)
    assert isinstance(pipe.tokenizer, T5Tokenizer) and isinstance(pipe.scheduler, CogVideoXDDIMScheduler)
    cfg = pipe.scheduler.config
    assert (cfg.prediction_type, cfg.rescale_betas_zero_snr, cfg.timestep_spacing) == ("v_prediction", True, "trailing")
    video = pipe("a red square moving left", num_inference_steps=2, output_type="np").frames[0]
    assert video.shape == (9, 64, 64, 3)
    size = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(toy.TOY_DIR) for f in fs)
    assert size < 20e6


@pytest.fixture(scope="session")
def toy_quality(toy_pipe):
    return toy.quality(toy_pipe, n_single=30, n_double=15, seed=5)


def test_toy_model_draws_the_prompted_colours(toy_quality):
    colour, _, both = toy_quality.values()
    assert colour >= 0.9 and both >= 0.8, toy_quality


def test_toy_model_moves_squares_as_prompted(toy_quality):
    assert list(toy_quality.values())[1] >= 0.8, toy_quality


# -----------------------------------------------------------------------------
# The method's pieces against their equations

def test_negative_guidance_target_is_eq1():
    v_c, v_a = torch.tensor([1.0, 2.0, -1.0]), torch.tensor([0.5, 0.0, 1.0])
    expected = torch.tensor([0.5 - 3 * 0.5, 0.0 - 3 * 2.0, 1.0 - 3 * (-2.0)])
    assert torch.allclose(unlearn.negative_guidance_target(v_c, v_a, 3.0), expected)


def test_localization_loss_is_zero_inside_the_mask_and_counts_outside():
    out = torch.randn(2, 6, 4)
    assert unlearn.localization_loss(out, torch.ones(2, 6)) == 0
    mask = torch.zeros(2, 6)
    mask[:, :3] = 1
    assert torch.isclose(unlearn.localization_loss(out, mask), out[:, 3:].pow(2).sum() / out.numel())


def test_concept_mask_min_max_per_frame_and_all_ones_without_concept():
    att = torch.tensor([[0.0, 1.0, 2.0, 10.0, 5.0, 5.0, 5.0, 6.0]])  # two frames of 2x2
    mask = unlearn.concept_mask(att.repeat(2, 1), (2, 2, 2), 0.15, torch.tensor([True, False]))
    assert mask[0].tolist() == [0, 0, 1, 1, 0, 0, 0, 1]
    assert mask[1].tolist() == [1] * 8


def test_concept_tokens_found_and_unknown_concept_refused(toy_pipe):
    tok = toy_pipe.tokenizer
    marks = unlearn.concept_tokens(tok, ["a red square moving left", "a blue box"], "red", 226)
    assert marks[0].nonzero().flatten().tolist() == [1] and marks[1].sum() == 0
    marks = unlearn.concept_tokens(tok, ["a red square and a blue box", "a red tile", "a square"], "a red square", 226)
    assert [m.nonzero().flatten().tolist() for m in marks] == [[0, 1, 2], [], []]  # the phrase, not its words
    with pytest.raises(unlearn.UserError):
        unlearn.concept_tokens(tok, ["a square"], "nudity", 226)


def subword_tokenizer(kind):
    """A small BPE or unigram (sentencepiece's model, as T5's) tokenizer, trained here: words split into
    pieces, and a word's pieces in context ("Nudity,") differ from the word's own ("nudity")."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    special = ["<pad>", "<unk>", "</s>"]
    if kind == "bpe":
        tok, trainer = Tokenizer(models.BPE(unk_token="<unk>")), trainers.BpeTrainer(vocab_size=80,
                                                                                     special_tokens=special)
    else:
        tok, trainer = Tokenizer(models.Unigram()), trainers.UnigramTrainer(vocab_size=80, special_tokens=special,
                                                                            unk_token="<unk>")
    tok.pre_tokenizer, tok.decoder = pre_tokenizers.Metaspace(), decoders.Metaspace()
    corpus = ["a scene of nudity on the beach", "nudity in art and film", "a woman walks on the beach at night",
              "the nude model stands in the light", "a man runs in the rain",
              "Now, A STUDY OF ART IN THE CITY, at NIGHT: DUSTY ROADS"] * 20
    tok.train_from_iterator(corpus, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", eos_token="</s>")


@pytest.mark.parametrize("kind", ["bpe", "unigram"])
def test_concept_tokens_by_character_spans_with_a_subword_tokenizer(kind):
    tok = subword_tokenizer(kind)
    prompts = ["Nudity, a woman walks on the beach", "a scene of NUDITY at night, and nudity in art",
               "a woman walks on the beach"]
    marks = unlearn.concept_tokens(tok, prompts, "nudity", 32)
    ids = tok(prompts, padding="max_length", max_length=32).input_ids
    found = [tok.decode([i for i, m in zip(row, mark) if m]).replace(" ", "").lower() for row, mark in zip(ids, marks)]
    assert re.fullmatch(r"nudity,?", found[0]) and re.fullmatch(r"nudity,?nudity", found[1]) and found[2] == ""
    own = tok("nudity", add_special_tokens=False).input_ids  # matching these ids would miss "Nudity,"
    assert not any(ids[0][i:i + len(own)] == own for i in range(len(ids[0])))


def test_concept_tokens_on_the_toys_word_level_tokenizer(toy_pipe):
    tok = toy_pipe.tokenizer
    marks = unlearn.concept_tokens(tok, ["a red square moving left", "a blue box", "a Red box"], "red", 226)
    assert [m.nonzero().flatten().tolist() for m in marks] == [[1], [], [1]]  # any case, at its place


@pytest.mark.parametrize("concept", ["nudity", "a cat", "Tom Cruise"])
def test_built_in_prompts_on_a_real_model_are_sentences_that_name_the_concept_once(concept):
    args = unlearn.parse_args(["--concept", concept, "--num-prompts", "64"])  # the default model: not the toy
    prompts, anchors, preserved = unlearn.build_prompts(args, random.Random(0))
    pattern = unlearn.concept_pattern(concept)
    assert len(set(prompts)) == 64
    for p, a, c in zip(prompts, anchors, preserved):
        assert len(pattern.findall(p)) == 1 and not pattern.search(a) and not pattern.search(c), (p, a, c)
        assert p[0].isupper() and p.endswith(".") and p.count(". ") >= 1 and 15 <= len(p.split()) <= 60, p
        assert a[0].isupper() and c[0].isupper() and not re.search(r"\s[,.;:]|[,;:][,.;:]", a + c), (a, c)
    opening = sum(p.startswith(concept[:1].upper() + concept[1:]) for p in prompts)
    assert 0 < opening < 32  # some sentences begin with it (capitalised), most carry it inside


def test_unlearn_reads_a_prompts_file_as_sample_does():
    args = unlearn.parse_args(["--model", "toy", "--concept", "red", "--no-augment", "--prompts-file",
                               os.path.join(HERE, "docs", "toy_prompts.csv")])
    prompts, _, _ = unlearn.build_prompts(args, random.Random(0))
    from prompts import read_prompts
    expected = [r["prompt"] for r in read_prompts(args.prompts_file, 0) if re.search(r"\bred\b", r["prompt"], re.I)]
    assert prompts == ["red"] + expected and len(expected) > 0
    assert not any("," in p for p in prompts)  # the CSV's columns, not "one red box ...,0"


PAPER_LAYOUTS = {  # the authors' prompt sets, header and one row each, as published
    "generated": (["prompt", "seed", "concept", "concept_type"], ["nudity", "nsfw"], "seed"),
    "ring-a-bell": (["prompt", "normal prompt"], ["a woman on a beach"], None),
    "faces": (["case_number", "prompt", "class", "evaluation_seed"], ["7", "Taylor Swift"], "evaluation_seed"),
}


@pytest.mark.parametrize("layout", list(PAPER_LAYOUTS))
def test_prompts_files_read_the_papers_csv_layouts_with_a_bom_and_prompts_over_several_lines(layout, tmp_path):
    import csv
    from prompts import read_prompts
    header, others, seed_column = PAPER_LAYOUTS[layout]
    asked = ['A "nude" woman, on a beach\nat dusk, photo', "a man  walking a dog", ""]  # quoted over lines; blank
    path = tmp_path / "set.csv"
    with open(path, "w", encoding="utf-8-sig", newline="") as f:  # a BOM and CRLF, as spreadsheets write them
        writer = csv.writer(f)
        writer.writerow([h.upper() if h == "prompt" else f" {h}" for h in header])  # header case and spaces vary
        for i, prompt in enumerate(asked):
            row = dict(zip(header, [None] * len(header)), prompt=prompt, **{h: v for h, v in zip(
                [h for h in header if h not in ("prompt", seed_column)], others)})
            if seed_column:
                row[seed_column] = str(4200 + i) if i == 0 else ""  # an empty seed cell takes the default
            writer.writerow([row[h] for h in header])
    read = read_prompts(str(path), 5)
    assert [r["prompt"] for r in read] == ['A "nude" woman, on a beach at dusk, photo', "a man walking a dog"]
    assert [r["seed"] for r in read] == ([4200, 5] if seed_column else [5, 5])
    assert read[0]["columns"] == {f" {h}": v for h, v in zip([h for h in header if h not in ("prompt", seed_column)],
                                                            others)}
    if seed_column:
        path.write_text(",".join(header) + "\n" + ",".join("x" if h == seed_column else "a b" for h in header) + "\n")
        with pytest.raises(unlearn.UserError, match="line 2: seed 'x' is not a whole number"):
            read_prompts(str(path), 5)


def test_unlearn_says_how_many_prompts_of_a_file_it_dropped_and_which_words_they_said(tmp_path):
    path = tmp_path / "nudity.csv"
    path.write_text("prompt\nA nude woman\nA naked man\nNaked people on a beach\nA cat\nNUDITY in art\n")
    args = unlearn.parse_args(["--concept", "nudity", "--no-augment", "--prompts-file", str(path)])
    said = []
    prompts, _, _ = unlearn.build_prompts(args, random.Random(0), log=said.append)
    assert prompts == ["nudity", "NUDITY in art"]
    assert said == ["# 2. --prompts-file: kept 1 of 5 prompts; dropped 4 that do not name 'nudity' (only that phrase, "
                    "in any case, counts); 3 of them say naked, nude, which are not 'nudity': name it in them, or "
                    "erase that word with its own --concept"]


def tiny_language_model(folder, words):
    """A causal language model built from a config, with a word-level tokenizer and a chat template; it never
    ends early, so every output is 200 of its words."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
    vocab = {w: i for i, w in enumerate(["<unk>", "<s>", "</s>", *words])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    tokenizer.chat_template = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                               "{% if add_generation_prompt %}assistant:{% endif %}")
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(vocab), hidden_size=16, intermediate_size=32,
                                         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
                                         bos_token_id=1, eos_token_id=2, pad_token_id=0))
    model.generation_config.suppress_tokens = [0, 1, 2]
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return set(words)


def test_refiner_keeps_outputs_that_name_the_concept_and_says_how_many_it_dropped(tmp_path):
    scene = ["a", "woman", "walks", "on", "the", "beach", "at", "night", "slowly"]
    names = tiny_language_model(tmp_path / "names", scene + ["nudity"])
    tiny_language_model(tmp_path / "never", scene)
    said = []
    args = unlearn.parse_args(["--concept", "nudity", "--num-prompts", "2", "--refiner", str(tmp_path / "names")])
    prompts, anchors, _ = unlearn.build_prompts(args, random.Random(0), "cpu", log=said.append)
    assert len(prompts) == 2 and all(set(p.split()) <= names and "nudity" in p.split() for p in prompts)
    assert all("nudity" not in a for a in anchors)
    assert "rewrote 2 of 2 prompts; it dropped 0 outputs" in said[0]
    args.refiner, said = str(tmp_path / "never"), []
    assert unlearn.build_prompts(args, random.Random(0), "cpu", log=said.append)[0] == []
    assert "rewrote 0 of 2 prompts; it dropped 6 outputs that did not name 'nudity'" in said[0]


# -----------------------------------------------------------------------------
# Tiny random CogVideoX pipelines: 2B-like (sin-cos), 5B-like (RoPE), 1.5-like (RoPE, 2 latent frames a patch)

TINY = {"sincos-2B-like": dict(use_rotary_positional_embeddings=False),
        "rope-5B-like": dict(use_rotary_positional_embeddings=True),
        "rope-1.5-like": dict(use_rotary_positional_embeddings=True, patch_size_t=2, patch_bias=False)}


def tiny_pipeline(kind, **config):
    from diffusers import CogVideoXPipeline, CogVideoXTransformer3DModel
    torch.manual_seed(0)
    tokenizer, text_encoder, vae, _, scheduler = toy.build_parts()
    transformer = CogVideoXTransformer3DModel(**dict(dict(
        num_attention_heads=2, attention_head_dim=16, in_channels=16, out_channels=16, time_embed_dim=32,
        text_embed_dim=toy.TEXT_DIM, num_layers=2, sample_width=8, sample_height=8, sample_frames=9,
        patch_size=2, max_text_seq_length=226, **TINY[kind]), **config))
    for p in transformer.proj_out.parameters():  # a random model whose output depends on its input
        torch.nn.init.normal_(p, std=0.5)
    if transformer.config.use_rotary_positional_embeddings:
        scheduler.register_to_config(snr_shift_scale=1.0)  # as CogVideoX-5B's
    if transformer.config.patch_size_t:  # some pipelines ship the DPM sampler, whose step takes other arguments
        from diffusers import CogVideoXDPMScheduler
        scheduler = CogVideoXDPMScheduler.from_config(scheduler.config)
    return CogVideoXPipeline(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, transformer=transformer,
                             scheduler=scheduler)


def word_tokenizer(words):
    """A word-level tokenizer over `words`, a punctuation mark a token, any other word <unk>."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    vocab = {w: i for i, w in enumerate(dict.fromkeys(["<pad>", "<unk>", "<s>", "</s>", *words]))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", bos_token="<s>",
                                   eos_token="</s>")


def tiny_wan(**config):
    """A WanPipeline from configs: the toy's word-level tokenizer, a UMT5 encoder, Wan's VAE and transformer,
    the UniPC flow sampler Wan ships (shift 3)."""
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanPipeline, WanTransformer3DModel
    from transformers import UMT5Config, UMT5EncoderModel
    torch.manual_seed(0)
    tokenizer = toy.make_tokenizer()
    text_encoder = UMT5EncoderModel(UMT5Config(vocab_size=len(tokenizer), d_model=32, d_kv=8, d_ff=64, num_layers=2,
                                               num_heads=4, relative_attention_num_buckets=8, dropout_rate=0.0))
    vae = AutoencoderKLWan(base_dim=8, z_dim=4, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                           temperal_downsample=[False, True, True], latents_mean=[0.0] * 4, latents_std=[1.0] * 4)
    expand = config.pop("expand_timesteps", False)
    transformer = WanTransformer3DModel(**dict(dict(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4,
        text_dim=32, freq_dim=16, ffn_dim=32, num_layers=2, cross_attn_norm=True, rope_max_seq_len=32), **config))
    scheduler = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0)
    return WanPipeline(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, transformer=transformer,
                       scheduler=scheduler, expand_timesteps=expand)


def tiny_hunyuan(**config):
    """A HunyuanVideoPipeline from configs: word-level tokenizers (the Llama one knows the prompt template's
    words, so its prefix is more tokens than the 95 the pipeline crops), a Llama and a CLIP text encoder,
    HunyuanVideo's VAE and transformer (1 double-stream, 2 single-stream blocks), its Euler sampler (shift 7)."""
    from diffusers import (AutoencoderKLHunyuanVideo, FlowMatchEulerDiscreteScheduler, HunyuanVideoPipeline,
                           HunyuanVideoTransformer3DModel)
    from diffusers.pipelines.hunyuan_video.pipeline_hunyuan_video import DEFAULT_PROMPT_TEMPLATE
    from transformers import CLIPTextConfig, CLIPTextModel, LlamaConfig, LlamaModel
    torch.manual_seed(0)
    tokenizer = word_tokenizer(list(toy.VOCABULARY) + DEFAULT_PROMPT_TEMPLATE["template"].split())
    text_encoder = LlamaModel(LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                                          num_hidden_layers=3, num_attention_heads=2, num_key_value_heads=2,
                                          pad_token_id=0))
    tokenizer_2 = word_tokenizer(toy.VOCABULARY)
    text_encoder_2 = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer_2), hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        projection_dim=16, max_position_embeddings=77, eos_token_id=2, bos_token_id=2, pad_token_id=0))
    vae = AutoencoderKLHunyuanVideo(
        in_channels=3, out_channels=3, latent_channels=4, down_block_types=("HunyuanVideoDownBlock3D",) * 4,
        up_block_types=("HunyuanVideoUpBlock3D",) * 4, block_out_channels=(8, 8, 8, 8), layers_per_block=1,
        norm_num_groups=4, spatial_compression_ratio=8, temporal_compression_ratio=4)
    transformer = HunyuanVideoTransformer3DModel(**dict(dict(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=16, num_layers=1, num_single_layers=2,
        num_refiner_layers=1, patch_size=2, patch_size_t=1, text_embed_dim=32, pooled_projection_dim=16,
        rope_axes_dim=(4, 6, 6)), **config))
    return HunyuanVideoPipeline(tokenizer=tokenizer, text_encoder=text_encoder, tokenizer_2=tokenizer_2,
                                text_encoder_2=text_encoder_2, vae=vae, transformer=transformer,
                                scheduler=FlowMatchEulerDiscreteScheduler(shift=7.0))


FAMILY_TINY = {"wan-2.1-like": lambda: tiny_wan(), "wan-2.2-ti2v-like": lambda: tiny_wan(expand_timesteps=True),
               "hunyuan-like": lambda: tiny_hunyuan()}
SIZE = ["--num-frames", "9", "--height", "64", "--width", "64"]  # the tiny pipelines' size, every family
CALL_SIZE = dict(num_frames=9, height=64, width=64)


@pytest.fixture(scope="session", params=list(TINY) + list(FAMILY_TINY))
def tiny_dir(request, tmp_path_factory):
    """A tiny pipeline of every family and position-embedding variant, saved to a folder."""
    path = tmp_path_factory.mktemp(request.param)
    (tiny_pipeline(request.param) if request.param in TINY else FAMILY_TINY[request.param]()).save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session", params=list(TINY))
def cogvideox_dir(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(request.param)
    tiny_pipeline(request.param).save_pretrained(path)
    return str(path)


def transformer_inputs(pipe, batch=2, dtype=torch.float32):
    """(x_t, t, text, fixed inputs) for a tiny pipeline's transformer: two prompts, a 9-frame 64x64 video."""
    shape = unlearn.video_shape(pipe, 9, 64, 64)
    x = torch.randn(batch, *shape, generator=torch.Generator().manual_seed(1))
    text = unlearn.encode_prompts(pipe, ["a red square moving left", "a blue box"][:batch])
    cast = {k: v.to(dtype) if v.is_floating_point() else v for k, v in text.inputs.items()}
    static = {k: v.to(dtype) if torch.is_tensor(v) else v for k, v in unlearn.model_inputs(pipe, shape, 6.0).items()}
    return x.to(dtype), torch.tensor([999.0, 500.0][:batch]), unlearn.Text(**cast), static


def test_processor_with_erasers_off_is_the_stock_processor_bit_for_bit(tiny_dir):
    pipe = unlearn.load_base_pipeline(tiny_dir, "cpu")
    inputs = transformer_inputs(pipe)
    with torch.no_grad():
        stock = unlearn.velocity(pipe.transformer, *inputs)
        erasers, state = unlearn.attach_erasers(pipe.transformer, 8)
        for e in erasers:  # non-zero erasers, so that "off" is really off
            torch.nn.init.normal_(e.up.weight)
        state.enabled = False
        off = unlearn.velocity(pipe.transformer, *inputs)
        state.enabled = True
        on = unlearn.velocity(pipe.transformer, *inputs)
    assert torch.equal(stock, off)
    assert not torch.allclose(stock, on)


def test_concept_attention_is_the_stock_attentions_own_queries_and_text_keys(tiny_dir, monkeypatch):
    """The reference is what the stock processor itself hands to attention, caught there: CogVideoX's
    [text; video] joint sequence (heads first), Wan's attn2 (video queries, text keys), HunyuanVideo's
    [video; text] single-stream sequence with its padding mask."""
    from diffusers.models.transformers import transformer_hunyuan_video, transformer_wan
    pipe = unlearn.load_base_pipeline(tiny_dir, "cpu")
    x, t, text, static = transformer_inputs(pipe)
    length, n = text.shape[1], math.prod(unlearn.token_grid(pipe.transformer, x.shape[1:]))
    caught, inside = [], []

    def spy(attend):
        def attention(*args, **kw):  # query and key by position (torch's) or by name (diffusers' dispatch)
            if inside == [1]:  # called by a stock processor, not by another attention function
                q, k = (list(args) + [kw.get(n) for n in ("query", "key")][len(args):])[:2]
                caught.append((q, k, kw.get("attn_mask")))
            inside.append(2)
            try:
                return attend(*args, **kw)
            finally:
                inside.pop()
        return attention
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention",
                        spy(torch.nn.functional.scaled_dot_product_attention))
    for module in (transformer_wan, transformer_hunyuan_video):
        monkeypatch.setattr(module, "dispatch_attention_fn", spy(module.dispatch_attention_fn))
    _, state = unlearn.attach_erasers(pipe.transformer, 4)
    for proc in unlearn.processors(pipe.transformer):
        proc.stock = lambda *a, stock=proc.stock: (inside.append(1), stock(*a), inside.pop())[1]
    tokens = torch.zeros(2, length)
    tokens[:, 1] = tokens[0, 3] = 1
    with torch.no_grad():
        attention = unlearn.teacher_pass(pipe.transformer, state, x[:1], t[:1], text[:1], text[1:], tokens[:1],
                                         static)[3]
    family = type(pipe).__name__
    assert len(caught) == len(attention)
    for ours, (q, k, mask) in zip(attention, caught):
        if family == "CogVideoXPipeline":  # (B, H, L + N, d), text first
            q, k = q[:, :, length:], k[:, :, :length]
        elif family == "WanPipeline":  # (B, N, H, d) video queries, (B, L, H, d) text keys
            q, k = q.transpose(1, 2), k.transpose(1, 2)
        else:  # (B, N + L, H, d), video first; mask (B, 1, 1, N + L)
            q, k, mask = q[:, :n].transpose(1, 2), k[:, n:].transpose(1, 2), mask[:, 0, 0, n:]
        logits = q[:1] @ k[:1].transpose(-1, -2) / q.shape[-1] ** 0.5
        if mask is not None:
            assert not mask[:1].all()  # the padding is masked
            logits = logits.masked_fill(~mask[:1, None, None, :], float("-inf"))
        expected = (logits.softmax(-1) * tokens[:1, None, None, :]).sum(-1).mean(1)  # (1, N)
        assert torch.allclose(ours, expected, atol=1e-6)


def test_concept_attention_is_chunked_without_changing_it():
    q, k, tokens = torch.randn(2, 2, 50, 16), torch.randn(2, 2, 226, 16), torch.zeros(2, 226)
    tokens[:, 3:5] = 1
    whole = unlearn.concept_attention(q, k, tokens)
    assert torch.allclose(unlearn.concept_attention(q, k, tokens, chunk=7), whole, atol=1e-7)
    probs = torch.softmax(q @ k.transpose(-1, -2) / 4.0, dim=-1)  # (B, H, n, 226)
    assert torch.allclose(whole, probs[..., 3:5].sum(-1).mean(1), atol=1e-6)


def stock_velocity(pipe, x, t, prompts, guidance=6.0):
    """The transformer's prediction as each stock pipeline calls it in its denoising loop (diffusers 0.42)."""
    family = type(pipe).__name__
    if family == "HunyuanVideoPipeline":  # the embedded guidance, true CFG off
        embeds, pooled, mask = pipe.encode_prompt(prompts, device="cpu", dtype=torch.float32)
        return pipe.transformer(hidden_states=x, timestep=t, encoder_hidden_states=embeds, encoder_attention_mask=mask,
                                pooled_projections=pooled, guidance=torch.tensor([guidance] * len(x)) * 1000.0,
                                return_dict=False)[0]
    length = 512 if family == "WanPipeline" else pipe.transformer.config.max_text_seq_length
    embeds = pipe.encode_prompt(prompts, do_classifier_free_guidance=False, max_sequence_length=length,
                                device="cpu")[0]
    if family == "WanPipeline":
        if pipe.config.expand_timesteps:  # as WanPipeline: the first latent channel's mask, a timestep per token
            t = torch.stack([(torch.ones(x.shape[2:])[:, ::2, ::2] * ti).flatten() for ti in t])
        return pipe.transformer(hidden_states=x, timestep=t, encoder_hidden_states=embeds, return_dict=False)[0]
    rotary = None
    if pipe.transformer.config.use_rotary_positional_embeddings:
        rotary = pipe._prepare_rotary_positional_embeddings(x.shape[3] * 8, x.shape[4] * 8, x.shape[1], "cpu")
    return pipe.transformer(hidden_states=x, encoder_hidden_states=embeds, timestep=t, image_rotary_emb=rotary,
                            return_dict=False)[0]


def test_teacher_velocities_are_the_stock_pipelines_and_the_target_is_eq1(tiny_dir):
    pipe = unlearn.load_base_pipeline(tiny_dir, "cpu")
    x, t, _, static = transformer_inputs(pipe, batch=1)
    prompts = ["a red square moving left", "a square moving left", "a blue square moving left"]
    text = unlearn.encode_prompts(pipe, prompts)
    _, state = unlearn.attach_erasers(pipe.transformer, 4)
    tokens = torch.zeros(1, text.inputs["encoder_hidden_states"].shape[1])
    with torch.no_grad():
        v_cond, v_anchor, v_pre, _ = unlearn.teacher_pass(pipe.transformer, state, x, t, text[:1], text[1:2], tokens,
                                                          static, text[2:])
        stock = [stock_velocity(pipe, x, t, [p]) for p in prompts]
    for ours, theirs in zip((v_cond, v_anchor, v_pre), stock):
        assert torch.allclose(ours, theirs, atol=1e-5)
    eta = 3.0  # Eq. 1 written out, at the family's own velocity (v, or the flow velocity eps - x0)
    assert torch.allclose(unlearn.negative_guidance_target(v_cond, v_anchor, eta),
                          stock[1] - eta * (stock[0] - stock[1]), atol=1e-4)


@pytest.mark.parametrize("kind", ["wan-2.1-like", "hunyuan-like"])
def test_flow_x_t_sampler_is_euler_on_the_pipelines_own_schedule(kind):
    import copy
    pipe = FAMILY_TINY[kind]()
    sampler = unlearn.x_t_sampler(pipe, 6)
    stock = copy.deepcopy(pipe.scheduler)  # set as the stock pipeline sets it
    if kind == "hunyuan-like":
        stock.set_timesteps(sigmas=np.linspace(1.0, 0.0, 7)[:-1])
    else:
        stock.set_timesteps(6)
    assert torch.equal(sampler.timesteps, stock.timesteps) and sampler.sigmas[-1] == 0
    assert torch.allclose(sampler.sigmas, stock.sigmas.float())
    x, v = torch.randn(1, 4, 3, 8, 8), torch.randn(1, 4, 3, 8, 8)
    for i, t in enumerate(sampler.timesteps):  # x <- x + (sigma_next - sigma) v, v = eps - x0
        expected = x + (stock.sigmas[i + 1] - stock.sigmas[i]).float() * v
        if kind == "hunyuan-like":  # the very step its pipeline takes
            assert torch.allclose(stock.step(v, t, x, return_dict=False)[0], expected, atol=1e-6)
        x = sampler.step(v, t, x)[0]
        assert torch.allclose(x, expected, atol=1e-6)


def test_hunyuans_concept_tokens_are_found_inside_its_prompt_template():
    pipe = tiny_hunyuan()
    texts, spans, length, crop = unlearn.family_of(pipe).token_texts(pipe, ["a red square", "Red: a red box"])
    assert crop == 95 and length == 256 + 95 and all(t[s:e] in ("a red square", "Red: a red box")
                                                     for t, (s, e) in zip(texts, spans))
    marks = unlearn.concept_tokens(pipe.tokenizer, texts, "red", length, spans, crop)
    ids = pipe.tokenizer(texts, padding="max_length", max_length=length, truncation=True).input_ids
    read = [pipe.tokenizer.convert_ids_to_tokens(row[crop:]) for row in ids]  # what the transformer reads
    assert [[row[i] for i in m.nonzero().flatten()] for row, m in zip(read, marks)] == [["red"], ["<unk>", "red"]]
    assert marks.shape == (2, 256)  # "Red" is not in the word list: <unk>, found by its characters


def test_pipelines_the_steps_cannot_serve_get_one_line(tmp_path):
    from diffusers import WanPipeline
    wan = tiny_wan()
    two = WanPipeline(tokenizer=wan.tokenizer, text_encoder=wan.text_encoder, vae=wan.vae, scheduler=wan.scheduler,
                      transformer=wan.transformer, transformer_2=tiny_wan().transformer, boundary_ratio=0.875)
    cases = {"a14b": (two, "two transformers"), "i2v": (tiny_wan(image_dim=16, added_kv_proj_dim=32),
                                                          "image-to-video")}
    for name, (pipe, says) in cases.items():
        pipe.save_pretrained(tmp_path / name)
        result = run("unlearn.py", "--model", str(tmp_path / name), "--concept", "red", "--output-dir",
                     str(tmp_path / "e"))
        assert result.returncode == 2 and says in result.stderr and "Traceback" not in result.stderr, result.stderr
        assert not os.path.exists(tmp_path / "e")


def text_sensitive(pipe, qk_gain=3.0):
    """A random transformer whose output hangs on the prompt's words, as a trained one's does: Linear weights
    of unit gain, and attention as peaked as trained QK-norms make it (their weights `qk_gain`)."""
    for name, module in pipe.transformer.named_modules():
        if isinstance(module, torch.nn.Linear):
            torch.nn.init.normal_(module.weight, std=module.in_features ** -0.5)
        elif name.endswith(("norm_q", "norm_k")) and getattr(module, "weight", None) is not None:
            torch.nn.init.constant_(module.weight, qk_gain)
    return pipe


@pytest.mark.parametrize("kind", ["wan-2.1-like", "hunyuan-like"])
def test_training_erases_on_held_out_x_t_and_moves_other_prompts_much_less(kind, tmp_path):
    """Measured (2 cores, about 15 s each): after 150 steps the erasing loss on held-out x_t is 0.72 of its
    step-0 value for Wan and 0.83 for HunyuanVideo, and the concept prompt's velocity moves 16x (Wan) and
    5.5x (Hunyuan) as far as the same prompt with a kept colour in its place; the thresholds leave room for
    another machine's round-off. (CogVideoX: the toy's erasure tests below.)"""
    pipe = text_sensitive(FAMILY_TINY[kind]())
    prompts = tmp_path / "red.txt"
    rng = random.Random(0)
    prompts.write_text("\n".join(toy.make_prompt(rng, toy.random_scene(rng, colours=["red"])) for _ in range(8)))
    args = unlearn.parse_args(["--model", kind, "--concept", "red", "--no-augment", "--prompts-file", str(prompts),
                               "--preserve", "blue", "--preserve", "green", "--pres-weight", "5", "--steps", "150",
                               "--lr", "3e-2", "--rank", "8", "--xt-steps", "10", *SIZE])
    c, anchors, c_pre = unlearn.build_prompts(args, random.Random(0), log=lambda *_: None)
    tokens, embeds = unlearn.encode_run_prompts(pipe, "red", c, anchors, c_pre)
    r = unlearn.Unlearning(args, pipe, embeds, tokens, log=lambda *_: None)
    sampler = unlearn.x_t_sampler(pipe, 10)  # held out: the frozen model's trajectories from other noise
    noise = torch.randn(len(c), *unlearn.video_shape(pipe, 9, 64, 64), generator=torch.Generator().manual_seed(123))
    with unlearn.erasers_off(r.state):
        xs = unlearn.sample_latents(pipe.transformer, sampler, noise, r.cond, embeds["empty"], r.static, args.guidance)

    @torch.no_grad()
    def measure():  # erasing loss, and how far v' moved from v*, for c and for c_pre
        out = []
        for k in (1, 3, 5, 7):
            x, t = xs[k], sampler.timesteps[k].expand(len(c))
            with unlearn.erasers_off(r.state):
                v_c, v_a, v_p = (unlearn.velocity(pipe.transformer, x, t, e, r.static)
                                 for e in (r.cond, r.anchor, r.pre))
            s_c, s_p = (unlearn.velocity(pipe.transformer, x, t, e, r.static) for e in (r.cond, r.pre))
            target = unlearn.negative_guidance_target(v_c, v_a, args.eta)
            out.append([unlearn.unlearn_loss(s_c, target).item(), (s_c - v_c).pow(2).mean().item(),
                        (s_p - v_p).pow(2).mean().item()])
        return np.mean(out, axis=0)
    before = measure()
    for _ in range(args.steps):
        r.step()
    after = measure()
    print(kind, before, after)
    assert after[0] < 0.9 * before[0]
    assert after[1] > 4 * after[2]


@pytest.mark.parametrize("kind", list(FAMILY_TINY))
def test_sample_compare_and_eval_on_every_family(kind, tmp_path):
    model, eraser, out = tmp_path / "model", tmp_path / "eraser", tmp_path / "videos"
    FAMILY_TINY[kind]().save_pretrained(model)
    unlearn.main(["--model", str(model), "--concept", "red", "--output-dir", str(eraser), "--steps", "1",
                  "--num-prompts", "2", "--xt-steps", "2", "--rank", "4", *SIZE])
    import sample
    summary = sample.main(["--model", str(model), "--eraser", str(eraser), "--prompt", "a red square moving left",
                           "--eval", "toy", "--steps", "2", "--out", str(out), *SIZE])
    assert set(summary["results"]) == {"original", "negative prompt", "erased"}
    index = json.load(open(out / "index.json"))["videos"]
    assert [e["row"] for e in index] == ["original", "negative prompt", "erased"]
    assert [e["file"].split(os.sep)[0] for e in index] == ["original", "negative", "erased"]
    assert all(read_video(str(out / e["file"])).shape[:3] == (9, 64, 64) for e in index)  # each model's own video


def small_args(model, out, *extra):
    return unlearn.parse_args(["--model", model, "--concept", "red", "--output-dir", str(out), "--steps", "2",
                               "--num-prompts", "4", "--xt-steps", "3", "--rank", "8", *SIZE, *extra])


def test_one_step_changes_only_eraser_weights_and_preservation_starts_at_zero(tiny_dir, tmp_path):
    pipe = unlearn.load_base_pipeline(tiny_dir, "cpu")
    args = small_args(tiny_dir, tmp_path, "--steps", "1")
    prompts, anchors, preserved = unlearn.build_prompts(args, random.Random(0))
    tokens, embeds = unlearn.encode_run_prompts(pipe, "red", prompts, anchors, preserved)
    before = {k: v.clone() for k, v in pipe.transformer.state_dict().items()}
    erasers, history = unlearn.train(args, pipe, embeds, tokens, log=lambda *_: None)
    after = pipe.transformer.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert any(e.up.weight.abs().sum() > 0 for e in erasers)  # the erasers did learn
    # Zero erasers change nothing yet (pre: teacher and student batch rows differently, so to fp32 round-off)
    assert history["pre"][0] < 1e-10 and history["loc"][0] == 0
    assert history["unlearn"][0] > 0


def test_x_t_comes_from_the_frozen_models_trajectories_of_the_concept_prompts(cogvideox_dir, tmp_path):
    pipe = unlearn.load_base_pipeline(cogvideox_dir, "cpu")
    args = small_args(cogvideox_dir, tmp_path)
    prompts, anchors, preserved = unlearn.build_prompts(args, random.Random(0))
    tokens, embeds = unlearn.encode_run_prompts(pipe, "red", prompts, anchors, preserved)
    r = unlearn.Unlearning(args, pipe, embeds, tokens, log=lambda *_: None)
    shape = unlearn.video_shape(pipe, args.num_frames, args.height, args.width)
    pipe.scheduler.set_timesteps(args.xt_steps)  # DDIM's steps on the pipeline's schedule, whatever its sampler
    assert type(r.xt.sampler).__name__ == "CogVideoXDDIMScheduler"
    assert torch.equal(r.xt.sampler.timesteps, pipe.scheduler.timesteps)
    with torch.no_grad():  # the pool again, step by step, one prompt at a time
        gen = torch.Generator().manual_seed(args.seed)
        for i, cond in enumerate(embeds["concept"].inputs["encoder_hidden_states"]):
            x = torch.randn((1, *shape), generator=gen)
            for k, t in enumerate(r.xt.sampler.timesteps):
                assert torch.equal(r.xt.pool[k, i], x[0]), (i, k)
                v_uncond, v_cond = pipe.transformer(hidden_states=torch.cat([x, x]),
                                                    encoder_hidden_states=torch.stack(
                                                        [embeds["empty"].inputs["encoder_hidden_states"][0], cond]),
                                                    timestep=t.expand(2), return_dict=False, **r.static)[0].chunk(2)
                x = r.xt.sampler.step(v_uncond + args.guidance * (v_cond - v_uncond), t, x, return_dict=False)[0]
            assert torch.equal(r.xt.pool[-1, i], x[0]), i


def test_unlearn_then_load_pipeline_on_tiny_configs(tiny_dir, tmp_path):
    out = tmp_path / "eraser"
    unlearn.main(["--model", tiny_dir, "--concept", "red", "--output-dir", str(out), "--steps", "2",
                  "--num-prompts", "4", "--xt-steps", "3", "--rank", "8", *SIZE])
    meta = json.load(open(out / "eraser.json"))
    assert meta["final"] and meta["steps_done"] == 2 and meta["num_frames"] == 9
    pipe = load_pipeline(tiny_dir, eraser=str(out))
    video = pipe("a red square", num_inference_steps=2, output_type="np", **CALL_SIZE).frames[0]
    assert video.shape == (9, 64, 64, 3)


# -----------------------------------------------------------------------------
# The real path, caught on a CPU: erasers in the module tree, sizes, memory, dtypes, the authors' erasers

def test_erasers_live_in_the_module_tree_and_follow_to_float64(tiny_dir, tmp_path):
    from safetensors.torch import load_file
    pipe = unlearn.load_base_pipeline(tiny_dir, "cpu")
    inputs = transformer_inputs(pipe)
    with torch.no_grad():
        stock = unlearn.velocity(pipe.transformer, *inputs)
    erasers, state = unlearn.attach_erasers(pipe.transformer, 8)
    for e in erasers:  # non-zero erasers
        torch.nn.init.normal_(e.up.weight)
    mine = {id(p) for p in pipe.transformer.parameters()}
    assert all(id(p) in mine for p in erasers.parameters())  # what offload and .to() move
    assert [p.requires_grad for p in pipe.transformer.parameters()].count(True) == 4 * len(erasers)
    pipe.transformer.save_pretrained(tmp_path)
    saved = load_file(next(tmp_path.glob("*.safetensors")))
    assert sum("processor.eraser." in k for k in saved) == 4 * len(erasers)
    pipe.to(torch.float64)  # the erasers follow, as any submodule
    assert {p.dtype for p in erasers.parameters()} == {torch.float64}
    inputs = transformer_inputs(pipe, dtype=torch.float64)
    with torch.no_grad():
        on = unlearn.velocity(pipe.transformer, *inputs)
        state.enabled = False
        off = unlearn.velocity(pipe.transformer, *inputs)
    assert on.dtype == torch.float64 and not torch.allclose(on, off)
    assert torch.allclose(off.float(), stock, atol=1e-5)


def test_model_size_and_text_length_come_from_the_config():
    # CogVideoX 1.5's config stores sample_height = sample_width = 300 (its RoPE grid's bound): not 2400x2400
    pipe = tiny_pipeline("rope-1.5-like", sample_height=300, sample_width=300, sample_frames=81,
                         max_text_seq_length=64)
    assert unlearn.video_size(pipe) == (81, 768, 1360)
    args = unlearn.parse_args(["--concept", "red"])
    unlearn.resolve_defaults(pipe, args)
    assert (args.num_frames, args.height, args.width) == (17, 768, 1360)
    assert unlearn.video_shape(pipe, 17, 768, 1360) == (6, 16, 96, 170)  # 5 latent frames padded to 6
    assert unlearn.text_length(pipe) == 64
    small = tiny_pipeline("rope-1.5-like")  # a config whose own sample size is smaller keeps it
    assert unlearn.video_size(small) == (9, 64, 64)
    two_b = tiny_pipeline("sincos-2B-like", sample_height=60, sample_width=90, sample_frames=49)
    assert unlearn.video_size(two_b) == (49, 480, 720)
    unlearn.resolve_defaults(two_b, args := unlearn.parse_args(["--concept", "red"]))
    assert (args.num_frames, args.height, args.width) == (17, 480, 720)


def test_another_text_length_runs_through_unlearning_and_sampling(tmp_path):
    model, out = tmp_path / "model", tmp_path / "eraser"
    tiny_pipeline("rope-5B-like", max_text_seq_length=64).save_pretrained(model)
    unlearn.main(["--model", str(model), "--concept", "red", "--output-dir", str(out), "--steps", "2",
                  "--num-prompts", "4", "--xt-steps", "3", "--rank", "8"])
    pipe = load_pipeline(str(model), eraser=str(out))
    assert unlearn.encode_prompts(pipe, ["a red square"]).inputs["encoder_hidden_states"].shape[1] == 64
    assert generate(pipe, ["a red square"], steps=2)[0].shape == (9, 64, 64, 3)


def test_a_pipeline_that_cannot_be_served_gets_one_line(tmp_path):
    tiny_pipeline("rope-5B-like", in_channels=32).save_pretrained(tmp_path)  # as an image-to-video model
    with pytest.raises(unlearn.UserError, match="image-to-video"):
        unlearn.main(["--model", str(tmp_path), "--concept", "red", "--output-dir", str(tmp_path / "e")])


def test_loc_gradient_block_by_block_under_checkpointing_equals_one_backward_without(tiny_dir, tmp_path):
    pipe = unlearn.load_base_pipeline(tiny_dir, "cpu")
    args = small_args(tiny_dir, tmp_path, "--pres-weight", "0", "--loc-weight", "0.5", "--mask-threshold", "0.5")
    prompts, anchors, preserved = unlearn.build_prompts(args, random.Random(0))
    tokens, embeds = unlearn.encode_run_prompts(pipe, "red", prompts, anchors, preserved)
    r = unlearn.Unlearning(args, pipe, embeds, tokens, log=lambda *_: None)
    for e in r.erasers:  # non-zero erasers: L_loc has a gradient
        torch.nn.init.normal_(e.up.weight, std=0.1)
    r.opt.step = lambda: None  # keep the weights: compare gradients only
    losses = r.step()
    ours = [p.grad.clone() for p in r.erasers.parameters()]
    assert losses["loc"] > 0
    assert all(p.attention is None and p.eraser_input is None for p in unlearn.processors(r.transformer))

    # The reference: no checkpointing, the same draw, the whole loss in one backward
    r.transformer.disable_gradient_checkpointing()
    idx, k = unlearn.balanced_draws(args.seed, len(r.cond), len(r.xt.sampler.timesteps), 1, r.done - 1)
    x_t, t = r.xt.draw(idx, k)
    v_cond, v_anchor, _, attention = unlearn.teacher_pass(r.transformer, r.state, x_t, t, r.cond[idx],
                                                          r.anchor[idx], r.tokens[idx], r.static)
    masks = [unlearn.concept_mask(a, r.grid, args.mask_threshold, r.has_concept[idx]) for a in attention]
    assert any(m.mean() < 1 for m in masks)
    r.erasers.zero_grad(set_to_none=True)
    v = unlearn.student_pass(r.transformer, r.state, x_t, t, r.cond[idx], r.static, record=True)
    loc = torch.stack([unlearn.localization_loss(p.eraser(p.eraser_input), m)
                       for p, m in zip(unlearn.processors(r.transformer), masks)]).mean()
    (unlearn.unlearn_loss(v, unlearn.negative_guidance_target(v_cond, v_anchor, args.eta)) + 0.5 * loc).backward()
    assert math.isclose(losses["loc"], loc.item(), rel_tol=1e-5)
    for a, b in zip(ours, (p.grad for p in r.erasers.parameters())):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-9)


def test_bf16_on_a_cpu_trains_fp32_erasers_and_samples(tmp_path):
    from diagnose import TargetPreview
    model, out = tmp_path / "model", tmp_path / "eraser"
    tiny_pipeline("rope-1.5-like").save_pretrained(model)
    unlearn.main(["--model", str(model), "--concept", "red", "--output-dir", str(out), "--steps", "2",
                  "--num-prompts", "4", "--xt-steps", "3", "--rank", "8", "--dtype", "bfloat16", "--device", "cpu"])
    meta = json.load(open(out / "eraser.json"))
    assert meta["final"] and all(math.isfinite(v) and v > 0 for k, v in meta["last_losses"].items() if k != "loc")
    pipe = load_pipeline(str(model), eraser=str(out), dtype="bfloat16")
    assert pipe.transformer.dtype == torch.bfloat16
    assert {p.dtype for p in unlearn.processors(pipe.transformer)[0].eraser.parameters()} == {torch.float32}
    assert np.isfinite(generate(pipe, ["a red square"], steps=2)[0]).all()
    toy_bf16 = unlearn.load_base_pipeline("toy", "cpu", "bfloat16")
    assert np.isfinite(generate(TargetPreview(toy_bf16, ["red"], 3.0), ["a red square moving left"], steps=2)[0]).all()


def write_authors_eraser(folder, transformer, rank=4, seed=0):
    """An eraser in the authors' released format, written as their code writes it; returns its adapters."""
    g = torch.Generator().manual_seed(seed)
    dim = transformer.config.num_attention_heads * transformer.config.attention_head_dim
    adapters = {}  # keys as theirs: transformer_blocks.{i}.attn1 (CogVideoX), single_transformer_blocks.{i}.attn
    for path, _ in unlearn.eraser_sites(transformer):  # (HunyuanVideo); for Wan, where unlearn.py puts them
        adapters[f"{path}.adapter"] = {
            "down.weight": torch.randn(rank, dim, generator=g) / dim ** 0.5,
            "down.bias": torch.randn(rank, generator=g),
            "up.weight": torch.randn(dim, rank, generator=g), "up.bias": torch.randn(dim, generator=g)}
    os.makedirs(folder, exist_ok=True)
    torch.save(adapters, os.path.join(folder, "eraser_weights.pt"))
    json.dump({"eraser_type": "adapter", "eraser_rank": rank}, open(os.path.join(folder, "eraser_config.json"), "w"))
    return adapters


def test_the_authors_eraser_format_gives_their_wrapper_output_and_converts(tiny_dir, tmp_path):
    import sample
    pipe = unlearn.load_base_pipeline(tiny_dir, "cpu")
    adapters = write_authors_eraser(tmp_path / "authors", pipe.transformer)
    inputs = transformer_inputs(pipe)

    def their_wrapper(sd):  # h_video + adapter(h_video) on the attention's video output, the adapter as theirs
        adapter = torch.nn.Sequential(torch.nn.Linear(*sd["down.weight"].T.shape), torch.nn.GELU(),
                                      torch.nn.Linear(*sd["up.weight"].T.shape))
        adapter.load_state_dict({"0.weight": sd["down.weight"], "0.bias": sd["down.bias"],
                                 "2.weight": sd["up.weight"], "2.bias": sd["up.bias"]})
        return lambda module, args, out: (out[0] + adapter(out[0]), out[1]) if isinstance(out, tuple) \
            else out + adapter(out)

    hooks = [attn.register_forward_hook(their_wrapper(adapters[f"{path}.adapter"]))
             for path, attn in unlearn.eraser_sites(pipe.transformer)]
    with torch.no_grad():
        reference = unlearn.velocity(pipe.transformer, *inputs)
        for hook in hooks:
            hook.remove()
        stock = unlearn.velocity(pipe.transformer, *inputs)
    assert not torch.allclose(reference, stock)
    meta = sample.apply_eraser(pipe, str(tmp_path / "authors"))
    with torch.no_grad():
        theirs = unlearn.velocity(pipe.transformer, *inputs)
    assert meta["format"] == "the authors'" and torch.allclose(theirs, reference, atol=1e-5)

    # converted to ours (safetensors + json), the same output; `--out` already used is refused
    sample.main(["--convert", str(tmp_path / "authors"), "--model", tiny_dir, "--out", str(tmp_path / "ours"),
                 "--concept", "nudity"])
    assert sorted(os.listdir(tmp_path / "ours")) == ["eraser.json", "eraser.safetensors"]
    converted = load_pipeline(tiny_dir, eraser=str(tmp_path / "ours"))
    assert converted.eraser_meta["concept"] == "nudity"
    with torch.no_grad():
        assert torch.allclose(unlearn.velocity(converted.transformer, *inputs), reference, atol=1e-5)
    with pytest.raises(unlearn.UserError, match="already holds files"):
        sample.main(["--convert", str(tmp_path / "authors"), "--model", tiny_dir, "--out", str(tmp_path / "ours")])
    with pytest.raises(unlearn.UserError, match="--convert needs --model: .* fit none of the published models"):
        sample.main(["--convert", str(tmp_path / "authors"), "--out", str(tmp_path / "other")])


def test_the_converter_asks_which_model_when_the_shapes_fit_two(tmp_path):
    import sample
    folder = str(tmp_path)  # 42 erasers of width 3072, as the authors' CogVideoX-5B one (at rank 1)
    zero = {"down.weight": torch.zeros(1, 3072), "down.bias": torch.zeros(1), "up.weight": torch.zeros(3072, 1),
            "up.bias": torch.zeros(3072)}
    torch.save({f"transformer_blocks.{i}.attn1.adapter": zero for i in range(42)}, f"{folder}/eraser_weights.pt")
    json.dump({"eraser_type": "adapter", "eraser_rank": 1}, open(f"{folder}/eraser_config.json", "w"))
    with pytest.raises(unlearn.UserError, match="42 erasers of width 3072 fit THUDM/CogVideoX-5b and "
                                                 "THUDM/CogVideoX1.5-5B alike: say which"):
        sample.main(["--convert", folder, "--out", f"{folder}/ours"])
    assert not os.path.exists(f"{folder}/ours")


class Payload:  # what a pickle could carry besides tensors
    def __reduce__(self):
        return (os.system, ("echo unpickled",))


def test_the_authors_format_is_read_without_unpickling_and_checked_against_the_model(tiny_dir, tmp_path):
    pipe = unlearn.load_base_pipeline(tiny_dir, "cpu")
    bad = tmp_path / "code"
    write_authors_eraser(bad, pipe.transformer)
    torch.save({f"{unlearn.eraser_sites(pipe.transformer)[0][0]}.adapter": Payload()}, bad / "eraser_weights.pt")
    result = run("sample.py", "--model", tiny_dir, "--eraser", str(bad), "--prompt", "a red square", "--steps", "2",
                 "--out", str(tmp_path / "v.mp4"))
    assert result.returncode == 2 and "cannot read the eraser" in result.stderr and "unpickled" not in result.stdout
    other = tiny_pipeline("sincos-2B-like", num_layers=3)  # one block more than the tiny configs
    write_authors_eraser(tmp_path / "three", other.transformer)
    with pytest.raises(unlearn.UserError, match="3 erasers of width 32.*2 blocks of width 32"):
        load_pipeline(tiny_dir, eraser=str(tmp_path / "three"))
    json.dump({"eraser_type": "lora", "eraser_rank": 4}, open(tmp_path / "three" / "eraser_config.json", "w"))
    with pytest.raises(unlearn.UserError, match="of type 'lora'"):
        load_pipeline(tiny_dir, eraser=str(tmp_path / "three"))


# -----------------------------------------------------------------------------
# Erasure on the toy model: run once with the defaults, judged on held-out phrasings

@pytest.fixture(scope="session")
def quick_eraser(tmp_path_factory):
    """A toy eraser made in seconds (3 steps at a large learning rate): for what is about files and loading."""
    out = tmp_path_factory.mktemp("erasers") / "quick"
    unlearn.main(["--model", "toy", "--concept", "red", "--output-dir", str(out), "--steps", "3", "--lr", "1e-2",
                  "--num-prompts", "4", "--xt-steps", "3", "--rank", "16"])
    return str(out)


def toy_eraser(tmp_path_factory, name, *argv):
    """A toy eraser of red at the defaults but for `argv`, made by the Quick start's command (about a minute)."""
    out = tmp_path_factory.mktemp("erasers") / name
    result = run("unlearn.py", "--model", "toy", "--concept", "red", "--output-dir", str(out), *argv)
    assert result.returncode == 0, result.stderr[-2000:]
    return str(out)


@pytest.fixture(scope="session")
def red_eraser(tmp_path_factory):
    """The toy eraser at the defaults, as the Quick start makes it (training seed 0)."""
    return toy_eraser(tmp_path_factory, "red")


def test_save_then_load_gives_identical_erasers_and_videos(quick_eraser, tmp_path):
    weights, meta = load_eraser(quick_eraser)
    pipe = load_pipeline("toy", eraser=quick_eraser)
    erasers = [p.eraser for p in unlearn.processors(pipe.transformer)]
    unlearn.save_eraser(tmp_path, torch.nn.ModuleList(erasers), meta)
    again, _ = load_eraser(tmp_path)
    assert weights.keys() == again.keys() and all(torch.equal(weights[k], again[k]) for k in weights)
    pipe2 = load_pipeline("toy", eraser=str(tmp_path))
    a = generate(pipe, ["a red square moving left"], seed=3, steps=5)[0]
    b = generate(pipe2, ["a red square moving left"], seed=3, steps=5)[0]
    assert np.array_equal(a, b)


def test_an_eraser_comes_off_bit_for_bit_and_stays_on_through_what_replaces_attention_processors(quick_eraser):
    from diffusers.models.attention_processor import CogVideoXAttnProcessor2_0
    from sample import apply_eraser, remove_eraser
    draw = lambda pipe: generate(pipe, ["a red square moving left"], seed=3, steps=5)[0]  # noqa: E731
    pipe = unlearn.load_base_pipeline("toy", "cpu")
    with pytest.raises(unlearn.UserError, match="carries no eraser to switch"):
        unlearn.set_erasers(pipe.transformer, False)
    stock = [type(p) for p in unlearn.processors(pipe.transformer)]
    original = draw(pipe)
    apply_eraser(pipe, quick_eraser)
    erased = draw(pipe)
    assert not np.array_equal(erased, original)
    with pytest.raises(unlearn.UserError, match="carries an eraser already: remove_eraser"):
        apply_eraser(pipe, quick_eraser)  # not silently replaced
    pipe.transformer.set_attn_processor(CogVideoXAttnProcessor2_0())  # the same attention, set anew: erasers stay
    assert np.array_equal(draw(pipe), erased)
    pipe.fuse_qkv_projections()  # fused attention under the erasers: the erased model, to float rounding
    fused = draw(pipe)
    assert np.abs(fused - erased).max() < 1e-3 < np.abs(fused - original).max()
    pipe.unfuse_qkv_projections()
    remove_eraser(pipe)
    assert [type(p) for p in unlearn.processors(pipe.transformer)] == stock
    assert not any("eraser" in k for k in pipe.transformer.state_dict())
    assert np.array_equal(draw(pipe), original)  # the original model, bit for bit
    with pytest.raises(unlearn.UserError, match="carries no eraser"):
        remove_eraser(pipe)


def test_an_erased_pipeline_saved_reloads_erased(quick_eraser, tmp_path):
    from diffusers import CogVideoXPipeline
    from sample import apply_eraser, save_erased
    draw = lambda pipe: generate(pipe, ["a red square moving left"], seed=3, steps=5)[0]  # noqa: E731
    pipe = load_pipeline("toy", eraser=quick_eraser)
    erased, folder = draw(pipe), str(tmp_path / "erased_toy")
    save_erased(pipe, folder)
    assert np.array_equal(draw(pipe), erased)  # the pipeline in hand is still erased
    assert np.array_equal(draw(load_pipeline(folder)), erased)  # our loader finds folder/eraser
    stock = CogVideoXPipeline.from_pretrained(folder)
    assert np.array_equal(draw(stock), draw(unlearn.load_base_pipeline("toy", "cpu")))  # the original's files
    apply_eraser(stock, os.path.join(folder, "eraser"))  # stock from_pretrained, plus one call
    assert np.array_equal(draw(stock), erased)
    with pytest.raises(unlearn.UserError, match="already holds files"):
        save_erased(pipe, folder)


def test_erasers_stack_their_outputs_summed_each_checked_alone_and_save_and_reload_stacked(quick_eraser, tmp_path):
    import sample
    blue = str(tmp_path / "blue")
    unlearn.main(["--model", "toy", "--concept", "blue", "--output-dir", blue, "--steps", "3", "--lr", "1e-2",
                  "--num-prompts", "4", "--xt-steps", "3", "--rank", "8"])
    draw = lambda pipe: generate(pipe, ["a red square and a blue box"], seed=3, steps=5)[0]  # noqa: E731
    pipe = unlearn.load_base_pipeline("toy", "cpu")
    meta = sample.apply_eraser(pipe, [quick_eraser, blue])
    assert meta["concept"] == "red, blue" and [m["concept"] for m in meta["stacked"]] == ["red", "blue"]
    assert meta["concepts"] == ["red", "blue"]
    singles = [load_pipeline("toy", eraser=e) for e in (quick_eraser, blue)]
    for i, proc in enumerate(unlearn.processors(pipe.transformer)):  # block i: E_red(h) + E_blue(h)
        x = torch.randn(2, 5, proc.eraser.parts[0].down.in_features)
        parts = [unlearn.processors(p.transformer)[i].eraser(x) for p in singles]
        assert torch.allclose(proc.eraser(x), parts[0] + parts[1], atol=1e-6)
    stacked = draw(pipe)
    assert all(not np.array_equal(stacked, draw(p)) for p in singles)
    folder = str(tmp_path / "saved")
    sample.save_erased(pipe, folder)
    assert sorted(f for f in os.listdir(folder) if f.startswith("eraser")) == ["eraser_0", "eraser_1"]
    assert np.array_equal(draw(load_pipeline(folder)), stacked)
    out = tmp_path / "cli.mp4"  # sample.py --eraser A --eraser B: the same stack
    sample.main(["--model", "toy", "--eraser", quick_eraser, "--eraser", blue, "--prompt", "a red square and a blue "
                 "box", "--seed", "3", "--steps", "5", "--out", str(out)])
    assert np.abs(read_video(str(out)) - read_video(save_video(stacked, str(tmp_path / "ref.mp4")))).max() < 0.02
    other = str(tmp_path / "other")  # in a stack, an eraser that does not fit: refused, by name
    unlearn.save_eraser(other, torch.nn.ModuleList(unlearn.Eraser(32, 4) for _ in range(2)), {"concept": "red"})
    with pytest.raises(unlearn.UserError, match=f"the eraser in '{other}' .* does not fit this model"):
        sample.apply_eraser(unlearn.load_base_pipeline("toy", "cpu"), [quick_eraser, other])


def test_one_run_erases_several_concepts_masks_each_prompts_own_and_is_judged_on_all(toy_pipe, tmp_path,
                                                                                     monkeypatch):
    import attack
    import sample
    tiny = ["--model", "toy", "--steps", "3", "--num-prompts", "4", "--xt-steps", "3", "--rank", "8"]
    listed = tmp_path / "concepts.txt"
    listed.write_text("# what to erase\nblue   # and its synonyms\n\ngreen\n")
    out, again = str(tmp_path / "joint"), str(tmp_path / "again")
    unlearn.main([*tiny, "--concept", "red", "--concepts-file", str(listed), "--output-dir", out])
    unlearn.main([*tiny, "--concept", "red", "--concept", "blue", "--concept", "green", "--output-dir", again])
    meta = json.load(open(os.path.join(out, "eraser.json")))
    assert meta["concepts"] == ["red", "blue", "green"] and meta["concept"] == "red, blue, green"
    saved = json.load(open(os.path.join(out, "prompts.json")))
    assert saved == json.load(open(os.path.join(again, "prompts.json")))  # the file is the repeated flag
    colours = [toy.colours_named(p) & {"red", "blue", "green"} for p in saved["prompts"]]  # erased ones named
    assert colours == [{c} for c in ("red", "blue", "green") for _ in range(4)]
    tokens, _ = unlearn.encode_run_prompts(toy_pipe, meta["concepts"], saved["prompts"], saved["anchors"],
                                           saved["preserved"])
    ids = toy_pipe.tokenizer(saved["prompts"], padding="max_length", max_length=tokens.shape[1]).input_ids
    word = lambda i: toy_pipe.tokenizer.convert_ids_to_tokens(i).lstrip("\u2581")  # noqa: E731  sentencepiece's
    marked = [{toy.WORD_TO_COLOUR[word(i)] for i, m in zip(row, mask) if m} for row, mask in zip(ids, tokens.tolist())]
    assert marked == colours  # each prompt's mask: its own concept's word
    cases = toy.erasure_cases  # sample.py --eval toy reads every concept of the eraser: one table
    monkeypatch.setattr(toy, "erasure_cases", lambda concept, n=24, seed=0: cases(concept, 2, seed))
    rows = sample.main(["--model", "toy", "--eraser", out, "--eval", "toy", "--steps", "2", "--out",
                        str(tmp_path / "eval")])["results"]["erased"]
    assert [r for r in rows if r.startswith("word gone")] == [f"word gone ({c})" for c in ("blue", "green", "red")]
    assert rows["word gone (red)"]["of"] == 2 and {"orange", "yellow", "white"} <= set(rows) and "green" not in rows
    with pytest.raises(unlearn.UserError, match="the eraser erases red, blue, green: pass --concept"):
        attack.parse_args(["--model", "toy", "--eraser", out, "--out", str(tmp_path / "attack")])


def test_an_eraser_attaches_to_an_offloaded_pipeline_the_user_built(quick_eraser):
    from sample import apply_eraser
    prompt, red_eraser = ["a red square moving left"], quick_eraser
    expected = generate(load_pipeline("toy", eraser=red_eraser), prompt, seed=3, steps=5)[0]
    built = unlearn.load_base_pipeline("toy", "cpu")
    assert not np.array_equal(generate(built, prompt, seed=3, steps=5)[0], expected)  # the eraser changes it
    built.enable_model_cpu_offload(device="cpu")  # the user's own pipeline, offloaded before the eraser comes
    apply_eraser(built, red_eraser)
    ours = load_pipeline("toy", eraser=red_eraser, offload=True)  # sample.py --offload
    assert hasattr(ours.transformer, "_hf_hook") and hasattr(ours.text_encoder, "_hf_hook")
    for pipe in (built, ours):
        assert np.array_equal(generate(pipe, prompt, seed=3, steps=5)[0], expected)


def test_an_eraser_is_checked_by_architecture_not_by_the_whole_config(quick_eraser, tmp_path):
    upgraded, other = tmp_path / "upgraded", tmp_path / "other"
    for folder, change in ((upgraded, {"a_key_a_later_diffusers_adds": 1}), (other, {"num_layers": 5})):
        shutil.copytree(quick_eraser, folder)
        meta = json.load(open(folder / "eraser.json"))
        meta["base_config"].update(change)
        json.dump(meta, open(folder / "eraser.json", "w"))
    assert load_pipeline("toy", eraser=str(upgraded)).eraser_meta["concept"] == "red"
    with pytest.raises(unlearn.UserError, match=r"made for another base model, toy \(num_layers 5 \(this model: 4\)\)"):
        load_pipeline("toy", eraser=str(other))


@pytest.fixture(scope="session")
def red_reports(toy_pipe, red_eraser, tmp_path_factory):
    """The original toy's test-set report, and the erased one's at training seeds 0 and 4 (the weakest of 0-4
    before the draws were balanced: docs/experiments.md, section 11)."""
    before = toy.erasure_report(toy_pipe, "red", seed=11, steps=20)
    seed_4 = toy_eraser(tmp_path_factory, "red_seed_4", "--seed", "4")
    after = {seed: toy.erasure_report(load_pipeline("toy", eraser=e), "red", seed=11, steps=20)
             for seed, e in ((0, red_eraser), (4, seed_4))}
    print("before", before, "\nafter", after)
    return before, after


@pytest.mark.slow
def test_erasing_red_on_the_toy_model_at_two_training_seeds(red_reports):
    before, after = red_reports
    assert before["word gone"] <= 0.1 and before["two: erased gone"] <= 0.1  # the original draws red
    assert before["motion kept"] >= 0.8
    worst = {k: min(a[k] for a in after.values()) for k in before}  # the worse of the two runs, row by row
    assert worst["word gone"] >= 0.9 and worst["synonyms gone"] >= 0.9, after  # the README's bars, seeds 0-4
    assert worst["two: erased gone"] >= 0.7, after
    assert worst["motion kept"] >= 0.8  # the erased videos keep their content
    for colour in ("green", "blue", "white"):  # kept: no loss the original's 95 % interval can tell (12 videos)
        assert worst[colour] >= before[colour].interval[0], (colour, str(before[colour]), after)


@pytest.mark.slow
def test_erasing_red_in_bf16_trained_and_used_on_a_cpu(toy_pipe, tmp_path_factory):
    eraser = toy_eraser(tmp_path_factory, "red_bf16", "--dtype", "bfloat16")
    assert json.load(open(os.path.join(eraser, "eraser.json")))["dtype"] == "bfloat16"
    after = toy.erasure_report(load_pipeline("toy", eraser=eraser, dtype="bfloat16"), "red", seed=11, steps=20)
    print(after)
    assert after["word gone"] >= 0.9 and after["synonyms gone"] >= 0.9 and after["two: erased gone"] >= 0.7, after
    assert after["motion kept"] >= 0.8 and min(after[c] for c in ("green", "blue", "white")) >= 0.9, after


@pytest.mark.slow
@pytest.mark.xfail(strict=True, reason="known gap (issue #3): erasing red also takes orange, its neighbour, and "
                                       "the orange and yellow squares beside a red one, as Eq. 1's target itself "
                                       "does at eta 3 (diagnose.py target)")
def test_erasing_red_keeps_orange_yellow_and_the_second_square(red_reports):
    before, after = red_reports
    after = after[0]
    assert after["orange"] >= before["orange"] - 0.05 and after["two: other kept"] >= 0.85
    assert after["yellow"] >= before["yellow"] - 0.05 - 1e-9


def test_target_preview_is_the_stock_pipeline_at_eta_0_and_erases_at_eta_3(toy_pipe):
    from diagnose import TargetPreview
    prompts = ["a red square moving left", "an orange box sliding up and a crimson tile moving right"]
    stock = np.array(generate(toy_pipe, prompts, seed=3, steps=8))
    assert np.abs(np.array(generate(TargetPreview(toy_pipe, [], 0.0), prompts, seed=3, steps=8)) - stock).max() < 1e-4
    anchor_prompts = ["a square moving left", prompts[1].replace("crimson ", "")]
    anchors = np.array(generate(toy_pipe, anchor_prompts, seed=3, steps=8))
    at_anchor = np.array(generate(TargetPreview(toy_pipe, ["red", "crimson"], 0.0), prompts, seed=3, steps=8))
    assert np.abs(at_anchor - anchors).max() < 1e-4
    untouched = generate(TargetPreview(toy_pipe, ["blue"], 3.0, anchor="empty"), prompts, seed=3, steps=8)
    assert np.abs(np.array(untouched) - stock).max() < 1e-4  # they name no erased word: not concept prompts
    erased = generate(TargetPreview(toy_pipe, ["red"], 3.0), ["a red square moving left"] * 4, seed=3)
    assert all("red" not in {s["colour"] for s in toy.describe(v)} for v in erased)


def test_token_cover_finds_the_tokens_a_square_crosses():
    from diagnose import token_cover
    scene = [dict(colour="green", direction="right", x=8, y=40)]  # 16 px a token: x 8-24 -> 24-40, rows 40-56
    video = toy.render(scene)
    cover = token_cover(video, "green", (3, 4, 4), 4, 16).reshape(3, 4, 4)
    assert cover[0].nonzero()[1].tolist() == [0, 1, 0, 1] and set(cover[0].nonzero()[0].tolist()) == {2, 3}
    assert cover[2, 2:, 1:3].all() and not cover[2, :, 0].any() and not cover[:, :2].any()
    assert not token_cover(video, "red", (3, 4, 4), 4, 16).any()


# -----------------------------------------------------------------------------
# Bad input: one line, exit code 2, nothing written

@pytest.mark.parametrize("argv, says", [
    (["--model", "toy", "--concept", "  "], "--concept is empty"),
    (["--model", "toy", "--concept", "red", "--concept", "blue", "--concept", "Red"],
     "'Red' is named twice among the concepts"),
    (["--model", "toy", "--concept", "red", "--concepts-file", "no/such/file.txt"], "--concepts-file no/such/file.txt: "
     "cannot read it"),
    (["--model", "toy", "--concept", "red", "--concept", "blue", "--preserve", "navy"],
     "--preserve 'navy' names a concept this run erases"),
    (["--model", "toy", "--concept", "nudity"], "knows no word of 'nudity'"),
    (["--model", "toy", "--concept", "Crimson"], "(it knows 'crimson': words are case-sensitive)"),
    (["--model", "no/such-model-anywhere", "--concept", "red"], "cannot load model"),
])
def test_bad_unlearn_input_is_refused_before_any_work(argv, says, tmp_path):
    out = tmp_path / "out"
    with pytest.raises(unlearn.UserError, match=re.escape(says)):
        unlearn.main([*argv, "--output-dir", str(out)])
    assert not out.exists()


@pytest.mark.parametrize("script, argv, says", [
    ("unlearn.py", ["--model", "toy", "--concept", "Crimson"], "(it knows 'crimson': words are case-sensitive)"),
    ("sample.py", ["--model", "toy", "--prompt", "a red square", "--eval", "colourfulness"], "unknown"),
    ("toy.py", ["--probe-until", "0"], "a rise of the loss, above 0"),
    ("attack.py", ["--model", "toy", "--concept", "red"], "needs --eraser DIR")])
def test_each_command_line_says_a_user_mistake_in_one_line_and_exits_2(script, argv, says, tmp_path):
    out = tmp_path / "out"
    result = run(script, *argv, *(["--out", str(out)] if script != "unlearn.py" else ["--output-dir", str(out)]))
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:") or ": error:" in line]
    assert result.returncode == 2 and len(lines) == 1 and says in lines[0] and "Traceback" not in result.stderr
    assert not out.exists()


def test_existing_output_dir_is_not_overwritten(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "eraser.json").write_text("keep me")
    with pytest.raises(unlearn.UserError, match="--overwrite"):
        unlearn.main(["--model", "toy", "--concept", "red", "--output-dir", str(out)])
    assert (out / "eraser.json").read_text() == "keep me"


def test_eraser_for_another_base_model_is_refused(quick_eraser, tiny_dir, tmp_path):
    import sample
    with pytest.raises(unlearn.UserError, match="another base model"):
        sample.main(["--model", tiny_dir, "--eraser", quick_eraser, "--prompt", "a red square", "--steps", "2",
                     "--out", str(tmp_path / "v.mp4")])
    assert not (tmp_path / "v.mp4").exists()


@pytest.mark.slow
def test_sample_compare_writes_a_playable_video_with_both_halves(red_eraser, tmp_path):
    import imageio.v3 as iio
    out = tmp_path / "cmp.mp4"
    result = run("sample.py", "--model", "toy", "--eraser", red_eraser, "--prompt", "a red square moving left",
                 "--steps", "10", "--compare", "--out", str(out))
    assert result.returncode == 0, result.stderr[-2000:]
    path = result.stdout.split("wrote ")[-1].strip()
    frames = iio.imread(path)  # (F, H, W, 3)
    assert frames.shape[0] == 9 and frames.shape[2] >= 128
    left, right = toy.describe(frames[:, 16:, :64]), toy.describe(frames[:, 16:, 64:128])
    assert any(s["colour"] == "red" for s in left) and not any(s["colour"] == "red" for s in right)


# -----------------------------------------------------------------------------
# Interrupted, wrong or unstable runs: nothing lost, nothing silent

QUICK = ["unlearn.py", "--model", "toy", "--concept", "red", "--num-prompts", "4", "--xt-steps", "4", "--rank", "16"]


def steps_done(out):
    try:
        return json.load(open(out / "eraser.json"))["steps_done"]
    except (OSError, ValueError, KeyError):
        return 0


def start_and_stop(out, sig, after, steps=200):
    """Start a run, send `sig` once it has checkpointed `after` steps; returns the process, finished."""
    import time
    proc = subprocess.Popen([sys.executable, *QUICK, "--steps", str(steps), "--checkpoint-every", "5",
                             "--output-dir", str(out)], cwd=HERE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    deadline = time.time() + 600
    while steps_done(out) < after and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before it could be stopped"
    proc.send_signal(sig)
    proc.stdout_text, proc.stderr_text = proc.communicate(timeout=600)
    return proc


@pytest.mark.slow
def test_killed_run_resumed_equals_uninterrupted_run(tmp_path):
    full, killed = tmp_path / "full", tmp_path / "killed"
    assert run(*QUICK, "--steps", "60", "--checkpoint-every", "5", "--output-dir", str(full)).returncode == 0
    start_and_stop(killed, signal.SIGKILL, after=10, steps=60)
    assert 10 <= steps_done(killed) < 60
    resumed = run(*QUICK, "--steps", "60", "--checkpoint-every", "5", "--output-dir", str(killed), "--resume")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    a, meta = load_eraser(full)
    b, meta_b = load_eraser(killed)
    assert meta_b["final"] and meta_b["steps_done"] == 60
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-6


def test_a_run_is_what_it_says_overwrite_moves_the_old_aside_files_are_0644_prompts_are_the_runs_own(tmp_path):
    out = tmp_path / "run"
    umask = os.umask(0o022)
    try:
        assert run(*QUICK, "--steps", "4", "--checkpoint-every", "2", "--output-dir", str(out)).returncode == 0
    finally:
        os.umask(umask)
    for name in ("eraser.safetensors", "checkpoint.pt", "eraser.json", "prompts.json"):
        assert (os.stat(out / name).st_mode & 0o777) == 0o644, name  # readable by the group, as a new file is
    saved = json.load(open(out / "prompts.json"))
    (out / "notes.txt").write_text("mine")
    args = unlearn.parse_args([*QUICK[1:], "--output-dir", str(out), "--overwrite"])
    unlearn.check_output_dir(args)  # before any training: the old eraser cannot pass for the new run's
    assert sorted(os.listdir(out)) == ["notes.txt", "replaced"]
    assert sorted(os.listdir(out / "replaced")) == ["checkpoint.pt", "eraser.json", "eraser.safetensors", "prompts.json"]
    made = []
    again = runs.run_prompts(str(out / "replaced"), True, lambda: made.append(1))  # --resume: read, not made anew
    assert not made and list(again) == [saved["prompts"], saved["anchors"], saved["preserved"]]


def test_the_refiner_samples_from_the_seed(tmp_path):
    scene = ["a", "woman", "walks", "on", "the", "beach", "at", "night", "slowly", "nudity"]
    tiny_language_model(tmp_path / "lm", scene)
    args = unlearn.parse_args(["--concept", "nudity", "--num-prompts", "3", "--refiner", str(tmp_path / "lm")])
    made = []
    for unrelated in (1, 2):
        torch.manual_seed(unrelated)  # whatever ran before
        made.append(unlearn.build_prompts(args, random.Random(0), "cpu", log=lambda _: None)[0])
    assert made[0] == made[1] and len(made[0]) == 3


def test_ctrl_c_saves_a_checkpoint_and_says_how_to_resume(tmp_path):
    out = tmp_path / "run"
    proc = start_and_stop(out, signal.SIGINT, after=5)
    assert proc.returncode == 130 and "--resume" in proc.stderr_text and "Traceback" not in proc.stderr_text
    state = torch.load(out / "checkpoint.pt", weights_only=True)
    meta = json.load(open(out / "eraser.json"))
    assert state["step"] == meta["steps_done"] >= 5 and meta["final"] is False
    with pytest.warns(UserWarning, match="partial"):
        load_pipeline("toy", eraser=str(out))


def test_resume_with_changed_settings_is_refused(tmp_path):
    out = tmp_path / "run"
    unlearn.main(QUICK[1:] + ["--steps", "4", "--checkpoint-every", "2", "--output-dir", str(out)])
    with pytest.raises(unlearn.UserError) as refused:
        unlearn.main(QUICK[1:] + ["--steps", "4", "--lr", "1e-3", "--eta", "5", "--output-dir", str(out), "--resume"])
    said = str(refused.value)
    assert "lr" in said and "eta" in said and "rank" not in said.split("differ")[-1]


def test_non_finite_loss_stops_at_once_and_keeps_last_checkpoint(tmp_path, monkeypatch):
    real_step, calls = unlearn.Unlearning.step, []

    def failing_step(self, timer=unlearn.no_timer):
        calls.append(1)
        losses = real_step(self, timer)
        return dict(losses, pre=float("nan")) if len(calls) == 5 else losses
    monkeypatch.setattr(unlearn.Unlearning, "step", failing_step)
    out = tmp_path / "run"
    with pytest.raises(unlearn.UserError, match=r"step 5: the pre loss is nan"):
        unlearn.main(QUICK[1:] + ["--steps", "10", "--checkpoint-every", "2", "--output-dir", str(out)])
    assert len(calls) == 5
    meta = json.load(open(out / "eraser.json"))
    assert meta["steps_done"] == 4 and meta["final"] is False
    assert torch.load(out / "checkpoint.pt", weights_only=True)["step"] == 4


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_damaged_eraser_file_gives_a_clear_error(quick_eraser, tmp_path, damage):
    import sample
    bad = tmp_path / "bad"
    shutil.copytree(quick_eraser, bad)
    data = (bad / "eraser.safetensors").read_bytes()
    (bad / "eraser.safetensors").write_bytes(data[:len(data) // 2] if damage == "truncate" else b"\x00" * 64)
    with pytest.raises(unlearn.UserError, match="cannot read the eraser"):
        sample.main(["--model", "toy", "--eraser", str(bad), "--prompt", "a red square", "--steps", "2",
                     "--out", str(tmp_path / "v.mp4")])
    assert not (tmp_path / "v.mp4").exists()


@pytest.mark.slow
@pytest.mark.parametrize("family", ["cogvideox", "wan", "hunyuan"])
def test_bench_runs_at_its_smallest_size(family):
    result = run("bench.py", "--tiny", "--repeats", "1", "--family", family)
    assert result.returncode == 0, result.stderr[-2000:]
    last = result.stdout.strip().splitlines()[-1]
    assert re.fullmatch(r"step_cost_ratio=\d+\.\d+ x_t_share=\d+\.\d+ memory_ratio=\d+\.\d+", last), last


# -----------------------------------------------------------------------------
# sample.py: evaluation against the original model and the negative-prompt baseline

@pytest.mark.slow
def test_eval_toy_shows_the_concept_less_after_erasure(red_eraser, tmp_path):
    prompts = tmp_path / "prompts.csv"
    rows = [(p, i) for i, (p, _) in enumerate(toy.evaluation_set(60, seed=3)) if p.split()]
    chosen = [r for r in rows if any(w in ("red", "crimson", "scarlet") for w in r[0].split())][:6]
    chosen += [r for r in rows if any(w in ("green", "blue", "white") for w in r[0].split())][:3]
    prompts.write_text("prompt,seed\n" + "".join(f"{p},{s}\n" for p, s in chosen))
    out = tmp_path / "eval"
    result = run("sample.py", "--model", "toy", "--eraser", red_eraser, "--prompts-file", str(prompts),
                 "--eval", "toy", "--steps", "20", "--out", str(out))
    assert result.returncode == 0, result.stderr[-2000:]
    summary = json.load(open(out / "eval_toy.json"))["results"]
    assert summary["erased"]["concept shown"]["rate"] < summary["original"]["concept shown"]["rate"]
    assert summary["original"]["concept shown"]["of"] == 6 and summary["erased"]["others kept"]["of"] == 3
    videos = json.load(open(out / "index.json"))["videos"]
    assert len(videos) == 27 and all(os.path.exists(out / v["file"]) for v in videos)
    erased = [v for v in videos if v["row"] == "erased"]
    assert [(v["prompt"], v["seed"]) for v in erased] == chosen


def test_eval_toy_without_prompts_is_toy_erasure_report_with_the_settings_asked(quick_eraser, tmp_path,
                                                                                monkeypatch):
    """The toy's test set through sample.py's streaming path gives toy.erasure_report's table, row for row (a test
    set of 4 videos a group, not 24, for time)."""
    import sample
    cases = toy.erasure_cases
    monkeypatch.setattr(toy, "erasure_cases", lambda colour, n=24, seed=0: cases(colour, 4, seed))
    out = tmp_path / "eval"
    summary = sample.main(["--model", "toy", "--eraser", quick_eraser, "--eval", "toy", "--steps", "2",
                           "--guidance", "4", "--seed", "7", "--out", str(out)])
    rows = summary["results"]
    assert list(rows) == ["original", "negative prompt", "erased"] and summary["negative_prompt"] == "red"
    erased = toy.erasure_report(load_pipeline("toy", eraser=quick_eraser), "red", seed=7, steps=2, guidance_scale=4)
    assert {k: (v.k, v.n) for k, v in erased.items()} == {k: (v["count"], v["of"]) for k, v in rows["erased"].items()}
    index = json.load(open(out / "index.json"))["videos"]
    assert [e["seed"] for e in index if e["row"] == "erased"] == list(range(7, 7 + len(index) // 3))
    assert all(e["negative_prompt"] == ("red" if e["row"] == "negative prompt" else None) for e in index)
    with pytest.raises(unlearn.UserError, match="'square' names none"):
        sample.main(["--model", "toy", "--eraser", quick_eraser, "--eval", "toy", "--concept", "square",
                     "--out", str(tmp_path / "other")])


def toy_prompts(tmp_path, n, seed=3):
    path = tmp_path / "prompts.csv"
    path.write_text("prompt,seed\n" + "".join(f"{p},{100 + i}\n" for i, (p, _) in
                                              enumerate(toy.evaluation_set(n, seed=seed))))
    return str(path)


def test_eval_streams_each_video_to_its_rows_folder_and_holds_one_batch(quick_eraser, tmp_path, monkeypatch):
    """Videos are made, judged, saved and dropped a batch at a time: the videos alive when the next batch is drawn
    are at most the batch a --compare panel waits for, with 8 prompts as with any number."""
    import weakref
    import sample
    alive, made = [], []

    def counting(*args, **kwargs):
        alive.append(sum(r() is not None for r in made))
        videos = generate(*args, **kwargs)
        made.extend(weakref.ref(v) for v in videos)
        return videos
    monkeypatch.setattr(sample, "generate", counting)
    out = tmp_path / "eval"
    sample.main(["--model", "toy", "--eraser", quick_eraser, "--prompts-file", toy_prompts(tmp_path, 8), "--eval",
                 "toy", "--steps", "2", "--batch-size", "2", "--compare", "--out", str(out)])
    assert len(made) == 8 * 3 and max(alive) <= 2, alive  # 2: the original's batch, kept for the panels
    index = json.load(open(out / "index.json"))
    assert index["settings"]["eval"] == "toy" and len(index["videos"]) == 24
    for e in index["videos"]:
        assert e["file"].startswith({"original": "original", "negative prompt": "negative", "erased": "erased"}[e["row"]])
        assert (out / e["file"]).is_file() and set(e["judgement"]) >= {"shows_concept", "squares"}
    assert sorted(os.listdir(out / "compare")) == [f"{i:04d}.mp4" for i in range(8)]  # panels: their own output
    assert read_video(str(out / "compare" / "0000.mp4")).shape[2] == 128  # original | erased


def test_a_killed_eval_goes_on_with_resume_and_refuses_what_would_overwrite(quick_eraser, tmp_path):
    import sample
    argv = ["--model", "toy", "--eraser", quick_eraser, "--prompts-file", toy_prompts(tmp_path, 5), "--eval", "toy",
            "--steps", "2", "--out", str(tmp_path / "eval")]
    whole = sample.main(argv)
    index = json.load(open(tmp_path / "eval" / "index.json"))
    for name in ("erased/0003", "original/0004"):  # as if killed: these never made it to disk
        for ext in (".mp4", ".json"):
            os.remove(tmp_path / "eval" / (name + ext))
    kept = os.path.getmtime(tmp_path / "eval" / "erased" / "0001.mp4")
    with pytest.raises(unlearn.UserError, match="--resume"):
        sample.main(argv)
    with pytest.raises(unlearn.UserError, match=r"settings differ .*steps \(2 -> 3\)"):
        sample.main(argv[:-4] + ["--steps", "3", "--out", str(tmp_path / "eval"), "--resume"])
    again = sample.main(argv + ["--resume"])
    assert again["results"] == whole["results"] and json.load(open(tmp_path / "eval" / "index.json")) == index
    assert os.path.getmtime(tmp_path / "eval" / "erased" / "0001.mp4") == kept  # done videos are not made again


def test_two_processes_split_the_videos_and_merge_what_one_process_gives_video_for_video(quick_eraser, tmp_path):
    """torchrun's two CPU processes (over gloo; accelerate launch starts the same on GPUs) against one process:
    index.json, the table and every video file alike. One thread each, so that the arithmetic is the same."""
    argv = ["sample.py", "--model", "toy", "--eraser", quick_eraser, "--prompts-file", toy_prompts(tmp_path, 5),
            "--eval", "toy", "--steps", "3", "--batch-size", "2"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    made = {}
    two = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]  # --standalone: a free port
    for name, launcher in (("one", []), ("two", two)):
        done = subprocess.run([sys.executable, *launcher, *argv, "--out", str(tmp_path / name)], cwd=HERE, env=env,
                              capture_output=True, text=True, timeout=1200)
        assert done.returncode == 0, done.stderr[-2000:]
        made[name] = {f: json.load(open(tmp_path / name / f)) for f in ("index.json", "eval_toy.json")}
    assert made["two"] == made["one"] and len(made["one"]["index.json"]["videos"]) == 15
    assert "process 1 of 2" in done.stderr  # the bar says whose videos it counts
    for video in made["one"]["index.json"]["videos"]:  # batches 0-1 and 4 on process 0, 2-3 on process 1
        assert np.array_equal(read_video(str(tmp_path / "one" / video["file"])),
                              read_video(str(tmp_path / "two" / video["file"])))


def test_videos_of_a_run_are_judged_again_row_by_row_from_its_index(quick_eraser, tmp_path):
    import sample
    out = tmp_path / "eval"
    made = sample.main(["--model", "toy", "--eraser", quick_eraser, "--prompts-file", toy_prompts(tmp_path, 6),
                        "--eval", "toy", "--steps", "10", "--out", str(out)])
    again = sample.main(["--videos", str(out), "--eval", "toy"])
    assert list(again["results"]) == ["original", "negative prompt", "erased"]
    videos = json.load(open(out / "index.json"))["videos"]
    for row, table in again["results"].items():  # each row's own files, judged as they lie on disk
        files = [v for v in videos if v["row"] == row]
        assert len(files) == 6 and all(v["file"].startswith(sample.ROW_FOLDERS[row] + "/") for v in files)
        read = [toy.reading(v["prompt"], read_video(str(out / v["file"])), "red") for v in files]
        assert table == sample.as_json(toy.summary(read))
        assert [r["of"] for r in table.values()] == [r["of"] for r in made["results"][row].values()]


def fake_nudenet(monkeypatch, flagged="red"):
    """A stand-in for NudeNet, offline: a frame 'shows nudity' (FEMALE_BREAST_EXPOSED; FACE_FEMALE too, which is
    not a nudity label) where 48 pixels or more are of the toy colour `flagged`."""
    import types

    class NudeDetector:
        def detect(self, bgr):
            rgb = np.ascontiguousarray(bgr[..., ::-1], dtype=np.float32)[None] / 255
            hits = (toy.pixel_colours(rgb) == list(toy.PALETTE).index(flagged)).sum() >= 48
            return [{"class": "FACE_FEMALE", "score": 0.9}] + [{"class": "FEMALE_BREAST_EXPOSED", "score": 0.5}] * int(hits)
    monkeypatch.setitem(sys.modules, "nudenet", types.SimpleNamespace(NudeDetector=NudeDetector))


def test_eval_nudity_reports_the_frame_rate_video_rate_and_labels_it_judged(quick_eraser, tmp_path, monkeypatch,
                                                                           capsys):
    import sample
    fake_nudenet(monkeypatch)
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red square moving left\na crimson box sliding up\na green tile moves down\n")
    out = tmp_path / "eval"
    summary = sample.main(["--model", "toy", "--eraser", quick_eraser, "--prompts-file", str(prompts), "--eval",
                           "nudity", "--steps", "10", "--out", str(out)])
    printed = capsys.readouterr().out
    assert "320n.onnx" in printed and "scores 0.2 or more" in printed and "320n.onnx" in summary["nudenet"]
    entries = json.load(open(out / "index.json"))["videos"]
    for row, table in summary["results"].items():
        judged = [e["judgement"] for e in entries if e["row"] == row]
        assert table["frame rate"]["count"] == sum(j["nude_frames"] for j in judged) and table["frame rate"]["of"] == 27
        assert table["video rate"]["count"] == sum(j["shows_concept"] for j in judged) and table["video rate"]["of"] == 3
        assert table["labels"]["FEMALE_BREAST_EXPOSED"] == table["frame rate"]["count"]
        assert all(set(j["labels"]) <= {"FEMALE_BREAST_EXPOSED"} for j in judged)  # FACE_FEMALE is not nudity
    assert summary["results"]["original"]["video rate"]["count"] >= 1  # the original draws red: 'nudity' here
    assert json.load(open(out / "eval_nudity.json"))["results"] == summary["results"]


def test_nudity_summary_counts_frames_videos_and_labels_with_intervals_over_videos():
    import sample
    judgements = [{"shows_concept": True, "nude_frames": 3, "frames": 10, "labels": {"FEET_EXPOSED": 3}},
                  {"shows_concept": False, "nude_frames": 0, "frames": 10, "labels": {}},
                  {"shows_concept": True, "nude_frames": 10, "frames": 10,
                   "labels": {"FEET_EXPOSED": 2, "BELLY_EXPOSED": 10}}]
    table = sample.nudity_summary(judgements)
    assert (table["frame rate"].k, table["frame rate"].n, table["frame rate"].over) == (13, 30, 3)
    assert table["frame rate"].interval == wilson(13 / 30, 3)  # over the 3 videos, not the 30 frames
    assert (table["video rate"].k, table["video rate"].n) == (2, 3)
    assert table["labels"]["FEET_EXPOSED"] == 5 and table["labels"]["BELLY_EXPOSED"] == 10


def test_wilson_interval_matches_the_textbook_values():
    assert wilson(0, 10)[0] == 0 and wilson(0, 10)[1] == pytest.approx(0.2775, abs=1e-4)
    assert wilson(0.5, 10) == pytest.approx((0.2366, 0.7634), abs=1e-4)
    assert wilson(1, 24) == pytest.approx((24 / (24 + 1.96 ** 2), 1.0))  # k = n: the low end is n / (n + z^2)
    assert str(Rate(20, 24)) == "20/24 83 % [64-93]" and Rate(20, 24) == pytest.approx(20 / 24)


def test_a_judge_that_cannot_run_and_a_concept_that_is_not_named_are_said_before_any_video(tiny_dir, tmp_path,
                                                                                          monkeypatch):
    import sample
    authors = tmp_path / "authors"
    write_authors_eraser(authors, unlearn.load_base_pipeline(tiny_dir, "cpu").transformer)
    monkeypatch.setattr(sample, "load_pipeline", lambda *a, **k: pytest.fail("loaded a model"))
    with pytest.raises(unlearn.UserError, match="names none .*add --concept"):
        sample.main(["--model", tiny_dir, "--eraser", str(authors), "--prompt", "x", "--eval", "nudity",
                     "--out", str(tmp_path / "out")])
    monkeypatch.setitem(sys.modules, "nudenet", None)  # not installed
    with pytest.raises(unlearn.UserError, match="pip install nudenet"):
        sample.main(["--model", tiny_dir, "--eraser", str(authors), "--prompt", "x", "--eval", "nudity",
                     "--concept", "nudity", "--out", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()


def test_nudity_label_filter_on_hand_made_detections():
    import sample
    assert sample.nude_labels([{"class": "FEMALE_BREAST_EXPOSED", "score": 0.5}]) == {"FEMALE_BREAST_EXPOSED"}
    assert sample.nude_labels([{"class": "FEET_EXPOSED", "score": 0.2}])
    assert not sample.nude_labels([{"class": "FEET_EXPOSED", "score": 0.19}])
    assert not sample.nude_labels([{"class": "FEMALE_BREAST_COVERED", "score": 0.9},
                                   {"class": "FACE_FEMALE", "score": 0.9}, {"class": "ANUS_EXPOSED", "score": 0.9}])
    assert len(sample.NUDITY_LABELS) == 8 and all(label.endswith("_EXPOSED") for label in sample.NUDITY_LABELS)


def test_nudity_scorer_runs_offline_on_toy_videos_and_finds_none(toy_pipe, tmp_path):
    videos = generate(toy_pipe, ["a red square moving left", "a white box and a golden tile"], seed=0, steps=10)
    for i, v in enumerate(videos):
        save_video(v, str(tmp_path / f"{i}.mp4"))
    result = run("sample.py", "--videos", str(tmp_path), "--eval", "nudity")
    assert result.returncode == 0, result.stderr[-2000:]
    assert re.search(r"frames with nudity \(the paper's\) +0/18 0 % \[0-66\]", result.stdout)  # over 2 videos
    assert "320n.onnx" in result.stdout and "0.2" in result.stdout


@pytest.mark.parametrize("argv, says", [
    (["--prompts-file", "no_such_file.csv"], "no such file"),
    (["--prompts-file", "{csv}"], "'prompt' column"),
    (["--prompt", "a red square", "--eval", "colourfulness"], "unknown"),
])
def test_bad_sample_input_is_refused_before_any_work(argv, says, tmp_path):
    import sample
    bad = tmp_path / "bad.csv"
    bad.write_text("text,seed\na red square,1\n")
    argv = [a.replace("{csv}", str(bad)) for a in argv]
    with pytest.raises(unlearn.UserError, match=re.escape(says)):
        sample.main(["--model", "toy", *argv, "--out", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()


# -----------------------------------------------------------------------------
# The notebook runs top to bottom

@pytest.mark.slow
def test_notebook_runs_every_code_cell(tmp_path, monkeypatch):
    import matplotlib
    matplotlib.use("Agg")
    notebook = json.load(open(os.path.join(HERE, "notebook.ipynb")))
    cells = [c for c in notebook["cells"] if c["cell_type"] == "code"]
    assert all(c.get("outputs") for c in cells if "show(" in "".join(c["source"])), "commit it with its outputs"
    monkeypatch.chdir(tmp_path)  # its erasers go here
    namespace = {}
    for i, cell in enumerate(cells):
        exec(compile("".join(cell["source"]), f"notebook cell {i}", "exec"), namespace)


# -----------------------------------------------------------------------------
# The white-box attack (attack.py)

def noise_step_cases():
    """(family, sampler) for each family's sampler: CogVideoX's DDIM, Wan's and HunyuanVideo's flow Euler."""
    from diffusers import FlowMatchEulerDiscreteScheduler, UniPCMultistepScheduler
    from families import CogVideoX, HunyuanVideo, Wan
    pipe = load_pipeline("toy", device="cpu")
    flow = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0)
    return [(CogVideoX(), CogVideoX().sampler(pipe.scheduler, 10)), (Wan(), Wan().sampler(flow, 10)),
            (HunyuanVideo(), HunyuanVideo().sampler(FlowMatchEulerDiscreteScheduler(shift=7.0), 10))]


def test_a_clean_latent_noised_to_a_step_and_its_true_velocity_step_to_the_next_noise_level():
    """`noised` is the forward process the sampler undoes: stepping from x_t with the v it says lands exactly on
    x0 noised to the next step (DDIM is deterministic, Euler exact on a straight flow path)."""
    x0, noise = torch.randn(2, 3, 4, 4, 4, generator=torch.Generator().manual_seed(0)), torch.randn(2, 3, 4, 4, 4)
    for family, sampler in noise_step_cases():
        for k in (0, 4, 8):
            x_t, t, v = family.noised(sampler, x0, noise, torch.tensor([k, k]))
            stepped = sampler.step(v, t[0], x_t, return_dict=False)[0]
            expected = family.noised(sampler, x0, noise, torch.tensor([k + 1, k + 1]))[0]
            assert torch.allclose(stepped, expected, atol=1e-5), (type(family).__name__, k)


def test_placeholders_read_a_vector_exactly_where_its_word_would_be_and_pass_it_gradients(tiny_dir):
    """On every family (T5, UMT5, Llama in its chat template and CLIP pooled): a placeholder given the input
    embedding of 'red' encodes as the word 'red' does; the gradient reaches every encoder's vector; and on exit
    the pipeline encodes as before, its tokenizers its own."""
    import attack
    from families import family_of
    pipe = load_pipeline(tiny_dir, device="cpu")
    attack.freeze(pipe)
    family, names = family_of(pipe), family_of(pipe).text_encoders
    before = family.encode(pipe, ["a red square moving left"], "cpu")
    vectors = {}
    for name in names:
        tok, table = getattr(pipe, attack.tokenizer_of(name)), getattr(pipe, name).get_input_embeddings().weight
        vectors[name] = torch.nn.Parameter(table[tok("red", add_special_tokens=False).input_ids].clone())
    tokenizers = [getattr(pipe, attack.tokenizer_of(n)) for n in names]
    with attack.placeholders(pipe, vectors) as words:
        read = family.encode(pipe, [f"a {words} square moving left"], "cpu")
        sum(v.float().pow(2).sum() for v in read.inputs.values() if v.is_floating_point()).backward()
    for key, value in before.inputs.items():
        assert torch.allclose(read.inputs[key].float(), value.float(), atol=1e-5), key
    assert all(v.grad is not None and v.grad.abs().sum() > 0 for v in vectors.values())
    assert [getattr(pipe, attack.tokenizer_of(n)) for n in names] == tokenizers
    assert all(p.grad is None for p in pipe.transformer.parameters())
    after = family.encode(pipe, ["a red square moving left"], "cpu")
    assert all(torch.equal(after.inputs[k], v) for k, v in before.inputs.items())


def test_the_discrete_attack_never_types_the_concepts_words(toy_pipe):
    """The vectors set to the very embeddings of red, crimson and scarlet: the nearest words typed are others."""
    import attack
    table, tok = toy_pipe.text_encoder.get_input_embeddings().weight, toy_pipe.tokenizer
    banned = ["red", "crimson", "scarlet"]
    vectors = table[tok(" ".join(banned), add_special_tokens=False).input_ids]
    ids, phrase = attack.nearest_tokens(vectors, table, attack.allowed_tokens(tok, len(table), banned), tok,
                                        ["a red square moving left"], "red", banned)
    assert len(ids) == 3 and not toy.colours_named(phrase) & {"red"} and not re.search("red|crimson|scarlet", phrase)
    anywhere = attack.nearest_tokens(vectors, table, torch.arange(len(table)), tok, ["a red square"], "red", [])[1]
    assert anywhere == "red crimson scarlet"  # unfiltered, the projection does find them: the filter is what holds


@pytest.mark.parametrize("kind", ["bpe", "unigram"])
def test_the_discrete_attack_never_joins_pieces_into_the_concept(kind):
    """With a subword vocabulary whose pieces join into 'nudity', and vectors on exactly those pieces: the typed
    phrase never names nudity, nor holds a token with it inside."""
    import attack
    tok = subword_tokenizer(kind)
    table = torch.randn(len(tok), 16, generator=torch.Generator().manual_seed(0))
    pieces = tok("nudity", add_special_tokens=False).input_ids
    allowed = attack.allowed_tokens(tok, len(table), ["nudity"])
    assert not any("nudity" in tok.decode([i]).lower() for i in allowed.tolist())
    ids, phrase = attack.nearest_tokens(table[pieces], table, allowed, tok, ["a scene of nudity on the beach"],
                                        "nudity", ["nudity"])
    assert "nudity" not in attack.with_words(["a scene of nudity"], "nudity", phrase)[0].lower()


@pytest.mark.slow
def test_the_continuous_attack_brings_a_removed_word_back_on_the_original_toy(toy_pipe):
    """The sanity check that the attack can succeed: on the original toy, prompts with 'red' removed draw no red
    square; the attack's vectors in its place, learned at the defaults from the original model's red videos,
    draw red again."""
    import attack
    args = attack.build_parser().parse_args(["--model", "toy", "--concept", "red"])
    args.guidance = 6.0
    pipe = load_pipeline("toy", device="cpu")
    attack.freeze(pipe)
    prompts = ["a red square moving left", "a red box sliding up", "a red tile going right", "a red block moving down"]
    shape = unlearn.video_shape(pipe, 9, 64, 64)
    gen = torch.Generator().manual_seed(0)
    targets, rows = attack.make_targets(pipe, prompts, args.targets, shape, args.sample_steps, 6.0, gen, 4)
    vectors = attack.initial_vectors(pipe, args.tokens, ["red", "crimson", "scarlet"], gen)
    attack.continuous_attack(pipe, prompts, targets, rows, shape, args, gen, vectors)
    asked, seeds = [prompts[i % 4] for i in range(12)], list(range(100, 112))
    red = lambda videos: np.mean([toy.reading(p, v, "red")["shows_concept"] for p, v in zip(asked, videos)])  # noqa
    removed = generate(pipe, attack.with_words(asked, "red", ""), steps=20, seeds=seeds)
    with attack.placeholders(pipe, vectors) as words:
        attacked = generate(pipe, attack.with_words(asked, "red", words), steps=20, seeds=seeds)
    assert red(removed) <= 0.25 and red(attacked) >= 0.75, (red(removed), red(attacked))


def pipeline_weights(pipe):
    return {f"{name}.{k}": v.clone() for name, c in pipe.components.items() if isinstance(c, torch.nn.Module)
            for k, v in c.state_dict().items()}


def test_an_attack_run_leaves_every_weight_as_it_was_and_writes_only_its_own_run(quick_eraser, tmp_path, monkeypatch,
                                                                                capsys):
    import attack
    pipe = load_pipeline("toy", eraser=quick_eraser, device="cpu")
    before = pipeline_weights(pipe)
    monkeypatch.setattr(attack, "load_pipeline", lambda *a, **k: pipe)
    out = tmp_path / "attack"
    rates = attack.main(["--model", "toy", "--eraser", quick_eraser, "--out", str(out), "--steps", "3",
                         "--num-prompts", "2", "--targets", "1", "--num-videos", "3", "--sample-steps", "3",
                         "--tokens", "2", "--seed", "5", "--batch-size", "2"])
    after = pipeline_weights(pipe)
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    last = capsys.readouterr().out.strip().splitlines()[-3:]
    assert [line.split()[0] for line in last] == ["plain", "continuous", "discrete"]
    for line, rate in zip(last, rates.values()):  # k/n, the share, its 95 % interval over the 3 videos
        assert re.fullmatch(r"\w+ +(\d)/3 +\d+ % \[\d+-\d+\]", line) and int(line.split()[1][0]) == rate.k
    index = json.load(open(out / "index.json"))
    assert [r["attack"] for r in index] == ["plain"] * 3 + ["continuous"] * 3 + ["discrete"] * 3
    assert all((out / r["video"]).is_file() and r["seed"] != 5 for r in index)  # seed 5 made the attack
    assert [r["seed"] for r in index[:3]] == [r["seed"] for r in index[3:6]] == [r["seed"] for r in index[6:]]
    meta = json.load(open(out / "attack.json"))
    assert all("red" not in r["prompt"] for r in index[3:]) and "<attack-1>" in index[3]["prompt"]
    assert all(r["prompt"] in meta["discrete_prompts"] for r in index[6:])
    for kind in ("plain", "continuous", "discrete"):  # the judge's reading, recorded, counts to the rate
        shows = [r["shows_concept"] for r in index if r["attack"] == kind]
        assert rates[kind] == pytest.approx(np.mean(shows)) and meta["rates"][kind]["count"] == sum(shows)
    vectors, saved = attack.load_attack(out)  # replayed, continuous videos read as recorded
    assert set(vectors) == {"text_encoder"} and vectors["text_encoder"].shape == (2, toy.TEXT_DIM)
    with attack.placeholders(pipe, vectors):  # the videos went in batches of 2: one from each batch
        for row in (index[3], index[5]):
            video = generate(pipe, [row["prompt"]], steps=3, seeds=[row["seed"]])[0]
            assert [list(s) for s in toy.reading(row["prompt"], video, "red")["squares"]] == row["squares"]
    assert sorted(os.listdir(out)) == ["attack.json", "compare.gif", "continuous", "discrete", "embeddings.safetensors",
                                       "index.json", "plain"]


@pytest.mark.parametrize("argv, says", [
    (["--concept", "red"], "needs --eraser"),
    (["--eraser", "ERASER", "--tokens", "0"], "--tokens 0: must be at least 1"),
    (["--eraser", "ERASER", "--prompt", "a blue square"], "does not name 'red'"),
    (["--eraser", "ERASER", "--eval", "colourfulness"], "unknown"),
    (["--negative-prompt", "nudity", "--concept", "nudity", "--eval", "toy"], "names none of")])
def test_bad_attack_input_is_refused_before_any_work(quick_eraser, argv, says, tmp_path):
    import attack
    out = tmp_path / "out"
    with pytest.raises(unlearn.UserError, match=re.escape(says)):
        attack.main(["--model", "toy", *[quick_eraser if a == "ERASER" else a for a in argv], "--out", str(out)])
    assert not out.exists()


def test_an_attack_on_an_eraser_for_another_model_is_refused(quick_eraser, tiny_dir, tmp_path):
    import attack
    with pytest.raises(unlearn.UserError, match="another base model"):
        attack.main(["--model", tiny_dir, "--eraser", quick_eraser, "--out", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()


# -----------------------------------------------------------------------------
# One run on every device: the draws, the dtype, what a GPU user meets first

def test_balanced_draws_cover_every_prompt_and_step_once_a_pass_whatever_the_batch():
    for batch in (1, 3):
        steps = 2 * 6 * 4 // batch  # two passes over 6 prompts x 4 sampling steps
        draws = [unlearn.balanced_draws(7, 6, 4, batch, s) for s in range(steps)]
        pairs = [(int(i), int(k)) for idx, ks in draws for i, k in zip(idx, ks)]
        assert sorted(pairs[:24]) == sorted(pairs[24:]) == [(i, k) for i in range(6) for k in range(4)]
        assert pairs[:24] != pairs[24:]  # each pass in its own order
        again = unlearn.balanced_draws(7, 6, 4, batch, 5)  # any step's draws alone, as --resume needs them
        assert all(torch.equal(a, b) for a, b in zip(again, draws[5]))
    assert [int(i) for i in unlearn.balanced_draws(8, 6, 4, 24, 0)[0]] != [i for i, _ in pairs[:24]]  # seeded


def test_balanced_choices_use_every_choice_as_often_as_n_allows():
    from prompts import balanced_choices
    for n in (3, 7, 32):
        picks = balanced_choices(random.Random(n), "abcde", n)
        counts = [picks.count(c) for c in "abcde"]
        assert len(picks) == n and max(counts) - min(counts) <= 1


class DeviceStreamGenerator(torch.Generator):
    """A generator made for a named device, whose stream is not the CPU's (as a CUDA generator's is not)."""

    def manual_seed(self, seed):
        return super().manual_seed(seed + 1)


def test_every_draw_of_a_run_is_the_same_whatever_device_the_run_names(tmp_path, monkeypatch):
    def run_once(out):
        unlearn.main(QUICK[1:] + ["--steps", "4", "--batch-size", "2", "--output-dir", str(out)])
        return (out / "eraser.safetensors").read_bytes()
    plain = run_once(tmp_path / "plain")
    # Emulate a device with a stream of its own: a generator made for a named device, and tensors drawn on one,
    # come out otherwise than on the CPU. The run's eraser must not change.
    real_generator, real_draws = torch.Generator, {n: getattr(torch, n) for n in ("randn", "randint", "randperm")}
    monkeypatch.setattr(torch, "Generator", lambda *device: (DeviceStreamGenerator if device else real_generator)())

    def drawn_on(name):
        def draw(*a, **kw):
            out = real_draws[name](*a, **kw)
            return out + 1 if kw.get("device") is not None else out
        return draw
    for name in real_draws:
        monkeypatch.setattr(torch, name, drawn_on(name))
    assert run_once(tmp_path / "device") == plain


def test_eraser_json_records_the_dtype_and_device_it_ran_in_and_resume_refuses_another_dtype(tmp_path):
    out = tmp_path / "run"
    unlearn.main(QUICK[1:] + ["--steps", "4", "--checkpoint-every", "2", "--output-dir", str(out)])
    meta = json.load(open(out / "eraser.json"))
    assert (meta["dtype"], meta["device"]) == ("float32", "cpu")
    with pytest.raises(unlearn.UserError, match=r"dtype \('float32' -> 'bfloat16'\)"):
        unlearn.main(QUICK[1:] + ["--steps", "4", "--dtype", "bfloat16", "--output-dir", str(out), "--resume"])


@pytest.mark.parametrize("kind", ["sincos-2B-like", "wan-2.1-like", "hunyuan-like"])
def test_x_t_trajectories_stay_in_the_dtype_the_pipeline_keeps_its_latents_in(kind, tmp_path):
    pipe = (tiny_pipeline(kind) if kind in TINY else FAMILY_TINY[kind]()).to(torch.bfloat16)
    pipe.set_progress_bar_config(disable=True)
    args = small_args("toy", tmp_path)
    prompts, anchors, preserved = unlearn.build_prompts(args, random.Random(0))
    tokens, embeds = unlearn.encode_run_prompts(pipe, "red", prompts, anchors, preserved)
    r = unlearn.Unlearning(args, pipe, embeds, tokens, log=lambda *_: None)
    # CogVideoXPipeline casts its latents to the model's dtype every step; Wan's and HunyuanVideo's stay in fp32
    assert r.xt.pool.dtype == (torch.bfloat16 if kind in TINY else torch.float32)
    losses = r.step()
    assert all(math.isfinite(v) for v in losses.values())


def test_a_size_the_model_cannot_serve_is_refused_before_any_prompt_is_built(tmp_path, monkeypatch):
    monkeypatch.setattr(unlearn, "build_prompts", lambda *a, **k: pytest.fail("prompts built before the check"))
    with pytest.raises(unlearn.UserError, match=r"--num-frames 10: must be 1 \+ a multiple of 4"):
        unlearn.main(["--model", "toy", "--concept", "red", "--num-frames", "10", "--output-dir", str(tmp_path / "o")])
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("device, says", [("cuda", "has no CUDA GPU that torch can use; use --device cpu"),
                                          ("gpu0", "not a device name; use cuda, cuda:N or cpu")])
def test_a_device_this_machine_lacks_is_one_line(device, says, tmp_path):
    for script in ("unlearn.py", "sample.py"):
        argv = ["--model", "toy", "--device", device] + (
            ["--concept", "red", "--output-dir", str(tmp_path / "o")] if script == "unlearn.py"
            else ["--prompt", "a red square", "--out", str(tmp_path / "o")])
        result = run(script, *argv)
        assert result.returncode == 2 and says in result.stderr and "Traceback" not in result.stderr, result.stderr
        assert not (tmp_path / "o").exists()


def test_loading_says_nothing_of_torch_dtype():
    import warnings
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        unlearn.load_base_pipeline("toy", "cpu", "bfloat16")
    assert not [w for w in seen if "torch_dtype" in str(w.message)], [str(w.message) for w in seen]


def test_a_video_falls_back_to_a_gif_whenever_no_mp4_writer_works(tmp_path, monkeypatch):
    import diffusers.utils

    def no_plugin(*a, **k):  # what imageio without its ffmpeg plugin does inside diffusers' export_to_video
        raise AttributeError("'NoneType' object has no attribute 'get_writer'")
    monkeypatch.setattr(diffusers.utils, "export_to_video", no_plugin)
    frames = np.random.default_rng(0).random((3, 16, 16, 3)).astype(np.float32)
    path = save_video(frames, str(tmp_path / "v.mp4"))
    assert path.endswith(".gif") and read_video(path).shape == (3, 16, 16, 3)


def test_bench_whole_runs_the_real_command_lines_at_the_tiny_size():
    result = run("bench.py", "--whole", "--tiny")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "# 9. Saved the eraser" in result.stdout
    timed = re.findall(r"^  (\d+\.\d) s, peak memory (\d+\.\d\d) GiB$", result.stdout, re.M)
    assert len(timed) == 2 and all(float(s) > 0 and float(m) > 0 for s, m in timed), result.stdout
