"""What README and docs/ tell a reader to type is what the code accepts, and what CI installs and runs.

Every shell command in a README code block must be one this file knows how to check (a new kind of command needs
a checker here): scripts and configs it names exist, each config loads with the overrides the command gives
(`training.load_config`: key names, types, values), and each Python entry point's argument parser accepts the
flags. README's Install and Tests sections must match `.ci/run` (the torch pin, the requirement files, the test
command with HF_HUB_OFFLINE). The commands in docs/*.md get the same checks where a checker applies. The commands
themselves run elsewhere: the toy flow in test_train_toy.py, the demo in test_demo.py, the `Captioner` API in
test_inference.py, prepare_data and reproduce.sh in test_reproduce.py.
"""
from __future__ import annotations

import argparse
import ast
import importlib.util
import inspect
import re
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
DOCS = sorted((REPO / "docs").glob("*.md"))
CI = REPO / ".ci" / "run"
README_MAX_LINES = 200  # a landing page; details belong in docs/
ENV_ASSIGNMENT = re.compile(r"^[A-Z_][A-Z0-9_]*=")
FENCE = re.compile(r"^```(\w*)\s*$")


@dataclass
class Block:
    language: str
    text: str
    section: str  # the "## " heading the block sits under
    source: str   # "README.md:12"


def code_blocks(path: Path) -> list[Block]:
    blocks, section, language, lines, start = [], "", None, [], 0
    for number, line in enumerate(path.read_text().splitlines(), 1):
        fence = FENCE.match(line.strip())
        if language is None:
            if line.startswith("## "):
                section = line[3:].strip()
            elif fence:
                language, lines, start = fence.group(1), [], number
        elif line.strip() == "```":
            blocks.append(Block(language, "\n".join(lines), section, f"{path.name}:{start}"))
            language = None
        else:
            lines.append(line)
    return blocks


@dataclass
class Command:
    env: dict
    argv: list
    source: str
    section: str


def shell_commands(block: Block) -> list[Command]:
    """Each command of a bash block: continuation lines joined, comments dropped, `a && b` split, leading
    VAR=value assignments taken out as the command's environment."""
    commands = []
    for line in block.text.replace("\\\n", " ").splitlines():
        tokens = shlex.split(line, comments=True)
        while tokens:
            part, tokens = (tokens[:tokens.index("&&")], tokens[tokens.index("&&") + 1:]) if "&&" in tokens \
                else (tokens, [])
            env = {}
            while part and ENV_ASSIGNMENT.match(part[0]):
                name, _, value = part.pop(0).partition("=")
                env[name] = value
            if part:
                commands.append(Command(env, part, block.source, block.section))
    return commands


def ci_torch_pin() -> list[str]:
    match = re.search(r"^TORCH=\(([^)]*)\)", CI.read_text(), re.MULTILINE)
    assert match, ".ci/run no longer defines TORCH=(...), which README's Install section must match"
    return match.group(1).split()


class Unchecked(Exception):
    """No checker for this command."""


class _Parsed(Exception):
    def __init__(self, namespace):
        super().__init__("parsed")
        self.namespace = namespace


def _load_module(path: Path, monkeypatch):
    monkeypatch.setattr(sys, "path", [str(path.parent), str(REPO), *sys.path])  # scripts import their neighbours
    spec = importlib.util.spec_from_file_location(f"_docs_check_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def _parse_with_main(path: Path, args: list[str], monkeypatch) -> argparse.Namespace:
    """Run the script's main() only as far as its argument parser: parse_args raises once it has parsed."""
    module = _load_module(path, monkeypatch)
    original = argparse.ArgumentParser.parse_args

    def parse_then_stop(self, args=None, namespace=None):
        raise _Parsed(original(self, args, namespace))

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse_then_stop)
    monkeypatch.setattr(sys, "argv", [str(path), *args])
    main = module.main
    try:
        main(args) if inspect.signature(main).parameters else main()
    except _Parsed as parsed:
        return parsed.namespace
    raise AssertionError(f"{path.name}: main() returned without parsing its arguments")


