"""`leanlm probe`: compare students' greedy behaviour with their teacher's; JSON, Markdown and a plot.

    leanlm probe --student runs/prune25/model --teacher smollm2-135m --out runs/probe
    leanlm probe --student pruned=runs/p/stages/t1-prune_heads/model recovered=runs/p/model --out runs/probe
"""

from __future__ import annotations

import argparse
import logging
import shlex
import sys
from pathlib import Path

from leanlm.cli_types import positive_int
from leanlm.errors import LeanLMError

log = logging.getLogger("leanlm")

BUILTIN_TEXTS = ("wikitext-test", "botchan")


def add_parser(sub) -> argparse.ArgumentParser:
    """The `probe` sub-command's own options; `cli.py` adds the shared --device (no import of cli here: no cycle)."""
    pr = sub.add_parser("probe", help="behaviour probe: greedy agreement, divergence, KL and accuracy of students vs the teacher",
                        description="Decode procedurally generated multi-step prompts (answers checked by code) and "
                                    "held-out text with the teacher and each student; write DIR/results.json, "
                                    "DIR/report.md and DIR/plots/agreement.png.")
    pr.add_argument("--student", nargs="+", required=True, metavar="[LABEL=]MODEL", dest="students",
                    help="one or more models to compare with the teacher (directory, bundled name, ...)")
    pr.add_argument("--teacher", default="smollm2-135m", help="the original model (default: %(default)s)")
    pr.add_argument("--out", type=Path, help="new results directory (default runs/probe-TEACHER-TIME)")
    pr.add_argument("--families", default="relation_chain,arithmetic,list_order,copying,counting",
                    help="comma list of prompt families (default: %(default)s)")
    pr.add_argument("--per-family", type=positive_int, default=8, help="prompts per family (default: %(default)s)")
    pr.add_argument("--shots", type=int, default=2,
                    help="solved examples of the same family before each prompt (default: %(default)s)")
    pr.add_argument("--texts", default="wikitext-test",
                    help="comma list of held-out texts to continue: wikitext-test, botchan or a UTF-8 file; "
                         "'none' for no continuations (default: %(default)s)")
    pr.add_argument("--continuations", type=int, default=8, help="passages per text (default: %(default)s)")
    pr.add_argument("--continuation-tokens", type=positive_int, default=48,
                    help="prompt tokens of each passage (default: %(default)s)")
    pr.add_argument("--new-tokens", type=positive_int, default=64, help="greedy tokens per prompt (default: %(default)s)")
    pr.add_argument("--seed", type=int, default=0, help="prompt seed (default: %(default)s)")
    pr.add_argument("--batch-size", type=positive_int, default=8, help="prompts per batch (default: %(default)s)")
    pr.add_argument("--chat", action="store_true", help="wrap the prompts in the tokenizer's chat template")
    pr.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32", "float16"],
                    help="dtype both models run in (default: %(default)s)")
    return pr


def parse_students(values: list[str]) -> dict[str, str]:
    """'LABEL=MODEL' or 'MODEL' (labelled by its folder names) → {label: model}; labels must differ."""
    from leanlm.sources import check_source

    students = {}
    for value in values:
        label, _, source = value.partition("=") if "=" in value else ("", "", value)
        label = label or "/".join(Path(source).parts[-2:])
        if label in students:
            raise LeanLMError(f"two students are labelled '{label}'; name them with LABEL=MODEL")
        check_source(source)  # an unknown model fails before anything loads
        students[label] = source
    return students


def read_text(name: str) -> str:
    if name == "wikitext-test":
        from leanlm.data import wikitext_text

        return wikitext_text("test")
    if name == "botchan":
        from leanlm.data.ood import ood_text

        return ood_text()
    path = Path(name)
    if not path.is_file():
        raise LeanLMError(f"--texts: '{name}' is neither {' nor '.join(BUILTIN_TEXTS)} nor a file")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise LeanLMError(f"--texts: '{name}' is not UTF-8 text") from None


def build_prompts(args, tokenizer) -> list:
    from leanlm.evaluate.probe import continuation_prompts, make_prompts

    families = [f for f in args.families.split(",") if f]
    prompts = make_prompts(families, args.per_family, args.seed, args.shots) if families else []
    texts = [] if args.texts == "none" else [t for t in args.texts.split(",") if t]
    for name in texts:
        prompts += continuation_prompts(Path(name).name, read_text(name), tokenizer, args.continuations,
                                        args.continuation_tokens, args.seed)
    return prompts


def run(args: argparse.Namespace) -> int:
    from leanlm.evaluate.probe import ProbeConfig, probe
    from leanlm.evaluate.probe.plot import markdown_report, plot_agreement
    from leanlm.models import load_model, load_tokenizer
    from leanlm.outputs import default_out
    from leanlm.report import atomic_write_json, atomic_write_text, check_new_output, git_info, staged_output, versions

    students = parse_students(args.students)
    out = args.out or default_out("probe", args.teacher)
    check_new_output(out)
    families = tuple(f for f in args.families.split(",") if f)
    config = ProbeConfig(families=families, per_family=args.per_family, shots=args.shots, new_tokens=args.new_tokens,
                         seed=args.seed, batch_size=args.batch_size, chat=args.chat, continuations=args.continuations,
                         continuation_tokens=args.continuation_tokens)
    config.check()
    tokenizer = load_tokenizer(args.teacher)
    prompts = build_prompts(args, tokenizer)
    log.info("loading the teacher %s and %d student(s) (%s)", args.teacher, len(students), args.dtype)
    teacher = load_model(args.teacher, args.dtype, args.device)
    loaded = {label: load_model(source, args.dtype, args.device) for label, source in students.items()}
    results = probe(teacher, loaded, tokenizer, prompts, config)
    results |= {"teacher": args.teacher, "student_sources": students, "texts": args.texts, "dtype": args.dtype,
                "command": "leanlm " + " ".join(shlex.quote(a) for a in sys.argv[1:]), "versions": versions(),
                "git": git_info()}
    with staged_output(out) as stage:
        (stage / "plots").mkdir()
        plot_agreement(results, stage / "plots" / "agreement.png")
        atomic_write_json(stage / "results.json", results)
        atomic_write_text(stage / "report.md", markdown_report(results))
    print(markdown_report(results))
    print(f"wrote {out}/results.json, report.md and plots/agreement.png")
    return 0
