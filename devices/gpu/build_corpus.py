"""Build the mixed distillation corpus (.jsonl) for drafter v2 from text on this machine only.

  python .stage/drafter_v2/build_corpus.py .stage/mixed_corpus.jsonl

Records (mtpkit.distill.corpus format):
  {"text": ...}   documents, sampled as 64-token windows (char-weighted):
                  Python stdlib sources (code) + English prose/technical docs (GNU info manuals, man pages
                  rendered with `man`, /usr/share/doc txt/md/rst without changelogs/licences, Node.js API docs,
                  Python package long descriptions).
  {"prompt": ...} short prompts used whole: HumanEval-*style* (not HumanEval) function stubs cut from stdlib
                  functions with docstrings, and instruction/question prompts templated from our own topic
                  lists, man-page NAME lines, Debian package descriptions and doc paragraphs.
No HumanEval or MT-Bench text is used; mtpkit's 8-word-shingle filter is applied here too (and again at
training time).
"""

from __future__ import annotations

import ast
import glob
import gzip
import json
import os
import random
import re
import subprocess
import sys
import textwrap
from pathlib import Path

from everyday_sources import SKIP_NAME, clean  # this directory is on sys.path when run as a script

from mtpkit.distill.corpus import stdlib_files
from mtpkit.suites import EvalFilter

rng = random.Random(1234)
FILT = EvalFilter.for_suites()

CODE_CHARS = 7_000_000
PROSE_CHARS = 9_000_000
N_FUNC_PROMPTS = 3800
N_INSTR_PROMPTS = 10500


# ---------------------------------------------------------------- documents: code
def code_docs() -> list[str]:
    files = stdlib_files()
    rng.shuffle(files)
    out, n = [], 0
    for f in files:
        try:
            t = f.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        if not t.strip() or n > CODE_CHARS:
            continue
        out.append(t)
        n += len(t)
    return out


# ---------------------------------------------------------------- documents: prose


def info_docs() -> list[str]:
    out = []
    for f in sorted(glob.glob("/usr/share/info/*.gz")):
        try:
            t = gzip.open(f, "rt", encoding="utf-8", errors="replace").read()
        except OSError:
            continue
        for node in t.split("\x1f"):  # info nodes
            node = "\n".join(ln for ln in node.splitlines() if not ln.startswith(("File: ", "* Menu:", "Tag Table")))
            if len(node) > 400:
                out.append(clean(node))
    return out


def man_docs(limit: int = 700) -> list[str]:
    pages = []
    for sec in ("1", "5", "7", "8"):
        pages += sorted(glob.glob(f"/usr/share/man/man{sec}/*.gz"))
    rng.shuffle(pages)
    out = []
    env = {**os.environ, "MANWIDTH": "80", "MAN_KEEP_FORMATTING": "0"}
    for p in pages[:limit]:
        try:
            r = subprocess.run(["man", "-l", p], capture_output=True, text=True, env=env, timeout=10)
        except (subprocess.TimeoutExpired, OSError):
            continue
        t = re.sub(r".\x08", "", r.stdout)
        if len(t) > 500:
            out.append(clean(t))
    return out


def usr_doc() -> list[str]:
    out = []
    for f in sorted(glob.glob("/usr/share/doc/**/*", recursive=True)):
        p = Path(f)
        if not p.is_file() or p.suffix not in (".txt", ".md", ".rst") or SKIP_NAME.search(f):
            continue
        if "/nodejs/changelogs/" in f:
            continue
        try:
            t = p.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        if len(t) > 500:
            out.append(clean(t))
    return out


def metadata_docs() -> list[str]:
    out = []
    for f in sorted(glob.glob(os.path.join(sys.prefix, "lib/python3*/site-packages/*.dist-info/METADATA"))):
        t = Path(f).read_text(encoding="utf-8", errors="replace")
        body = t.split("\n\n", 1)[1] if "\n\n" in t else ""
        if len(body) > 800:
            out.append(clean(body))
    return out


def paragraphs(docs: list[str]) -> list[str]:
    out = []
    for d in docs:
        for para in re.split(r"\n\s*\n", d):
            para = " ".join(para.split())
            words = para.split()
            if 25 <= len(words) <= 110 and sum(c.isalpha() for c in para) > 0.75 * len(para) and para[-1] in ".:)":
                out.append(para)
    return out