def _load_config(config: str, overrides: list[str]) -> dict:
    import training

    assert (REPO / config).is_file(), f"config {config} does not exist"
    return training.load_config(REPO / config, overrides)


def _split_wrapper_args(args: list[str]) -> tuple[list[str], list[str]]:
    """scripts/train.sh's argument handling: a bare KEY=VALUE becomes --opt KEY=VALUE."""
    converted = []
    for arg in args:
        converted += ["--opt", arg] if not arg.startswith("-") and "=" in arg else [arg]
    overrides = [converted[i + 1] for i, arg in enumerate(converted) if arg == "--opt"]
    return converted, overrides


def check_command(command: Command, monkeypatch) -> None:
    argv = command.argv
    program, args = argv[0], argv[1:]
    if program == "pip" and args[:1] == ["install"]:
        for flag, value in zip(args, args[1:]):
            if flag in ("-r", "-c"):
                assert (REPO / value).is_file(), f"{value} does not exist"
        pins = [arg for arg in args if arg.startswith(("torch==", "torchvision=="))]
        if pins:
            assert pins == ci_torch_pin(), f"torch pin {pins} differs from .ci/run's {ci_torch_pin()}"
        return
    if program in (".", "source") or argv[:3] == ["python", "-m", "venv"]:
        return
    if argv[:3] == ["python", "-m", "pytest"]:
        assert command.env.get("HF_HUB_OFFLINE") == "1", "the test command runs offline (HF_HUB_OFFLINE=1)"
        ci = CI.read_text()
        assert re.search(r"^export HF_HUB_OFFLINE=1\b", ci, re.MULTILINE), ".ci/run must export HF_HUB_OFFLINE=1"
        assert f"python -m pytest {' '.join(args[2:])}".strip() in ci, f"{' '.join(argv)} is not what .ci/run runs"
        return
    if program == "bash" and args and args[0].startswith("scripts/"):
        script, rest = args[0], args[1:]
        assert (REPO / script).is_file(), f"{script} does not exist"
        if script in ("scripts/train.sh", "scripts/eval.sh"):
            import eval_caption
            import train_caption

            default = "configs/coco/eval_released.yaml" if script.endswith("eval.sh") else "configs/coco/smile.yaml"
            config, rest = (rest[0], rest[1:]) if rest else (default, [])
            converted, overrides = _split_wrapper_args(rest)
            entry = eval_caption if script.endswith("eval.sh") else train_caption
            entry.parse_args(["--config", config, *converted])
            _load_config(config, overrides)
            return
        if script == "scripts/caption.sh":  # every argument goes to caption_images.py
            import caption_images

            caption_images.parse_args(rest)
            return
        if script == "scripts/reproduce.sh":
            dataset, (_, overrides) = rest[0], _split_wrapper_args(rest[1:])
            assert dataset in ("coco", "flickr30k", "toy"), f"reproduce.sh has no dataset {dataset}"
            rows = command.env.get("ROWS", "mle").split()
            for row in rows:
                _load_config(f"configs/{dataset}/{row}.yaml", overrides)
            return
        raise Unchecked(script)
    if program == "python" and args and args[0].endswith(".py"):
        path, rest = REPO / args[0], args[1:]
        assert path.is_file(), f"{args[0]} does not exist"
        if args[0] == "train_caption.py":
            import train_caption

            parsed = train_caption.parse_args(rest)
            _load_config(parsed.config, parsed.opt)
        elif args[0] == "eval_caption.py":
            import eval_caption

            parsed = eval_caption.parse_args(rest)
            if parsed.config:
                _load_config(parsed.config, parsed.opt)
        elif args[0] == "demo.py":
            import demo

            demo.parse_args(rest)
        elif args[0] == "scripts/prepare_data.py":
            _load_module(path, monkeypatch).parse_args(rest)
        else:
            parsed = _parse_with_main(path, rest, monkeypatch)
            config = getattr(parsed, "config", None)
            if config and config.startswith("configs/"):
                assert (REPO / config).is_file(), f"{config} does not exist"
        return
    raise Unchecked(" ".join(argv))


