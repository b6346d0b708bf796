"""Pushing a run to the Hugging Face Hub: checked before any data is loaded, uploaded after `metrics.json`.

lmpipe pushes with huggingface_hub itself rather than through `Trainer(push_to_hub=True)`, which uploads every
file of output_dir but checkpoints (training_args.bin, a pickle, included), replaces README.md with its own card,
pushes before metrics.json exists, and lets a failed upload raise out of `train()` before the final save. Here the
upload is an explicit list of files, and a failure leaves the finished run on disk with the command to retry.
The token is read by huggingface_hub (HF_TOKEN, then the `hf auth login` cache) and never passes through lmpipe.
"""

from __future__ import annotations

import json
import logging
import mmap
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path

from huggingface_hub import (
    CommitOperationAdd,
    HfApi,
    constants,
    get_session,
    get_token,
    hf_raise_for_status,
    is_offline_mode,
)
from huggingface_hub.errors import HfHubHTTPError, HTTPError
from huggingface_hub.utils import build_hf_headers
from transformers import TrainerCallback, TrainingArguments
from transformers.tokenization_utils_base import TOKENIZER_CONFIG_FILE
from transformers.trainer import TRAINING_ARGS_NAME
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, HubStrategy, sort_checkpoints
from transformers.utils import SAFE_WEIGHTS_NAME

from lmpipe.errors import LmpipeError
from lmpipe.run.card import write_model_card
from lmpipe.run.checkpoints import newest_complete_checkpoint, saved_model_problem
from lmpipe.run.files import (
    CARD_NAME,
    METRICS_NAME,
    PLOT_NAME,
    RESOLVED_RECIPE_NAME,
    TENSORBOARD_DIR,
    WEIGHT_FILES,
    model_files,
    present,
)

logger = logging.getLogger(__name__)

HUB_CHECK_TIMEOUT_S = 5.0
LAST_CHECKPOINT = "last-checkpoint"  # where hub_strategy=checkpoint keeps the newest checkpoint, as the Trainer does
RUN_FILES = (CARD_NAME, RESOLVED_RECIPE_NAME, METRICS_NAME, PLOT_NAME)
# TrainingArguments' push options that lmpipe's push does not implement: refused rather than ignored.
UNSUPPORTED_OPTIONS = ("hub_revision", "hub_always_push")
PUSHED_CHECKPOINTS = (HubStrategy.CHECKPOINT, HubStrategy.ALL_CHECKPOINTS)


class HubPushError(LmpipeError):
    """The run finished and is intact on disk but the upload failed: exit code 3 (2 means nothing ran)."""

    exit_code = 3


@dataclass(frozen=True)
class HubTarget:
    """Where and what to push. The token is deliberately not here: huggingface_hub reads it when it sends."""

    repo_id: str
    strategy: HubStrategy
    private: bool | None  # None: the Hub's default (public, or the organisation's setting)


@dataclass
class PushArguments:
    """`lmpipe push OUTPUT_DIR [flags]`: push a finished run folder."""

    hub_model_id: str | None = field(
        default=None, metadata={"help": "namespace/name, or a name under your user (default: the folder's name)."}
    )
    private: bool = field(default=False, metadata={"help": "Create the repository private."})
    hub_strategy: HubStrategy = field(
        default=HubStrategy.END, metadata={"help": "checkpoint / all_checkpoints also push checkpoints."}
    )


def check_environment(subject: str) -> None:
    """Offline mode and a missing token, found without touching the network."""
    if is_offline_mode():
        raise LmpipeError(f"{subject}: HF_HUB_OFFLINE is set; unset it to push to the Hub")
    if get_token() is None:
        raise LmpipeError(f"{subject}: no Hub token; set HF_TOKEN or run `hf auth login`")


def hub_user(subject: str) -> str:
    """The token's user name: one short request that also proves the Hub answers and the token may write."""
    endpoint = constants.ENDPOINT
    # Not HfApi.whoami: it takes no timeout, and an unreachable Hub would stall the run's start. huggingface_hub's
    # own session, headers and error mapping send the same request with one.
    try:
        response = get_session().get(
            f"{endpoint}/api/whoami-v2", headers=build_hf_headers(), timeout=HUB_CHECK_TIMEOUT_S
        )
        hf_raise_for_status(response)
        account = response.json()
        name = account["name"]
    except HfHubHTTPError as e:
        if e.response.status_code == 401:
            raise LmpipeError(f"{subject}: the Hub token is invalid (HF_TOKEN or `hf auth login`)") from None
        raise LmpipeError(f"{subject}: the Hub at {endpoint} answered HTTP {e.response.status_code}") from None
    except HTTPError as e:  # huggingface_hub's name for its transport's errors
        raise LmpipeError(
            f"{subject}: the Hub at {endpoint} is unreachable ({type(e).__name__}); check the network or HF_ENDPOINT"
        ) from None
    except (ValueError, KeyError, TypeError):
        raise LmpipeError(
            f"{subject}: {endpoint} does not answer like a Hugging Face Hub (check HF_ENDPOINT)"
        ) from None
    if account.get("auth", {}).get("accessToken", {}).get("role") == "read":
        raise LmpipeError(f"{subject}: the Hub token is read-only; use a token with write access")
    return name