# ---------------------------------------------------------------- prompts: function stubs (HumanEval-style)
def func_prompts(files) -> list[str]:
    out = []
    for f in files:
        try:
            src = f.read_text(encoding="utf-8")
            tree = ast.parse(src)
        except (OSError, UnicodeDecodeError, SyntaxError, ValueError):
            continue
        lines = src.splitlines(keepends=True)
        for node in ast.walk(tree):
            if not isinstance(node, ast.FunctionDef) or node.col_offset > 4:
                continue
            doc = ast.get_docstring(node, clean=False)
            if not doc or len(doc.split()) < 6 or not node.body:
                continue
            first = node.body[0]
            end = first.end_lineno
            if end - node.lineno > 30:
                continue
            stub = textwrap.dedent("".join(lines[node.lineno - 1 - len(node.decorator_list):end]))
            if node.col_offset:
                stub = re.sub(r"\((self|cls)(, )?", "(", stub, count=1)
            out.append(stub)
    return out


# ---------------------------------------------------------------- prompts: instructions (our own templates)
TOPICS = """the history of the printing press; renewable energy in small towns; how vaccines train the immune system;
the water cycle; learning a second language as an adult; the economics of public transport; urban gardening;
the role of bees in agriculture; remote work and productivity; the invention of the telephone; black holes;
the French Revolution; machine learning in medicine; ocean acidification; the ancient Silk Road; volcanoes;
the benefits of regular exercise; personal budgeting; the Roman aqueducts; photosynthesis; plate tectonics;
the Industrial Revolution; recycling plastics; the life of a medieval blacksmith; the Great Barrier Reef;
jazz music in the 1920s; the psychology of habits; electric cars; the Apollo moon landings; coffee cultivation;
the importance of sleep; social media and teenagers; the Renaissance in Florence; antibiotics and resistance;
the migration of monarch butterflies; how a bill becomes law; inflation; the structure of DNA; desert ecosystems;
the Olympic Games; minimalism; the history of chess; public libraries; climate change and agriculture;
the ethics of artificial intelligence; the Ottoman Empire; quantum computing; friendship; volunteering;
space exploration; the invention of paper; classical music; the Amazon rainforest; smartphones and attention;
the Cold War; nutrition for athletes; the Mongol Empire; earthquakes; cryptography; open-source software;
the stock market; the life cycle of stars; ancient Egyptian pyramids; compound interest; time management;
the history of the internet; honeybee colonies; wind turbines; the Byzantine Empire; first aid basics;
the scientific method; the human heart; Shakespeare's comedies; mountain climbing; a rainy day in a big city;
moving to a new country; a small family bakery; the first day at a new job; a lighthouse keeper; board games;
the theory of evolution; electricity in the home; the history of money; impressionist painting; glaciers;
the printing of newspapers; the Mars rovers; tea ceremonies; the metric system; the Great Depression;
childhood memories; leadership; customer service; the night sky; sustainable fashion; the Hubble telescope""".replace("\n", " ")
TOPICS = [t.strip() for t in TOPICS.split(";") if t.strip()]

PLACES = ["Lisbon", "Kyoto", "Cape Town", "Reykjavik", "Buenos Aires", "Vancouver", "Marrakech", "Prague", "Hanoi",
          "the Scottish Highlands", "Patagonia", "Istanbul", "Seoul", "Sydney", "New Orleans", "Tuscany", "Oslo",
          "a small fishing village", "the Swiss Alps", "Mexico City", "Nairobi", "Edinburgh", "Bali", "Quebec City"]
ROLES = ["a ship captain", "a detective in 1920s London", "a friendly librarian", "a medieval knight", "a chef",
         "a personal fitness coach", "a museum tour guide", "a travel agent", "a startup founder", "a kindergarten teacher",
         "an astronaut on the space station", "a history professor", "a pirate", "a park ranger", "a barista",
         "a news reporter", "a career counselor", "a wizard in a fantasy kingdom", "a car mechanic", "a gardener",
         "a robot learning about humans", "a famous painter", "a sports commentator", "a tax accountant"]
