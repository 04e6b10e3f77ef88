"""The ``mta-local`` command line: parse, call the library, print. Results go to stdout, the rest to stderr."""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from pathlib import Path

import click

from . import __version__
from .config import EnrollConfig, LoraConfig, cache_dir, profiles_dir, stack_config, user_dir
from .errors import MtaError
from .tasks import TASKS

# enroll and chat never reach a model hub: everything loads from local files
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


class MtaGroup(click.Group):
    """A click group that turns library errors into one-line messages (exit 1, no traceback)."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except MtaError as exc:
            raise click.ClickException(str(exc)) from None
        except KeyboardInterrupt:
            click.echo("\ninterrupted; nothing was changed.", err=True)
            ctx.exit(130)


@click.group(cls=MtaGroup)
@click.version_option(__version__, prog_name="mta-local")
@click.option("-v", "--verbose", is_flag=True, help="Log each stage with its timing, and debug details, to stderr.")
def cli(verbose):
    """Personalize a local LLM with your own history, on your own machine.

    \b
    mta-local enroll docs/examples/lamp2-user-8000029.json
    mta-local chat --prompt "Which tag does this movie relate to ..."
    mta-local chat
    """
    logging.basicConfig(level=logging.DEBUG if verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if verbose:
        for name in ("mta_local",):
            logging.getLogger(name).setLevel(logging.DEBUG)
    for noisy in ("urllib3", "filelock", "sentence_transformers", "httpx", "transformers", "peft"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _progress_bar(label: str, silent: bool):
    """Return (callback, close) driving a click progress bar that shows the latest loss."""
    if silent or not sys.stderr.isatty():
        def callback(step, total, loss):
            if step == total:
                click.echo(f"{label}: {total} steps, final loss {loss:.4f}", err=True)
        return callback, lambda: None
    state = {"bar": None, "done": 0}

    def callback(step, total, loss):
        if state["bar"] is None:
            state["bar"] = click.progressbar(length=total, label=label, file=sys.stderr, show_pos=True,
                                             item_show_func=lambda item: item)
            state["bar"].__enter__()
        state["bar"].update(step - state["done"], f"loss {loss:.4f}")
        state["done"] = step

    def close():
        if state["bar"] is not None:
            state["bar"].__exit__(None, None, None)
    return callback, close


# ---------------------------------------------------------------------------------------------
# enroll

@cli.command()
@click.argument("history", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--profile", default="default", show_default=True, help="Name of the profile to create or replace.")
@click.option("--task", type=click.Choice(list(TASKS)), help="Task of the history items (detected from their fields if omitted).")
@click.option("--bank", help="Bank name or folder (default: the built-in bank for the task).")
@click.option("--model", help="Base model: a llama-architecture GGUF file (default: packaged SmolLM2-135M-Instruct Q4_1).")
@click.option("--embedder", help="Embedder name or folder (default: the one the bank was built with).")
@click.option("--top-k", default=2, show_default=True, type=click.IntRange(1, 64), help="Anchors merged for this user.")
@click.option("--epochs", type=click.IntRange(1, 100), help="Stacked-adapter epochs (default: per task).")
@click.option("--lr", "learning_rate", type=float, help="Stacked-adapter peak learning rate (default: per task).")
@click.option("--rank", type=click.IntRange(1, 64), help="Stacked-adapter LoRA rank.  [default: 4]")
@click.option("--seed", default=0, show_default=True, help="Seed for the stacked adapter's initialisation and shuffle.")
@click.option("--merge", type=click.Choice(["exact", "averaged"]), default="exact", show_default=True,
              help="exact: sum of weighted dW; averaged: lora_A/lora_B averaged separately (ablation only).")
@click.option("--silent", is_flag=True, help="No progress bar.")
def enroll(history, profile, task, bank, model, embedder, top_k, epochs, learning_rate, rank, seed, merge, silent):
    """Personalize the base model with a history file and save the profile.

    Embeds the history, picks the most similar anchors of the bank, merges them,
    trains a rank-4 stacked adapter on the history items and exports a GGUF adapter
    for llama.cpp. Nothing leaves this machine.

    \b
    mta-local enroll docs/examples/lamp2-user-8000029.json
    mta-local enroll reviews.json --task product_rating --top-k 3 --profile alice
    """
    from .enroll import enroll as run_enroll
    from .history import read_history

    history_task = task or read_history(history, task).task.name
    stack = stack_config(history_task, epochs=epochs, learning_rate=learning_rate, seed=seed,
                         **({"rank": rank, "alpha": 2.0 * rank} if rank else {}))
    callback, close = _progress_bar("training stacked adapter", silent)
    started = time.perf_counter()
    try:
        result = run_enroll(history, EnrollConfig(top_k=top_k, profile=profile), stack, task=task, bank=bank,
                            model=model, embedder=embedder, merge=merge, progress=callback)
    finally:
        close()

    click.echo(f"profile {profile!r} ({result.task}) written to {result.profile_path}")
    click.echo(f"bank {result.bank_id}; anchors: " + ", ".join(
        f"{choice.anchor_id} (similarity {choice.similarity:.3f}, weight {choice.weight:.3f})" for choice in result.anchors))
    click.echo(f"final training loss {result.losses[-1]:.4f}; profile size {result.size_bytes / 1e6:.1f} MB; "
               f"{time.perf_counter() - started:.1f} s")
    logging.getLogger(__name__).info("timings: %s", ", ".join(f"{k} {v:.2f} s" for k, v in result.timings.items()))
    click.echo(f"next: mta-local chat --profile {profile}", err=True)


# ---------------------------------------------------------------------------------------------
# chat

@cli.command()
@click.option("--profile", default="default", show_default=True, help="Profile to chat with.")
@click.option("-p", "--prompt", help="Ask one question, print the answer and exit.")
@click.option("--max-tokens", default=256, show_default=True, type=click.IntRange(1, 8192), help="Max tokens per answer.")
@click.option("--temperature", default=0.0, show_default=True, type=click.FloatRange(0.0, 5.0), help="Sampling temperature (0: greedy).")
@click.option("--history-items", type=click.IntRange(0, 20), help="History items retrieved into each turn (default: as in training).")
@click.option("--threads", type=click.IntRange(1, 512), help="llama.cpp threads (default: llama.cpp's choice).")
def chat(profile, prompt, max_tokens, temperature, history_items, threads):
    """Chat with your personalized model through llama.cpp.

    The base GGUF is loaded with the profile's adapter, and the adapter is checked
    to be in effect before the first answer. Each turn gets the most relevant
    history items (BM25) above it, as in training.

    \b
    mta-local chat --prompt "Which tag does this movie relate to among ... Tag:"
    mta-local chat --profile alice        # interactive; empty line or Ctrl-D quits
    """
    from .chat import ChatSession
    from .profile import load_profile

    session = ChatSession(load_profile(profile), history_in_prompt=history_items, threads=threads)
    if prompt is not None:
        for piece in session.send(prompt, max_tokens=max_tokens, temperature=temperature, keep=False):
            click.echo(piece, nl=False)
        click.echo()
        return

    click.echo(f"chatting with profile {profile!r} ({session.profile.recipe['task']}); empty line or Ctrl-D quits, /reset clears the conversation", err=True)
    while True:
        try:
            text = input("> ")
        except EOFError:
            click.echo(err=True)
            break
        if not text.strip():
            break
        if text.strip() == "/reset":
            session.messages = []
            continue
        for piece in session.send(text, max_tokens=max_tokens, temperature=temperature):
            click.echo(piece, nl=False)
        click.echo()


# ---------------------------------------------------------------------------------------------
# bank

@cli.group()
def bank():
    """Build and inspect meta-LoRA banks."""


@bank.command("build")
@click.argument("users", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--out", required=True, type=click.Path(file_okay=False, path_type=Path), help="Folder to write the bank to (replaced when done).")
@click.option("--id", "bank_id", help="Bank id recorded in the manifest (default: the folder name).")
@click.option("--task", type=click.Choice(list(TASKS)), help="Task of the users' history items (detected if omitted).")
@click.option("--clusters", default=8, show_default=True, type=click.IntRange(1, 10000), help="K-Means clusters (at most one anchor each).")
@click.option("--min-items", default=11, show_default=True, type=click.IntRange(1), help="Min history items of an anchor.")
@click.option("--max-items", default=0, show_default=True, type=click.IntRange(0), help="Train each anchor on at most this many items (0: all).")
@click.option("--epochs", default=3, show_default=True, type=click.IntRange(1, 100))
@click.option("--lr", "learning_rate", default=1e-4, show_default=True, type=float)
@click.option("--rank", default=8, show_default=True, type=click.IntRange(1, 256))
@click.option("--max-tokens", default=384, show_default=True, type=click.IntRange(32, 8192), help="Token budget per training example.")
@click.option("--model", help="Base model GGUF (default: packaged SmolLM2-135M-Instruct Q4_1).")
@click.option("--embedder", help="Embedder name or folder (default: all-MiniLM-L6-v2).")
@click.option("--seed", default=0, show_default=True)
@click.option("--silent", is_flag=True, help="No progress bar.")
def bank_build(users, out, bank_id, task, clusters, min_items, max_items, epochs, learning_rate, rank, max_tokens, model, embedder, seed, silent):
    """Cluster users, pick one anchor per cluster and train one LoRA per anchor.

    USERS is a JSON list of LaMP-format users: [{"user_id": ..., "profile": [history items]}].

    \b
    mta-local bank build data/lamp2/bank_users.json --out bank/lamp2-movies --clusters 4
    """
    from .bank import BuildConfig, build_bank
    from .models import resolve_base_model

    lora = LoraConfig(rank=rank, alpha=2.0 * rank, epochs=epochs, learning_rate=learning_rate, max_tokens=max_tokens, seed=seed)
    build = BuildConfig(bank_id=bank_id or out.name, clusters=clusters, min_items=min_items, max_items=max_items, seed=seed)
    callback, close = _progress_bar("training anchor", silent)
    try:
        manifest = build_bank(users, out, resolve_base_model(model), embedder, build, lora, task=task, progress=callback)
    finally:
        close()
    click.echo(f"bank {manifest['bank_id']} ({manifest['task']}): {len(manifest['anchors'])} anchors from "
               f"{manifest['clustering']['users']} users in {manifest['build_seconds']:.0f} s -> {out}")


@bank.command("list")
def bank_list():
    """List built-in and installed banks."""
    from .bank import Bank, builtin_banks

    found = dict(builtin_banks())
    installed = cache_dir() / "banks"
    if installed.is_dir():
        found.update({p.name: p for p in sorted(installed.iterdir()) if (p / "manifest.json").is_file()})
    for name, path in found.items():
        the_bank = Bank(path)
        click.echo(f"{name}\t{the_bank.task}\t{len(the_bank.anchors)} anchors\t{path}")


@bank.command("info")
@click.argument("name")
def bank_info(name):
    """Show a bank's manifest summary: task, base model, embedder, anchors.

    \b
    mta-local bank info lamp2-movies
    """
    from .bank import open_bank

    the_bank = open_bank(name, task="")
    manifest = dict(the_bank.manifest)
    manifest["anchors"] = [{k: v for k, v in a.items() if k != "embedding"} for a in manifest["anchors"]]
    manifest["clustering"] = {k: v for k, v in manifest["clustering"].items() if k != "labels"}
    click.echo(json.dumps(manifest, indent=1))


# ---------------------------------------------------------------------------------------------
# eval

def _parse_weights(ctx, param, value):
    if not value:
        return ()
    try:
        return tuple(float(part) for part in value.split(","))
    except ValueError:
        raise click.BadParameter(f"{value!r} is not a comma-separated list of numbers, e.g. 0.5,0.5.") from None


@cli.command("eval")
@click.option("--data", required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Evaluation users: a per-user JSON file {user_id, profile, query} or a LaMP *_questions.json.")
@click.option("--outputs", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="LaMP *_outputs.json for a questions file (default: its sibling).")
@click.option("--task", type=click.Choice(list(TASKS)), help="Task of the data (detected from the history fields if omitted).")
@click.option("--methods", default="prior,base", show_default=True,
              help="Comma-separated: base, prior, rag-1, rag-3, rag-5, adapt-only, merged-only, mta; or all.")
@click.option("--users", default=0, show_default=True, type=click.IntRange(0), help="Evaluate this many users drawn with --seed (0: all).")
@click.option("--seed", default=0, show_default=True, help="Seed of the user draw, the stacked adapters and the bootstrap.")
@click.option("--bank", help="Bank name or folder for merged-only and mta (default: the built-in bank for the task).")
@click.option("--bank-users", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="The bank's users file: query texts found in its anchors' training items are rejected.")
@click.option("--exclude-overlap", is_flag=True, help="Leave out queries whose text is in the bank's training data instead of stopping.")
@click.option("--top-k", default=2, show_default=True, type=click.IntRange(1, 64), help="Anchors merged per user.")
@click.option("--merge", type=click.Choice(["exact", "averaged"]), default="exact", show_default=True,
              help="exact: sum of weighted dW; averaged: lora_A/lora_B averaged separately (ablation).")
@click.option("--merge-weights", callback=_parse_weights, help="Fixed anchor weights, e.g. 0.5,0.5 (default: similarity weights).")
@click.option("--max-new-tokens", default=0, show_default=True, type=click.IntRange(0, 512),
              help="Tokens generated per answer (0: 8 for labels, 4 for ratings, 32 for text).")
@click.option("--model", help="Base model GGUF (default: packaged SmolLM2-135M-Instruct Q4_1).")
@click.option("--resamples", default=1000, show_default=True, type=click.IntRange(10), help="Bootstrap resamples.")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path),
              help="Folder for predictions.jsonl and results (default: out/eval-TASK-seedS); rerun to resume.")
@click.option("--report-only", is_flag=True, help="Run nothing: summarize the answers already in --out (users missing a method are left out).")
@click.option("--silent", is_flag=True, help="No progress bar.")
def eval_command(data, outputs, task, methods, users, seed, bank, bank_users, exclude_overlap, top_k, merge,
                 merge_weights, max_new_tokens, model, resamples, out, report_only, silent):
    """Compare personalization methods on LaMP-format users (accuracy/F1, MAE/RMSE or ROUGE).

    Each user's answers are appended to OUT/predictions.jsonl, so an interrupted run
    resumes where it stopped. Writes OUT/results.json, OUT/results.md (Table-1 layout)
    and OUT/results.png.

    \b
    mta-local eval --data data/lamp2/eval_users.json --methods all --users 12 --bank-users data/lamp2/bank_users.json --exclude-overlap
    mta-local eval --data data/amazon-rating/eval_users.json --methods prior,base,rag-1,mta --users 20 --seed 1
    mta-local eval --data LaMP_4/dev_questions.json --methods base,prior,rag-1
    """
    from .evaluate import EvalConfig, parse_methods
    from .report import evaluate_and_report

    config = EvalConfig(methods=parse_methods(methods), users=users, seed=seed, top_k=top_k, merge=merge,
                        merge_weights=merge_weights, max_new_tokens=max_new_tokens, exclude_overlap=exclude_overlap,
                        resamples=resamples)
    if merge_weights and len(merge_weights) != top_k:
        raise click.BadParameter(f"{len(merge_weights)} weights for --top-k {top_k}; give one weight per anchor.",
                                 param_hint="--merge-weights")
    out = out or Path("out") / f"eval-{task or 'data'}-seed{seed}"
    if silent or not sys.stderr.isatty():
        progress = None
    else:
        bar = click.progressbar(length=1, label="evaluating users", file=sys.stderr, show_pos=True, show_eta=True)

        def progress(done, total):
            bar.length = total
            bar.update(done - bar.pos)
    results = evaluate_and_report(data, config, out, task=task, outputs=outputs, bank=bank, bank_users=bank_users,
                                  model=model, progress=progress, report_only=report_only)
    if progress is not None:
        bar.render_finish()
    click.echo((out / "results.md").read_text(encoding="utf-8"), nl=False)
    click.echo(f"{results['users']} users in {results['wall_seconds']:.0f} s; results in {out}", err=True)


# ---------------------------------------------------------------------------------------------
# profiles and paths

@cli.command()
def profiles():
    """List enrolled profiles."""
    from .profile import list_profiles, load_profile

    for name in list_profiles():
        recipe = load_profile(name).recipe
        anchors = ", ".join(f"{a['id']}:{a['weight']:.3f}" for a in recipe["anchors"])
        click.echo(f"{name}\t{recipe['task']}\t{recipe['bank']['id']}\t{anchors}")


@cli.command()
def paths():
    """Print where mta-local keeps profiles (private) and cached files."""
    click.echo(f"data (profiles, private): {user_dir()}")
    click.echo(f"profiles:                 {profiles_dir()}")
    click.echo(f"cache (banks, F32 copies): {cache_dir()}")