def resolve_repo_id(hub_model_id: str | None, output_dir: str, subject: str) -> str:
    """`namespace/name`; a bare name goes under the token's user and defaults to output_dir's name, as the Trainer."""
    user = hub_user(subject)
    name = hub_model_id or Path(output_dir).absolute().name
    return name if "/" in name else f"{user}/{name}"


def check_hub_push(training: TrainingArguments) -> HubTarget | None:
    """The target of a run that pushes, checked before any data is loaded; None on ranks that push nothing.

    Every rank checks the environment; only global rank 0, the one that uploads, asks the Hub.
    """
    if not training.push_to_hub:
        return None
    for option in UNSUPPORTED_OPTIONS:
        if getattr(training, option):
            raise LmpipeError(f"{option}: not supported by lmpipe's push (it pushes to main, one upload at a time)")
    check_environment("push_to_hub")
    if training.process_index != 0:
        return None
    repo_id = resolve_repo_id(training.hub_model_id, training.output_dir, "push_to_hub")
    return HubTarget(repo_id, training.hub_strategy, training.hub_private_repo)


def _tree(folder: Path, prefix: str, skip: tuple[str, ...] = ()) -> dict[str, Path]:
    """Every file under `folder`, keyed `prefix/relative/path`."""
    return {
        f"{prefix}/{path.relative_to(folder).as_posix()}": path
        for path in sorted(folder.rglob("*"))
        if path.is_file() and path.name not in skip
    }


def checkpoint_files(checkpoint: Path, prefix: str) -> dict[str, Path]:
    """A resumable checkpoint without training_args.bin (a pickle that resuming never reads)."""
    return _tree(checkpoint, prefix, skip=(TRAINING_ARGS_NAME,))


def upload_plan(output_dir: str, strategy: HubStrategy = HubStrategy.END) -> dict[str, Path]:
    """Exactly what a finished run uploads, path in the repo -> local file.

    The model and tokenizer, README.md, recipe.yaml, metrics.json, loss.png and TensorBoard logs; checkpoints only
    when `strategy` asks (`checkpoint`: the newest as last-checkpoint/, `all_checkpoints`: each). Nothing else in
    the folder is ever uploaded.
    """
    folder = Path(output_dir)
    plan = {**model_files(folder), **present(folder, RUN_FILES)}
    if (folder / TENSORBOARD_DIR).is_dir():
        plan.update(_tree(folder / TENSORBOARD_DIR, TENSORBOARD_DIR))
    if strategy == HubStrategy.CHECKPOINT and (last := newest_complete_checkpoint(str(folder), save_only_model=True)):
        plan.update(checkpoint_files(Path(last), LAST_CHECKPOINT))  # a torn newer one (killed mid-save) is skipped
    if strategy == HubStrategy.ALL_CHECKPOINTS:
        for checkpoint in map(Path, sort_checkpoints(str(folder))):
            plan.update(checkpoint_files(checkpoint, checkpoint.name))
    return plan


def checkpoint_plan(checkpoint: Path, strategy: HubStrategy) -> dict[str, Path]:
    """What a save during training uploads: its model and tokenizer at the top, recipe.yaml, and the checkpoint."""
    plan = {**model_files(checkpoint), **present(checkpoint.parent, [RESOLVED_RECIPE_NAME])}
    if strategy in PUSHED_CHECKPOINTS:
        prefix = LAST_CHECKPOINT if strategy == HubStrategy.CHECKPOINT else checkpoint.name
        plan.update(checkpoint_files(checkpoint, prefix))
    return plan


def refuse_token_leaks(plan: dict[str, Path]) -> None:
    """Never upload a file that contains the Hub token (whatever wrote it there)."""
    token = (get_token() or "").encode()
    for path in plan.values():
        if not token or path.stat().st_size == 0:
            continue
        with path.open("rb") as file, mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ) as content:
            if content.find(token) >= 0:
                raise LmpipeError(f"{path}: contains the Hub token; nothing was pushed")