FORMS = ["a short story", "a poem", "a blog post", "a persuasive essay", "a product description", "a speech",
         "a letter to a friend", "a news article", "a diary entry", "a limerick", "a haiku", "a motivational message",
         "a short essay", "a dialogue between two friends", "a restaurant review", "a cover letter", "a tweet thread",
         "an advertisement", "a children's story", "a formal report"]
PEOPLE = ["your manager", "a new neighbor", "a customer", "your teacher", "a landlord", "a colleague", "your team",
          "a hotel", "a client", "the city council"]
EMAIL_GOALS = ["asking for a deadline extension", "requesting a day off next week", "complaining about a late delivery",
               "thanking them for their help", "proposing a new project", "apologizing for missing a meeting",
               "inviting them to a team lunch", "asking for a refund", "introducing yourself", "following up on an interview"]
CONCEPTS = ["entropy", "supply and demand", "opportunity cost", "natural selection", "the Pythagorean theorem",
            "gravity", "photosynthesis", "recursion", "compound interest", "the greenhouse effect", "inflation",
            "a hash table", "the immune response", "probability", "democracy", "Newton's laws of motion", "osmosis",
            "the separation of powers", "a binary search", "the placebo effect", "cognitive dissonance", "irony",
            "the speed of light", "a neural network", "public key cryptography", "the theory of relativity", "tides",
            "the law of diminishing returns", "an API", "big O notation", "climate versus weather", "a vaccine"]
NAMES = ["Alice", "Bob", "Carlos", "Dana", "Emma", "Farid", "Grace", "Hiro", "Ines", "Jamal", "Kate", "Liam", "Mei",
         "Noah", "Olga", "Priya", "Quinn", "Rosa", "Sam", "Tara"]
ITEMS = ["apples", "pencils", "books", "marbles", "cookies", "stickers", "oranges", "cards", "coins", "tickets"]

WRITE = ["Write {form} about {topic}.", "Write {form} about {topic}. Keep it under 200 words.",
         "Compose {form} about {topic} for a general audience.", "Please write {form} on the topic of {topic}.",
         "Can you write {form} about {topic}?", "Draft {form} that explains {topic} to a teenager.",
         "Write {form} set in {place}.", "Write {form} about a trip to {place}, describing the food and the people.",
         "Create {form} inspired by {topic}, in a humorous tone."]
EMAIL = ["Write an email to {people} {goal}.", "Draft a short, polite email to {people} {goal}.",
         "Help me write a message to {people} {goal}. Keep it professional."]
ROLE = ["Imagine you are {role}. Describe a typical day in your life.", "Pretend you are {role}. How would you explain {topic}?",
        "You are {role}. Give me three pieces of advice about {topic}.", "Act as {role} and introduce yourself to a new visitor.",
        "Role-play as {role}. A customer asks you about {topic}. What do you say?",
        "Suppose you are {role} visiting {place}. Write what you tell your friends afterwards."]
EXPLAIN = ["Explain {concept} in simple terms.", "What is {concept}? Give an example.",
           "How would you explain {concept} to a ten-year-old?", "Describe {concept} and why it matters.",
           "What are the main ideas behind {concept}?", "Compare {concept} and {concept2}.",
           "Give a short overview of {topic}.", "What were the causes and consequences of {topic}?",
           "List five interesting facts about {topic}.", "Discuss the advantages and disadvantages of {topic}.",
           "Summarize the key points of {topic} in a few sentences.", "Why is {topic} important today?",
           "What can we learn from {topic}?", "Outline a lesson plan for teaching {topic} to high school students."]
PREFIX = [("", ""), ("", ""), ("", ""), ("", ""), ("Question: ", "\nAnswer:"), ("Q: ", "\nA:"),
          ("Instruction: ", "\nResponse:"), ("User: ", "\nAssistant:"), ("", "\n")]