def check_python_block(block: Block) -> None:
    """A Python example parses, imports what exists, and calls Captioner with options it accepts."""
    tree = ast.parse(block.text)
    import models
    from models.inference import DEFAULT_GENERATION

    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            module = __import__(node.module, fromlist=[alias.name for alias in node.names])
            for alias in node.names:
                assert hasattr(module, alias.name), f"{node.module} has no {alias.name}"
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            if node.func.attr == "caption":
                options = {keyword.arg for keyword in node.keywords} - {"batch_size"}
                assert options <= set(DEFAULT_GENERATION), f"Captioner.caption has no option(s) {options}"
            if node.func.attr == "from_pretrained":
                keywords = {keyword.arg for keyword in node.keywords}
                assert keywords <= set(inspect.signature(models.Captioner.from_pretrained).parameters)


def check_yaml_block(block: Block) -> None:
    """A YAML example headed `# configs/X.yaml` shows lines that are in that file."""
    first, *lines = block.text.splitlines()
    match = re.match(r"#\s*(configs/\S+\.yaml)$", first.strip())
    if match:
        text = (REPO / match.group(1)).read_text()
        for line in lines:
            assert line in text.splitlines(), f"{match.group(1)} has no line {line!r}"


def _commands(paths):
    for path in paths:
        for block in code_blocks(path):
            if block.language == "bash":
                yield from shell_commands(block)


README_COMMANDS = list(_commands([README]))
DOC_COMMANDS = list(_commands(DOCS))


def test_readme_is_a_landing_page():
    lines = README.read_text().count("\n")
    assert lines <= README_MAX_LINES, f"README.md has {lines} lines; move details into docs/"


def test_readme_has_the_sections_ci_relies_on():
    sections = {block.section for block in code_blocks(README)}
    assert {"Install", "Tests"} <= sections  # .ci/run: "README, Install" and "README, Tests"
    install = [command for command in README_COMMANDS if command.section == "Install"]
    requirement_files = {command.argv[-1] for command in install if command.argv[:3] == ["pip", "install", "-r"]}
    assert {"requirements.txt", "requirements-extra.txt"} <= requirement_files
    assert any(command.argv[2:] == ci_torch_pin() for command in install), "README must install .ci/run's torch pin"
    tests = [command for command in README_COMMANDS if command.section == "Tests"]
    assert [command.argv for command in tests] == [["python", "-m", "pytest", "-q"]]


@pytest.mark.parametrize("command", README_COMMANDS, ids=lambda c: f"{c.source} {' '.join(c.argv)[:60]}")
def test_readme_command(command, monkeypatch):
    try:
        check_command(command, monkeypatch)
    except Unchecked as what:
        pytest.fail(f"{command.source}: no check for README command {what}; add one to tests/test_readme.py")


@pytest.mark.parametrize("command", DOC_COMMANDS, ids=lambda c: f"{c.source} {' '.join(c.argv)[:60]}")
def test_docs_command(command, monkeypatch):
    try:
        check_command(command, monkeypatch)
    except Unchecked:
        pass  # docs may show other tools (tensorboard, nltk's downloader); what can be checked is


@pytest.mark.parametrize("path", [README, *DOCS], ids=lambda p: p.name)
def test_python_and_yaml_examples(path):
    for block in code_blocks(path):
        if block.language == "python":
            check_python_block(block)
        elif block.language == "yaml":
            check_yaml_block(block)


def test_the_checker_catches_a_broken_command(monkeypatch):
    broken = [
        ["bash", "scripts/train.sh", "configs/toy/missing.yaml"],
        ["bash", "scripts/train.sh", "configs/toy/smile.yaml", "train.batch_sise=16"],
        ["python", "eval_caption.py", "--config", "configs/toy/smile.yaml", "--checkpiont", "x"],
        ["python", "scripts/convert_checkpoint.py", "a.pth"],
        ["pip", "install", "torch==1.0", "torchvision==0.1"],
    ]
    import training

    for argv in broken:
        with pytest.raises((AssertionError, SystemExit, *training.USER_ERRORS)):
            check_command(Command({}, argv, "test", ""), monkeypatch)
    with pytest.raises(Unchecked):
        check_command(Command({}, ["make", "all"], "test", ""), monkeypatch)