def commit(api: HfApi, target: HubTarget, plan: dict[str, Path], message: str) -> str:
    """Create the repository if needed and upload exactly `plan` in one commit; returns the commit's URL."""
    refuse_token_leaks(plan)
    api.create_repo(target.repo_id, private=target.private, exist_ok=True)
    operations = [CommitOperationAdd(path_in_repo=name, path_or_fileobj=str(path)) for name, path in plan.items()]
    return api.create_commit(target.repo_id, operations=operations, commit_message=message).commit_url


def check_finished_run(output_dir: str) -> None:
    """A folder lmpipe finished: metrics.json (written last), its recipe, weights and tokenizer, each model file as
    its manifest recorded it (or, without a manifest, with whole headers)."""
    folder = Path(output_dir)
    if not folder.is_dir():
        raise LmpipeError(f"{output_dir}: no such directory")
    for name in (METRICS_NAME, RESOLVED_RECIPE_NAME, TOKENIZER_CONFIG_FILE):
        if not (folder / name).is_file():
            raise LmpipeError(f"{output_dir}: not a finished lmpipe run (no {name})")
    if not present(folder, WEIGHT_FILES):
        raise LmpipeError(f"{output_dir}: not a finished lmpipe run (no {SAFE_WEIGHTS_NAME})")
    problem = saved_model_problem(folder)
    if problem:
        raise LmpipeError(
            f"{problem}; nothing was pushed: rerun the run's command to finish it again from its last checkpoint"
        )


def retry_command(output_dir: str, target: HubTarget) -> str:
    """The `lmpipe push` line that uploads the same files to the same repository later."""
    private = " --private" if target.private else ""
    strategy = f" --hub_strategy {target.strategy.value}" if target.strategy in PUSHED_CHECKPOINTS else ""
    return f"lmpipe push {output_dir} --hub_model_id {target.repo_id}{private}{strategy}"


def _first_line(error: BaseException) -> str:
    return (str(error).strip().splitlines() or [""])[0]


def push_run(output_dir: str, target: HubTarget) -> str:
    """Upload a finished run; on a network or Hub failure the folder is untouched and the error says how to retry."""
    check_finished_run(output_dir)
    if not (Path(output_dir) / CARD_NAME).is_file():  # a run finished by an older lmpipe
        write_model_card(output_dir, json.loads((Path(output_dir) / METRICS_NAME).read_text("utf-8")))
    plan = upload_plan(output_dir, target.strategy)
    try:
        url = commit(HfApi(), target, plan, "Upload finished lmpipe run")
    except (HTTPError, OSError) as e:  # network and Hub answers (HTTPError, HfHubHTTPError), unreadable files
        raise HubPushError(
            f"push to {target.repo_id} failed ({type(e).__name__}: {_first_line(e)}); the finished run is intact in"
            f" {output_dir}; push it later with `{retry_command(output_dir, target)}`"
        ) from None
    print(f"pushed {len(plan)} files to {url}")
    return url


def push_output_dir(output_dir: str, arguments: PushArguments) -> str:
    """`lmpipe push`: the folder is checked first, then the environment and the Hub, then it is uploaded."""
    check_finished_run(output_dir)
    check_environment("push")
    repo_id = resolve_repo_id(arguments.hub_model_id, output_dir, "push")
    return push_run(output_dir, HubTarget(repo_id, HubStrategy(arguments.hub_strategy), arguments.private or None))


class CheckpointPusher(TrainerCallback):
    """hub_strategy every_save / checkpoint / all_checkpoints: push each save in the background.

    One upload at a time (a save during an upload is not pushed, as the Trainer does); a failed upload only warns,
    since the push after training uploads the finished run anyway.
    """

    def __init__(self, target: HubTarget):
        self.target = target
        self.api = HfApi()  # one HfApi: its single worker thread keeps the uploads in order
        self.pending: Future | None = None

    def on_save(self, args, state, control, **kwargs):
        if self.target.strategy == HubStrategy.END or (self.pending is not None and not self.pending.done()):
            return
        self._report()
        checkpoint = Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"
        plan = checkpoint_plan(checkpoint, self.target.strategy)
        message = f"Training in progress, step {state.global_step}"
        self.pending = self.api.run_as_future(commit, self.api, self.target, plan, message)

    def on_train_end(self, args, state, control, **kwargs):
        if self.pending is not None:
            self.pending.exception()  # waits
            self._report()

    def _report(self) -> None:
        error = self.pending.exception() if self.pending is not None else None
        if error is not None:
            logger.warning(
                "pushing a checkpoint to %s failed (%s: %s); the push after training uploads the finished run",
                self.target.repo_id, type(error).__name__, _first_line(error),
            )
        self.pending = None