def math_prompt() -> str:
    a, b, c = rng.randint(2, 60), rng.randint(2, 30), rng.randint(2, 12)
    n1, n2 = rng.sample(NAMES, 2)
    it = rng.choice(ITEMS)
    return rng.choice([
        f"{n1} has {a} {it} and gives {b} to {n2}. Then {n1} buys {c} more. How many {it} does {n1} have now?",
        f"A shop sells {it} at ${c} each. {n1} buys {a} of them and pays with a ${(a * c // 10 + 1) * 10} bill. How much change does {n1} get?",
        f"Solve for x: {c}x + {a} = {c * b + a}.",
        f"What is {a * c} divided by {c}, plus {b}?",
        f"A train travels at {a + 40} km/h for {c} hours. How far does it travel?",
        f"If f(x) = {c}x^2 - {b}x + {a}, what is f({rng.randint(1, 5)})?",
        f"The sum of two numbers is {a + b} and their difference is {abs(a - b)}. What are the numbers?",
        f"A rectangle is {a} cm long and {b} cm wide. What are its area and perimeter?",
        f"{n1} is {a} years old. {n2} is {c} years older than half of {n1}'s age. How old is {n2}?",
        f"What is the probability of rolling a total of {rng.randint(3, 11)} with two fair six-sided dice?",
        f"Find the greatest common divisor of {a * c} and {b * c}.",
        f"In a class of {a + b} students, {a} play football and {b + c} play chess. If {c} play both, how many play neither?",
        f"{n1}, {n2} and a friend split a bill of ${a * 3 + b}. {n1} pays ${b} more than each of the others. How much does each person pay?",
        f"Is {a * 7 + 3} a prime number? Explain your reasoning step by step.",
        f"A car uses {c} liters of fuel per 100 km. How much fuel does it need for {a * 10} km?",
    ])


def reason_prompt() -> str:
    n1, n2, n3 = rng.sample(NAMES, 3)
    return rng.choice([
        f"{n1} is taller than {n2}, and {n2} is taller than {n3}. Who is the shortest? Explain.",
        f"If all {rng.choice(['cats', 'birds', 'teachers', 'engines'])} in the story are blue and {n1} owns one, what color is it? Is the conclusion certain?",
        f"{n1} said that {n2} lied, and {n2} said that {n3} lied. {n3} said that both of them lied. Who is telling the truth?",
        f"There are three boxes: one with {rng.choice(ITEMS)}, one with {rng.choice(ITEMS)}, and one with both. All labels are wrong. How can you fix the labels by opening one box?",
        f"A clock shows {rng.randint(1, 12)}:{rng.choice(['00', '15', '30', '45'])}. What is the angle between the hour and minute hands?",
        f"{n1} sits to the left of {n2}. {n3} sits to the right of {n2}. Who sits in the middle?",
        "What comes next in the sequence: " + ", ".join(str(x) for x in _seq()) + ", ...?",
    ])


def _seq() -> list[int]:
    a, d = rng.randint(1, 9), rng.randint(2, 7)
    return [a + i * d for i in range(5)] if rng.random() < 0.5 else [a * d ** i for i in range(4)]


def extract_prompt(paras: list[str]) -> str:
    p = rng.choice(paras)
    return rng.choice([
        "Summarize the following text in one sentence:\n{p}", "Read the passage below and list its main points.\n\n{p}",
        "Extract all the technical terms from this paragraph:\n{p}", "{p}\n\nWhat is the main idea of this paragraph?",
        "Rewrite the following paragraph in plain English:\n{p}", "Translate the following text into simpler words:\n{p}",
        "Here is a paragraph:\n{p}\nWrite three questions a student might ask about it.",
        "{p}\n\nQuestion: Based on the text above, what problem does this solve?\nAnswer:",
    ]).format(p=p)


def command_prompts(keep=lambda name: True) -> list[str]:
    out = []
    for f in sorted(glob.glob("/usr/share/man/man1/*.gz"))[::3]:
        name = Path(f).name.split(".")[0]
        if not re.fullmatch(r"[a-z][a-z0-9_-]{1,20}", name) or not keep(name):
            continue
        out.append(rng.choice([f"What does the `{name}` command do?", f"How do I use {name} on Linux? Give an example.",
                               f"Explain the most common options of the {name} command.",
                               f"Write a shell script that uses {name}.", f"What is {name} used for?"]))
    return out


def package_prompts() -> list[str]:
    out = []
    status = Path("/var/lib/dpkg/status").read_text(encoding="utf-8", errors="replace")
    for block in status.split("\n\n"):
        m = re.search(r"^Description: (.+)$", block, re.M)
        p = re.search(r"^Package: (.+)$", block, re.M)
        if not m or not p:
            continue
        desc = m.group(1).strip().rstrip(".")
        out.append(rng.choice([f"Describe the software package {p.group(1)} ({desc}).",
                               f"What is a {desc.lower()} and when would I need one?",
                               f"Explain to a beginner what \"{desc}\" means.",
                               f"Write a short README introduction for a project that provides {desc.lower()}."]))
    return out


