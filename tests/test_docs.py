"""The documentation agrees with the code: docs/flags.md's preset table is the presets' own settings, every
default it states is the code's default, every preset's one-line description names its model and reward,
and every example epoch line in README.md and docs/ has the format the trainers print."""

import dataclasses
import os
import re

import pytest

import train_alignprop
import train_grpo
import train_ddpo

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAINERS = {"DDPO": train_ddpo, "AlignProp": train_alignprop, "GRPO": train_grpo}


def read(path: str) -> str:
    with open(os.path.join(ROOT, path)) as f:
        return f.read()


def shown(path: str) -> str:
    """A preset's model or prompt file as the docs show it: relative to the repository."""
    return os.path.relpath(path, ROOT) if os.path.isabs(path) else path


def presets_table() -> str:
    rows = ["| preset | trainer | model | prompts | reward | steps | guidance | t_thres | w_low | epochs | samples / epoch |",
            "|---|---|---|---|---|---|---|---|---|---|---|"]
    for trainer, module in TRAINERS.items():
        for name, (_, c) in module.PRESETS.items():
            per_epoch = {"DDPO": lambda: c.sample.batch_size * c.sample.num_batches, "AlignProp": lambda: c.train.total_batch,
                         "GRPO": lambda: c.sample.group_size * c.sample.prompts_per_batch * c.sample.num_batches}[trainer]()
            rows.append(f"| `{name}` | {trainer} | `{shown(c.model)}` | `{shown(c.prompts)}` | `{c.reward.name}` | "
                        f"{c.sample.num_steps} | {c.sample.guidance_scale:g} | {c.explore.t_thres} | {c.explore.w_low:g} | "
                        f"{c.num_epochs} | {per_epoch} |")
    return "\n".join(rows)


def test_flags_md_preset_table_is_the_code():
    """Regenerate with: python -c "import sys; sys.path[:0] = ['.', 'tests']; import test_docs; print(test_docs.presets_table())" """
    doc = read("docs/flags.md")
    table = re.search(r"<!-- presets -->\n(.*?)\n<!-- /presets -->", doc, re.S)
    assert table, "docs/flags.md has no <!-- presets --> ... <!-- /presets --> block"
    assert table.group(1).strip() == presets_table(), "docs/flags.md's preset table is stale; the code gives:\n" + presets_table()


def field(cfg, dotted: str):
    """The value of --a.b-c in a Config, or a KeyError."""
    for part in dotted.split("."):
        name = part.replace("-", "_")
        if not dataclasses.is_dataclass(cfg) or name not in {f.name for f in dataclasses.fields(cfg)}:
            raise KeyError(dotted)
        cfg = getattr(cfg, name)
    return cfg


def stated_defaults(text: str) -> list[tuple[str, str, str]]:
    """(flag, trainer or '', value) for every '`--flag` (default VALUE' or '`--flag` (TRAINER default VALUE'."""
    return re.findall(r"`--([a-z0-9.-]+)`\s+\((?:(DDPO|AlignProp|GRPO) )?default ([^,;:)]+)", text)


def test_stated_defaults_are_the_code_defaults():
    doc = read("docs/flags.md")
    found = stated_defaults(doc)
    assert len(found) >= 8  # the parse found the defaults the page states
    for flag, trainer, value in found:
        checked = 0
        for name, module in TRAINERS.items():
            if trainer and trainer != name:
                continue
            try:
                actual = field(module.BASE, flag)
            except KeyError:
                continue
            checked += 1
            if isinstance(actual, bool) or not isinstance(actual, (int, float)):
                assert value.strip("`") == str(actual), (flag, name, value, actual)
            else:
                assert float(value) == actual, (flag, name, value, actual)
        assert checked, f"docs/flags.md states a default for --{flag}, which no trainer has"


# What a preset's one-line description must say about its model and reward
MODEL_WORDS = {"tiny": "tiny", "tiny-sd3": "tiny", "sd15": "SD v1.5", "sdxl": "SDXL", "sd35m": "SD3.5 Medium"}
REWARD_WORDS = {"brightness": "brightness", "aesthetic": "LAION aesthetic", "pickscore": "PickScore",
                "toy-aesthetic": "aesthetic task", "toy-classifier": "toy-classifier"}


@pytest.mark.parametrize("trainer", TRAINERS)
def test_preset_descriptions_name_model_and_reward(trainer):
    for name, (description, c) in TRAINERS[trainer].PRESETS.items():
        model_word = MODEL_WORDS.get(c.model, "toy")
        assert model_word in description, (trainer, name, description)
        assert REWARD_WORDS[c.reward.name] in description, (trainer, name, description)
        assert "README" not in description or "see README" not in description, (trainer, name, description)


NUM = r"-?[\d.]+(?:e[-+]?\d+)?"
TAIL = rf" \| (explore|plain) \| [\d.]+ s( \| plain {NUM})?( \| heldout {NUM})?$"
EPOCH_LINES = {  # the format of scaffold.Run.end_epoch with each trainer's details
    "DDPO": re.compile(rf"^epoch \d+ \| reward {NUM}±{NUM} \| kl {NUM} \| clipfrac {NUM} \| loss {NUM}" + TAIL),
    "AlignProp": re.compile(rf"^epoch \d+ \| reward {NUM}±{NUM} \| loss {NUM} \| grad norm {NUM} \| "
                            rf"grads from step {NUM}/\d+" + TAIL),
}


def test_example_epoch_lines_have_the_printed_format():
    lines = []
    for path in ["README.md"] + [os.path.join("docs", f) for f in sorted(os.listdir(os.path.join(ROOT, "docs")))]:
        if path.endswith(".md"):
            lines += [(path, line.strip()) for line in read(path).splitlines() if re.match(r"\s+epoch \d+ \|", line)]
    assert lines, "no example epoch line found"
    for path, line in lines:
        assert any(p.match(line) for p in EPOCH_LINES.values()), f"{path}: stale example epoch line: {line}"
