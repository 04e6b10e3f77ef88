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
from .config import config_file, load_cli_defaults, EnrollConfig, LoraConfig, cache_dir, derived_dir, profiles_dir, stack_config, user_dir
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

    Defaults for any option can be set in config.json (see `mta-local paths`), keyed by
    command, e.g. {"enroll": {"model": "/models/x.gguf"}, "chat": {"folded": false}}.
    """
    try:
        click.get_current_context().default_map = load_cli_defaults()
    except MtaError as exc:
        raise click.ClickException(str(exc)) from None
    logging.basicConfig(level=logging.DEBUG if verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if verbose:
        logging.getLogger("mta_local").setLevel(logging.DEBUG)
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


def _download_bars(silent: bool):
    """Return (callback, close) drawing one byte-sized click progress bar per downloaded file."""
    if silent or not sys.stderr.isatty():
        return (lambda name, done, total: None), lambda: None
    state = {"name": None, "bar": None, "done": 0}

    def close():
        if state["bar"] is not None:
            state["bar"].__exit__(None, None, None)
            state["bar"] = None

    def callback(name, done, total):
        if name != state["name"] or done < state["done"]:
            close()
            state.update(name=name, done=0, bar=click.progressbar(length=total, label=name, file=sys.stderr))
            state["bar"].__enter__()
        state["bar"].update(done - state["done"])
        state["done"] = done
    return callback, close


def _parse_shard(ctx, param, value):
    if value is None:
        return None
    index, _, count = value.partition("/")
    if not (index.isdigit() and count.isdigit()) or int(count) < 1 or int(index) >= int(count):
        raise click.BadParameter(f"{value!r} is not I/N with 0 <= I < N, e.g. 0/4.")
    return int(index), int(count)


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
    click.echo(f"final training loss {result.losses[-1]:.4f}; profile size {result.size_bytes / 1e6:.2f} MB; "
               f"{time.perf_counter() - started:.1f} s")
    logging.getLogger(__name__).info("timings: %s", ", ".join(f"{k} {v:.2f} s" for k, v in result.timings.items()))
    click.echo(f"next: mta-local chat --profile {profile}", err=True)


# ---------------------------------------------------------------------------------------------
# chat

@cli.command()
@click.option("--profile", default="default", show_default=True, help="Profile to chat with.")
@click.option("-p", "--prompt", help="Ask one question, print the answer and exit.")
@click.option("--max-tokens", default=256, show_default=True, type=click.IntRange(1, 8192), help="Maximum tokens generated per reply.")
@click.option("--temperature", default=0.0, show_default=True, type=click.FloatRange(0.0, 5.0), help="Sampling temperature (0: greedy).")
@click.option("--history-items", type=click.IntRange(0, 20), help="History items retrieved into each turn (default: as in training).")
@click.option("--threads", type=click.IntRange(1, 512), help="llama.cpp threads (default: llama.cpp's choice).")
@click.option("--folded/--runtime-adapter", default=True, show_default=True,
              help="Serve a per-user Q8_0 copy of the base with the adapters folded in (written on first use, 145 MB for the "
                   "default model, in the data dir), or the base with the runtime GGUF adapter (decodes about 20 % slower).")
def chat(profile, prompt, max_tokens, temperature, history_items, threads, folded):
    """Chat with your personalized model through llama.cpp.

    By default llama.cpp loads a copy of the base with the profile's adapters folded
    into its weights (Q8_0), which needs no adapter operations per token. The first
    chat after enroll writes it. Either way the adapter is checked to be in effect
    before the first reply. Each turn gets the most relevant history items (BM25)
    above it, as in training.

    \b
    mta-local chat --prompt "Which tag does this movie relate to among ... Tag:"
    mta-local chat --profile alice        # interactive; empty line or Ctrl-D quits
    """
    from .chat import ChatSession
    from .profile import load_profile

    session = ChatSession(load_profile(profile), history_in_prompt=history_items, threads=threads, folded=folded)
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
# export, verify, serve

@cli.command()
@click.option("--to", "kind", required=True, type=click.Choice(["gguf", "ollama", "peft"]),
              help="gguf: llama.cpp LoRA; ollama: Modelfile + GGUF; peft: adapter for transformers.")
@click.option("--profile", default="default", show_default=True, help="Profile to export.")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path),
              help="Folder to write to (default: the profile's export/FORMAT folder).")
@click.option("--separate", is_flag=True, help="gguf: also write the merged and the stacked adapter as files of their own.")
@click.option("--name", "model_name", help="ollama: model name for `ollama create` (default: mta-PROFILE).")
def export(kind, profile, out, separate, model_name):
    """Export a profile's adapters for llama.cpp, Ollama or transformers.

    Every GGUF written is read back and checked against the base model.

    \b
    mta-local export --to gguf --separate
    mta-local export --to ollama --profile alice --out ~/ollama/alice
    mta-local export --to peft --out ./alice-peft
    """
    from .export import export_profile
    from .profile import load_profile

    if separate and kind != "gguf":
        raise click.UsageError("--separate applies to --to gguf only.")
    result = export_profile(load_profile(profile), kind, out, separate=separate, model_name=model_name)
    for path in result.files:
        click.echo(str(path))
    if result.command:
        click.echo(result.command)


@cli.command()
@click.option("--profile", default="default", show_default=True, help="Profile to verify.")
@click.option("--prompts", default=4, show_default=True, type=click.IntRange(1, 64), help="Fixed prompts (the profile's first training prompts).")
def verify(profile, prompts):
    """Check that llama.cpp applies the profile's adapters as transformers does.

    \b
    (a) adapter effect on next-token logits, llama.cpp vs transformers, F32 base copy: correlation >= 0.9999
    (b) combined adapter vs merged + stacked loaded as two adapters, F32 base copy: max |logit diff| <= 0.05
    (c) greedy tokens on the quantized base agree wherever the top-1 margin exceeds the noise floor
        (the logit move caused by a 1e-6 perturbation of lora_B)

    \b
    mta-local verify
    mta-local verify --profile alice --prompts 8
    """
    from .profile import load_profile
    from .verify import VerifyConfig, raise_on_failure, verify_profile

    click.echo("running the fidelity checks (about a minute on 2 CPU cores)...", err=True)
    checks = verify_profile(load_profile(profile), VerifyConfig(prompts=prompts))
    for check in checks:
        click.echo(f"{'ok' if check.passed else 'FAILED'}\t{check.name}: {check.summary}")
    raise_on_failure(checks, profile)


@cli.command()
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to bind (loopback by default: the profiles are private).")
@click.option("--port", default=8000, show_default=True, type=click.IntRange(0, 65535), help="TCP port (0: any free port).")
@click.option("--profiles", "names", help="Comma-separated profiles to serve (default: all enrolled).")
@click.option("--threads", type=click.IntRange(1, 512), help="llama.cpp threads (default: llama.cpp's choice).")
def serve(host, port, names, threads):
    """Serve profiles through an OpenAI-compatible API (/v1/chat/completions, /v1/models).

    The request's "model" field names the profile ("base" for the base model without
    adapter). The base model is loaded once; each request activates only its profile's
    adapter. Ctrl-C stops the server.

    \b
    mta-local serve
    mta-local serve --port 8080 --profiles alice,bob
    curl http://127.0.0.1:8000/v1/chat/completions -d '{"model": "alice", "messages": [{"role": "user", "content": "..."}]}'
    """
    from .serve import ProfileServer, make_http_server

    logging.getLogger("mta_local.serve").setLevel(logging.INFO)  # a server logs its starts, stops and errors
    profiles = [name.strip() for name in names.split(",") if name.strip()] if names else None
    server = ProfileServer(profiles, threads=threads)
    try:
        httpd = make_http_server(server, host, port)
    except OSError as exc:
        raise click.ClickException(f"cannot listen on {host}:{port}: {exc.strerror}. Stop the program that "
                                   "uses this port, or pass another --port (0 picks a free one).") from None
    bound_host, bound_port = httpd.server_address[:2]
    logger = logging.getLogger("mta_local.serve")
    logger.info("server started on http://%s:%d", bound_host, bound_port)
    click.echo(f"serving on http://{bound_host}:{bound_port}/v1 (Ctrl-C stops)", err=True)
    try:
        httpd.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        httpd.server_close()
        logger.info("server stopped")
        click.echo("server stopped", err=True)


# ---------------------------------------------------------------------------------------------
# bank

@cli.group()
def bank():
    """Build, pull, assemble and inspect meta-LoRA banks."""


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
@click.option("--shard", callback=_parse_shard, metavar="I/N",
              help="Train only anchors i with i mod N = I and write a shard; join all N with `bank assemble`.")
@click.option("--workers", type=click.IntRange(1, 64),
              help="Train the anchors in this many child processes, one GPU each (default: every visible GPU when "
                   "there are two or more, else 1). On a CPU they split the cores.")
@click.option("--silent", is_flag=True, help="No progress bar.")
def bank_build(users, out, bank_id, task, clusters, min_items, max_items, epochs, learning_rate, rank, max_tokens, model,
               embedder, seed, shard, workers, silent):
    """Cluster users, pick one anchor per cluster and train one LoRA per anchor.

    USERS is a JSON list of LaMP-format users: [{"user_id": ..., "profile": [history items]}].
    With two or more GPUs, each trains a share of the anchors (--workers). With
    --shard I/N, N machines build one bank together: each runs the same command
    with its own I, then `bank assemble` joins the N shard folders.

    \b
    mta-local bank build data/lamp2/bank_users.json --out bank/lamp2-movies --clusters 4
    mta-local bank build users.json --out shards/1 --shard 1/4     # machine 1 of 4
    """
    from .bank import BuildConfig, build_bank
    from .models import resolve_base_model

    if shard is None:
        from .shards import visible_gpus

        gpus = visible_gpus()
        workers = workers or (len(gpus) if len(gpus) >= 2 else 1)
        if workers > 1:
            _build_with_workers(click.get_current_context(), out, workers, gpus)
            return
    lora = LoraConfig(rank=rank, alpha=2.0 * rank, epochs=epochs, learning_rate=learning_rate, max_tokens=max_tokens, seed=seed)
    build = BuildConfig(bank_id=bank_id or out.name, clusters=clusters, min_items=min_items, max_items=max_items, seed=seed)
    callback, close = _progress_bar("training anchor", silent)
    try:
        manifest = build_bank(users, out, resolve_base_model(model), embedder, build, lora, task=task, progress=callback,
                              shard=shard)
    finally:
        close()
    part = f"shard {shard[0]}/{shard[1]} of " if shard else ""
    click.echo(f"{part}bank {manifest['bank_id']} ({manifest['task']}): {len(manifest['anchors'])} anchors from "
               f"{manifest['clustering']['users']} users in {manifest['build_seconds']:.0f} s -> {out}")
    if shard:
        click.echo("next: build the other shards, then mta-local bank assemble SHARD_DIR... --out DIR", err=True)


def _build_with_workers(context: click.Context, out: Path, workers: int, gpus: list[str]) -> None:
    from .shards import build_with_workers

    started = time.perf_counter()
    args = [str(context.params["users"])]
    if context.params.get("bank_id") is None:
        args += ["--id", out.name]  # the children's --out are shard folders; the bank keeps the name of this one
    for param in context.command.params:
        value = context.params.get(param.name)
        if param.name in ("users", "out", "shard", "workers", "silent") or value is None or value is False:
            continue
        args += [param.opts[0]] if value is True else [param.opts[0], str(value)]
    where = f"{workers} workers on GPUs {', '.join(gpus)}" if gpus else f"{workers} CPU workers"
    click.echo(f"building with {where}", err=True)
    manifest = build_with_workers(args, out, workers, gpus)
    click.echo(f"bank {manifest['bank_id']} ({manifest['task']}): {len(manifest['anchors'])} anchors from "
               f"{manifest['clustering']['users']} users in {time.perf_counter() - started:.0f} s "
               f"({manifest['build_seconds']:.0f} s of worker time) -> {out}")


@bank.command("assemble")
@click.argument("shards", nargs=-1, required=True, type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--out", required=True, type=click.Path(file_okay=False, path_type=Path), help="Folder to write the bank to (replaced when done).")
def bank_assemble(shards, out):
    """Join the shard folders of `bank build --shard I/N` into one bank.

    The shards must come from the same users file, clustering, seed, LoRA config,
    base model and embedder, and together hold each anchor exactly once.

    \b
    mta-local bank assemble shards/0 shards/1 shards/2 shards/3 --out bank/my-bank
    """
    from .shards import assemble_shards

    manifest = assemble_shards(list(shards), out)
    click.echo(f"bank {manifest['bank_id']} ({manifest['task']}): {len(manifest['anchors'])} anchors from "
               f"{len(shards)} shards -> {out}")


@bank.command("pull")
@click.argument("source")
@click.option("--index", metavar="URL", help="Bank index (JSON) to look SOURCE up in as a bank name.")
@click.option("--name", help="Name to install the bank under (default: its index name or bank_id).")
@click.option("--model", help="Base model GGUF the bank must fit (default: packaged SmolLM2-135M-Instruct Q4_1).")
@click.option("--timeout", default=30.0, show_default=True, type=click.FloatRange(1, 3600), help="Seconds to wait for the server per connection and per read.")
@click.option("--silent", is_flag=True, help="No progress bar.")
def bank_pull(source, index, name, model, timeout, silent):
    """Install a bank into the cache, checking every file before use.

    SOURCE is a built-in bank name, a bank folder, a .tar.gz/.zip archive of one,
    an http(s) URL of a bank folder (serving manifest.json and the files it lists),
    or an http(s) URL of an index.json. Each file's sha256 is checked against the
    manifest and each anchor's tensor shapes against the base model. An interrupted
    download resumes when the same command runs again; the installed bank is only
    replaced when the whole pull succeeds.

    \b
    mta-local bank pull https://example.org/banks/lamp2-movies/
    mta-local bank pull lamp2-movies --index https://example.org/banks/index.json
    mta-local bank pull ./lamp2-movies.tar.gz --name movies
    """
    from .models import resolve_base_model
    from .pull import pull_bank

    callback, close = _download_bars(silent)
    try:
        result = pull_bank(source, resolve_base_model(model), name=name, index=index, timeout=timeout, progress=callback)
    finally:
        close()
    click.echo(f"bank {result.name} ({result.anchors} anchors, {result.fetched_bytes / 1e6:.1f} MB fetched, "
               f"{result.reused_files} files reused) installed in {result.path}")
    click.echo(f"next: mta-local enroll HISTORY --bank {result.name}", err=True)


@bank.command("remove")
@click.argument("name")
def bank_remove(name):
    """Delete an installed bank from the cache (built-in banks stay).

    \b
    mta-local bank remove lamp2-movies
    """
    from .pull import remove_bank

    click.echo(f"removed {remove_bank(name)}")


@bank.command("list")
def bank_list():
    """List built-in and installed banks: name, kind, task, anchors, folder.

    An installed bank shadows a built-in one of the same name.
    """
    from .bank import Bank, builtin_banks, installed_banks

    found = [(name, "built-in", path) for name, path in builtin_banks().items()]
    found += [(name, "installed", path) for name, path in installed_banks().items()]
    for name, kind, path in found:
        try:
            the_bank = Bank(path)
        except MtaError as exc:
            click.echo(f"{name}\t{kind}\tinvalid: {exc}\t{path}")
            continue
        click.echo(f"{name}\t{kind}\t{the_bank.task}\t{len(the_bank.anchors)} anchors\t{path}")


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
    """List enrolled profiles: name, task, bank and the anchors with their merge weights."""
    from .profile import list_profiles, load_profile

    names = list_profiles()
    if names:
        click.echo("profile\ttask\tbank\tanchor:merge weight, ...")
    for name in names:
        recipe = load_profile(name).recipe
        anchors = ", ".join(f"{a['id']}:{a['weight']:.3f}" for a in recipe["anchors"])
        click.echo(f"{name}\t{recipe['task']}\t{recipe['bank']['id']}\t{anchors}")


@cli.command()
def paths():
    """Print where mta-local keeps profiles (private) and cached files."""
    click.echo(f"data (profiles, private): {user_dir()}")
    click.echo(f"profiles:                 {profiles_dir()}")
    click.echo(f"derived (private, rebuilt from profiles): {derived_dir()}")
    click.echo(f"cache (banks, F32 copies): {cache_dir()}")
    click.echo(f"config (option defaults): {config_file()}")