def code_instr_prompts(stubs: list[str]) -> list[str]:
    out = []
    for s in stubs:
        m = re.search(r'"""\s*(.+?)[.\n]', s)
        if not m:
            continue
        what = m.group(1).strip()
        if len(what.split()) < 4:
            continue
        what = what[0].lower() + what[1:]
        out.append(rng.choice([f"Write a Python function that does the following: {what}.",
                               f"Implement a function in Python to {what}." if what.split()[0].endswith("e") else f"Write code that {what}.",
                               f"How would you write a program that {what}? Show the code.",
                               f"Write a JavaScript function: {what}.", f"Write a C++ function: {what}."]))
    return out


def instruction_prompts(paras: list[str], stubs: list[str]) -> list[str]:
    gen = []
    for _ in range(N_INSTR_PROMPTS * 2):
        kind = rng.random()
        t1, t2 = rng.sample(TOPICS, 2)
        c1, c2 = rng.sample(CONCEPTS, 2)
        if kind < 0.22:
            q = rng.choice(WRITE).format(form=rng.choice(FORMS), topic=t1, place=rng.choice(PLACES))
        elif kind < 0.30:
            q = rng.choice(EMAIL).format(people=rng.choice(PEOPLE), goal=rng.choice(EMAIL_GOALS))
        elif kind < 0.42:
            q = rng.choice(ROLE).format(role=rng.choice(ROLES), topic=t1, place=rng.choice(PLACES))
        elif kind < 0.62:
            q = rng.choice(EXPLAIN).format(concept=c1, concept2=c2, topic=t1)
        elif kind < 0.74:
            q = math_prompt()
        elif kind < 0.82:
            q = reason_prompt()
        else:
            q = extract_prompt(paras)
        pre, post = rng.choice(PREFIX)
        gen.append(pre + q + post)
    gen = list(dict.fromkeys(gen))
    rng.shuffle(gen)
    extra = command_prompts() + package_prompts() + code_instr_prompts(stubs)
    rng.shuffle(extra)
    out = extra[: N_INSTR_PROMPTS // 4]
    out += gen[: N_INSTR_PROMPTS - len(out)]
    return out


def main(path: str) -> None:
    code = code_docs()
    prose_sources = {"info": info_docs(), "usr_doc": usr_doc(), "metadata": metadata_docs(), "man": man_docs()}
    prose = []
    for name, docs in prose_sources.items():
        rng.shuffle(docs)
        budget, n = PROSE_CHARS * {"info": 0.3, "usr_doc": 0.35, "metadata": 0.1, "man": 0.25}[name], 0
        for d in docs:
            if n > budget:
                break
            prose.append(d)
            n += len(d)
        print(f"prose {name}: {len(docs)} docs available, {n / 1e6:.2f} M chars used", file=sys.stderr)
    paras = [p for p in paragraphs(prose) if not FILT(p)]
    stubs = [s for s in func_prompts(stdlib_files()) if not FILT(s)]
    rng.shuffle(stubs)
    instr = [q for q in instruction_prompts(paras, stubs) if not FILT(q)]
    funcs = stubs[:N_FUNC_PROMPTS]
    prompts = funcs + instr
    rng.shuffle(prompts)
    docs = [d for d in code + prose if not FILT(d[:2000])]  # windows are filtered again at training time
    rng.shuffle(docs)
    with open(path, "w", encoding="utf-8") as f:
        for d in docs:
            f.write(json.dumps({"text": d}) + "\n")
        for q in prompts:
            f.write(json.dumps({"prompt": q}) + "\n")
    print(f"code docs {len(code)} ({sum(map(len, code)) / 1e6:.2f} M chars), prose docs {len(prose)} "
          f"({sum(map(len, prose)) / 1e6:.2f} M chars), function-stub prompts {len(funcs)}, instruction prompts "
          f"{len(instr)}, paragraphs {len(paras)}; {os.path.getsize(path) / 2**20:.1f} MiB", file=sys.stderr)


if __name__ == "__main__":
    main(sys.argv[1])
