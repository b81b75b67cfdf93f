"""Every command the README shows works. Each line of its ```bash blocks matches one rule below: the cheap
ones (tiny, toy, tiny-sdxl, evaluate, bench tiny, torchrun x2 on the CPU) are run, shrunk by flags appended
at the end (the last value of a flag wins); GPU and hub commands are parsed (the exact flag set, through
the script's own parser); the install and test commands are the ones CI runs. A command no rule covers
fails the test: add a rule with the new command. Commands run in order, in one temporary folder (with
prompts/ and weights/ linked in), so a later command can use the run folder an earlier one wrote."""

import os
import re
import shlex
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = ("train_ddpo.py", "train_alignprop.py", "train_grpo.py", "evaluate.py", "compare.py", "bench.py", "bench_gpu.py", "toy.py",
           "toy_pretrain.py")
GPU = re.compile(r"\b(sd15|sdxl|sd35m|sd15-gpu|sdxl-gpu|cuda|nproc_per_node=8)\b|--model /|/path/to/")

# flags appended to a cheap command, by script and first argument (the preset or subcommand)
SHRINK = {
    ("train_ddpo.py", None): "--num-epochs 1 --sample.num-steps 2 --sample.batch-size 2 --sample.num-batches 2 "
                             "--train.batch-size 2 --train.updates-per-epoch 1 --train.timesteps-per-forward 1 "
                             "--eval.samples-per-prompt 1 --log.save-every 1",
    ("train_alignprop.py", None): "--num-epochs 1 --sample.num-steps 2 --train.batch-size 2 --train.total-batch 4 --k 1 "
                                  "--eval.samples-per-prompt 1 --log.save-every 1",
    ("evaluate.py", "sample"): "--num-steps 2",
    ("evaluate.py", "score"): "--num-steps 2 --samples-per-prompt 1",
    ("compare.py", None): "",
    ("train_grpo.py", None): "--num-epochs 1",
    ("train_grpo.py", "toy"): "--num-epochs 1 --sample.num-steps 2 --sample.sde-window 0 1 --sample.group-size 2 "
                              "--sample.prompts-per-batch 1 --sample.num-batches 1 --train.batch-size 2 "
                              "--eval.samples-per-prompt 1",
    ("bench.py", None): "--stages sample --burn-in 0 --iters 1",
    ("toy_pretrain.py", "eval"): "--per-caption 1 --num-steps 2 --threads 1",
    ("toy_pretrain.py", "pretrain"): "--steps 2 --out pretrained-toy",
    ("toy_pretrain.py", "train-classifier"): "--steps 2 --out classifier.safetensors",
}


def readme_commands() -> list[str]:
    text = open(os.path.join(ROOT, "README.md")).read()
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = re.sub(r"\s+#.*$", "", line).strip()  # drop trailing comments
            if line and not line.startswith("#"):
                commands.append(line)
    return commands


def plan(command: str):
    """-> (action, detail): 'ci' (the install / test commands), 'run' (shrunk), 'parse', 'skip'."""
    words = shlex.split(command)
    if "pip install" in command or words[:4] == [".venv/bin/python", "-m", "pytest", "-q"]:
        return "ci", command
    if words[0] == "tensorboard":
        return "import", "tensorboard"
    if words[0] in ("python", ".venv/bin/python") and words[1] == "-c":
        return ("compile" if GPU.search(command) else "run"), command
    script = next((w for w in words if w.endswith(".py")), None)
    if script not in SCRIPTS:
        raise AssertionError(f"README command without a rule: {command!r} (add one to tests/test_readme.py)")
    return ("parse" if GPU.search(command) else "run"), command


def shrink(command: str) -> str:
    words = shlex.split(command)
    i = next(k for k, w in enumerate(words) if w.endswith(".py"))
    script, first = words[i], (words[i + 1] if len(words) > i + 1 else None)
    extra = SHRINK.get((script, first), SHRINK.get((script, None)))
    if extra is None:
        raise AssertionError(f"no shrinking flags for {script} {first}")
    words[i] = os.path.join(ROOT, script)
    if script == "bench.py" and "--out" not in words:
        extra += " --out bench.jsonl"
    return " ".join(shlex.quote(w) if not any(c in w for c in "*?") else w for w in words) + " " + extra


def parse_only(command: str):
    """Parses the exact flag set with the script's own parser (tyro): a misspelt flag or value fails."""
    words = shlex.split(command)
    i = next(k for k, w in enumerate(words) if w.endswith(".py"))
    module = __import__(os.path.splitext(words[i])[0])
    module.cli(words[i + 1:])


@pytest.mark.slow
def test_readme_commands(tmp_path, free_port):
    commands = readme_commands()
    assert len(commands) >= 8, commands
    ci = open(os.path.join(ROOT, ".ci", "run")).read()
    for link in ("prompts", "weights"):
        os.symlink(os.path.join(ROOT, link), tmp_path / link)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT, WANDB_MODE="offline", WANDB_SILENT="true",
               PET_MASTER_PORT=str(free_port))  # torchrun's --master-port, free now
    python = sys.executable
    ran = []
    for command in commands:
        action, detail = plan(command)
        if action == "ci":
            if "pytest" in command:  # CI runs exactly the README's test command
                assert command in ci, (command, ci)
            else:
                assert "pip install -q -r requirements.txt" in ci and "requirements.txt" in command
        elif action == "import":
            pytest.importorskip(detail)
        elif action == "compile":
            code = shlex.split(command)[2]
            compile(code, "<readme>", "exec")
        elif action == "parse":
            parse_only(command)
        else:
            line = shrink(command) if "-c" not in shlex.split(command)[:2] else command
            line = re.sub(r"^(\.venv/bin/)?python\b", shlex.quote(python), line)
            line = re.sub(r"^torchrun\b", shlex.quote(os.path.join(os.path.dirname(python), "torchrun")), line)
            out = subprocess.run(["bash", "-c", line], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
            assert out.returncode == 0, f"README command failed: {command}\n(ran: {line})\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
            ran.append(command)
    assert ran, "no README command was run"
