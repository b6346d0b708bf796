"""Two real ranks (gloo DDP on CPU, started by `accelerate launch`) against one rank on the same global batch.

Run as a script, this file is the launched program: `lmpipe` plus a recorder of the rows of every micro-batch a
rank trains on and of the files it writes under the output directory. Python-level writes are caught by an audit
hook; files that C++/Rust create (torch.save, tokenizers) are told apart by a per-rank umask: only rank 1
creates files that others may write (mode 0o002).
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

RECORD_DIR = "LMPIPE_TEST_RECORD_DIR"
OUTPUT_DIR = "LMPIPE_TEST_OUTPUT_DIR"
RANK_1_UMASK = 0o020  # rank 0: 0o022


def recording_training_step(record: dict):
    """`ExactEvalTrainer.training_step` that first notes the micro-batch: its rows without right padding, its width."""
    from lmpipe.training.trainer import ExactEvalTrainer

    training_step = ExactEvalTrainer.training_step

    def recorded_training_step(self, model, inputs, *args, **kwargs):
        ids = inputs["input_ids"]
        lengths = inputs["attention_mask"].sum(-1).tolist() if "attention_mask" in inputs else [ids.shape[1]] * len(ids)
        record["batches"].append([row[:length] for row, length in zip(ids.tolist(), lengths)])
        record["widths"].append(ids.shape[1])
        return training_step(self, model, inputs, *args, **kwargs)

    return recorded_training_step


def _record_rank() -> None:
    """Install the recorder in a launched rank; at exit it writes $LMPIPE_TEST_RECORD_DIR/record-rank{RANK}.json."""
    import atexit

    from lmpipe.training.trainer import ExactEvalTrainer

    rank = os.environ.get("RANK", "0")
    os.umask(0o022 if rank == "0" else RANK_1_UMASK)
    output_dir = os.path.realpath(os.environ[OUTPUT_DIR])
    record = {"writes": set(), "batches": [], "widths": []}

    def note(path) -> None:
        if isinstance(path, (str, os.PathLike)):
            path = os.path.realpath(os.fspath(path))
            if path.startswith(output_dir + os.sep):
                record["writes"].add(os.path.relpath(path, output_dir))

    def audit(event: str, args: tuple) -> None:
        if event == "open":
            mode, flags = args[1] or "", args[2] or 0
            if any(c in mode for c in "wax+") or flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
                note(args[0])
        elif event in ("os.rename", "os.mkdir", "os.remove", "shutil.rmtree"):
            note(args[1] if event == "os.rename" else args[0])

    sys.addaudithook(audit)
    ExactEvalTrainer.training_step = recording_training_step(record)

    def dump() -> None:
        import torch.distributed

        path = Path(os.environ[RECORD_DIR]) / f"record-rank{rank}.json"
        group_at_exit = torch.distributed.is_initialized()
        path.write_text(json.dumps({**record, "writes": sorted(record["writes"]), "group_at_exit": group_at_exit}))

    atexit.register(dump)


if __name__ == "__main__":
    _record_rank()
    from lmpipe.cli import main

    sys.exit(main(sys.argv[1:]))


# ---------------------------------------------------------------------------------------------------- the tests
import pytest  # noqa: E402
import torch  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

from lmpipe.data.packing import blocks_as_array, pack_blocks, tokenize_documents  # noqa: E402
from lmpipe.data.sources import load_local_file, pydoc_documents  # noqa: E402
from lmpipe.errors import LmpipeError  # noqa: E402
from lmpipe.run.distributed import check_launch  # noqa: E402

from conftest import DATA, REPO, tiny_run  # noqa: E402

CPU_2PROC = REPO / "recipes" / "accelerate" / "cpu_2proc.yaml"
BLOCK = 32
STEPS = 4
MODEL = tiny_run(  # the model only: TRAINING and ONE_RANK / TWO_RANKS say how it trains
    tokenizer_vocab_size=384, block_size=BLOCK, n_positions=64, dropout=0,
    per_device_train_batch_size=None, report_to=None, disable_tqdm=None,
)
TRAINING = [
    "--learning_rate", "0.003", "--lr_scheduler_type", "constant", "--warmup_steps", "0", "--weight_decay", "0",
    "--logging_steps", "1", "--eval_strategy", "no", "--disable_tqdm", "true", "--seed", "3", "--use_cpu", "true",
    "--max_steps", str(STEPS),
]
# The same global batch of 8 rows: 1 rank x 8 rows, and 2 ranks x 2 rows x 2 accumulated micro-batches.
ONE_RANK = ["--per_device_train_batch_size", "8", "--gradient_accumulation_steps", "1"]
TWO_RANKS = ["--per_device_train_batch_size", "2", "--gradient_accumulation_steps", "2"]


def launch_two_ranks(command: list[str], output: Path) -> dict[int, dict]:
    """Run this file under `accelerate launch` with the 2-process CPU config; each rank's record."""
    records = output.parent / f"{output.name}-records"
    records.mkdir()
    program = ["-m", "accelerate.commands.launch", "--config_file", str(CPU_2PROC), "--main_process_port", "0",
               str(Path(__file__).resolve()), *command, "--output_dir", str(output)]
    env = {**os.environ, RECORD_DIR: str(records), OUTPUT_DIR: str(output), "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, *program], capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return {rank: json.loads((records / f"record-rank{rank}.json").read_text()) for rank in range(2)}


def run_one_rank(command: list[str], output: Path) -> dict[int, dict]:
    """The same command in this process (one rank, nothing to attribute); its micro-batches."""
    from lmpipe.cli import main
    from lmpipe.training.trainer import ExactEvalTrainer

    record = {"batches": [], "widths": []}
    umask = os.umask(0o022)  # rank 0's, as in the launched runs
    try:
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(ExactEvalTrainer, "training_step", recording_training_step(record))
            assert main([*command, "--output_dir", str(output)]) == 0
    finally:
        os.umask(umask)
    return {0: record}


def launch_pair(command: list[str], root: Path, name: str) -> SimpleNamespace:
    """The same command on 1 rank and on 2 ranks with the same global batch."""
    one = run_one_rank([*command, *ONE_RANK], root / f"{name}-one")
    two = launch_two_ranks([*command, *TWO_RANKS], root / f"{name}-two")
    return SimpleNamespace(one=root / f"{name}-one", two=root / f"{name}-two", one_record=one, two_record=two)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """40 documentation topics to train on, and one topic (91 blocks: odd, so 2 ranks split it unevenly) to score."""
    root = tmp_path_factory.mktemp("two-ranks")
    documents = pydoc_documents()
    (root / "train.txt").write_text("\n\n".join(documents[:40]), encoding="utf-8")
    (root / "valid.txt").write_text(documents[40], encoding="utf-8")
    return root


@pytest.fixture(scope="module")
def pretraining(corpus) -> SimpleNamespace:
    """Scoring two zero-shot tasks at the final evaluation: 7 multiple-choice rows in batches of 2 (the ranks get
    unequal shares) and 5 last words."""
    rows = [{"context": f"The function number {n} returns", "choices": ["a list", "the value", "None"], "label": n % 3}
            for n in range(7)]
    (corpus / "choices.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    zero_shot = [json.dumps({"task": "multiple_choice", "data": str(corpus / "choices.jsonl"), "batch_size": 2}),
                 json.dumps({"task": "lambada", "data": str(DATA / "zero_shot" / "shakespeare_last_word.jsonl"),
                             "limit": 5, "batch_size": 2})]
    data = ["--train_file", str(corpus / "train.txt"), "--validation_file", str(corpus / "valid.txt")]
    command = ["pretrain", *data, *MODEL, *TRAINING, "--save_steps", "2", "--per_device_eval_batch_size", "2",
               "--report_to", "tensorboard", "--zero_shot_tasks", *zero_shot, "--optimizer", "adamw"]
    return launch_pair(command, corpus, "pretrain")


@pytest.fixture(scope="module")
def finetuning(corpus, pretraining) -> SimpleNamespace:
    """QA fine-tuning of the pretrained model on 48 NQ-open questions: padded rows of different lengths, with
    `optimizer: muon` (pretraining trains with AdamW: one run of each optimizer on two ranks)."""
    questions = (DATA / "nq_open_efficientqa_dev.jsonl").read_text(encoding="utf-8").splitlines()[:48]
    (corpus / "qa.jsonl").write_text("\n".join(questions) + "\n", encoding="utf-8")
    command = ["finetune-qa", "--model_name_or_path", str(pretraining.one), "--train_file", str(corpus / "qa.jsonl"),
               "--validation_split_percentage", "25", "--max_length", "64", "--generation_max_new_tokens", "4",
               *TRAINING, "--save_steps", str(STEPS), "--per_device_eval_batch_size", "5", "--report_to", "none",
               "--optimizer", "muon"]
    return launch_pair(command, corpus, "qa")


@pytest.fixture(scope="module")
def preference(corpus, pretraining) -> SimpleNamespace:
    """DPO of the pretrained model on NQ-open pairs (the first answer chosen, the next question's rejected), with 5
    held-out pairs in eval batches of 2: on 2 ranks the last eval batch holds 1 real pair and 3 repeated ones."""
    rows = [json.loads(line) for line in (DATA / "nq_open_efficientqa_dev.jsonl").read_text().splitlines()[:38]]
    pairs = [json.dumps({"prompt": f"Question: {row['question']}\nAnswer:", "chosen": " " + row["answer"][0],
                         "rejected": " " + following["answer"][0]}) + "\n" for row, following in zip(rows, rows[1:])]
    (corpus / "pairs.jsonl").write_text("".join(pairs[:32]), encoding="utf-8")
    (corpus / "held_out_pairs.jsonl").write_text("".join(pairs[32:]), encoding="utf-8")
    command = ["dpo", "--model_name_or_path", str(pretraining.one), "--train_file", str(corpus / "pairs.jsonl"),
               "--validation_file", str(corpus / "held_out_pairs.jsonl"), "--max_length", "64", *TRAINING,
               "--save_steps", str(STEPS), "--eval_strategy", "steps", "--eval_steps", str(STEPS),
               "--per_device_eval_batch_size", "2", "--report_to", "none"]
    return launch_pair(command, corpus, "dpo")


def micro_batches_match(run: SimpleNamespace) -> None:
    """Rank r's micro-batch m of step k holds rows [2(2m + r), 2(2m + r) + 2) of the single rank's batch k."""
    one = run.one_record[0]["batches"]
    rank0, rank1 = run.two_record[0]["batches"], run.two_record[1]["batches"]
    assert len(one) == STEPS and len(rank0) == len(rank1) == 2 * STEPS
    for step in range(STEPS):
        assert one[step] == rank0[2 * step] + rank1[2 * step] + rank0[2 * step + 1] + rank1[2 * step + 1]


def logged_losses(output: Path) -> list[float]:
    history = json.loads((output / f"checkpoint-{STEPS}" / "trainer_state.json").read_text())["log_history"]
    return [row["loss"] for row in history if "loss" in row]


def losses_agree(run: SimpleNamespace) -> None:
    one, two = logged_losses(run.one), logged_losses(run.two)
    assert len(one) == len(two) == STEPS
    assert max(abs(a - b) for a, b in zip(one, two)) < 1e-4
    assert abs(one[-1] - one[0]) > 0.01  # the steps really trained: the agreement is not two untouched models


def exact_eval_agrees(run: SimpleNamespace) -> tuple[dict, dict]:
    one = json.loads((run.one / "metrics.json").read_text())
    two = json.loads((run.two / "metrics.json").read_text())
    assert one["eval_tokens"] == two["eval_tokens"]
    assert two["eval_loss"] == pytest.approx(one["eval_loss"], abs=1e-5)
    assert two["perplexity"] == pytest.approx(one["perplexity"], rel=1e-5)
    return one, two


def files(root: Path) -> dict[str, int]:
    """Relative path -> permission bits; TensorBoard's runs/<date_host>/events.* is named runs/events."""
    return {
        "runs/events" if path.parent.parent.name == "runs" else str(path.relative_to(root)):
        stat.S_IMODE(path.stat().st_mode)
        for path in root.rglob("*") if path.is_file()
    }


def only_rank_zero_writes(run: SimpleNamespace, checkpoints: list[int]) -> None:
    one, two = files(run.one), files(run.two)
    rng_files = [f"checkpoint-{step}/rng_state_1.pth" for step in checkpoints]
    assert sorted(name for name, mode in two.items() if mode & 0o002) == rng_files  # created by rank 1
    assert not any(mode & 0o002 for mode in one.values())  # control: no file of a rank-0 umask is world-writable
    # the same run folder; each rank keeps its RNG state in the checkpoint (the Trainer's, to resume exactly)
    assert {name.replace("rng_state_0.pth", "rng_state.pth") for name in two if name not in rng_files} == set(one)
    # Python-level writes of rank 1: only the makedirs(exist_ok=True) of each checkpoint before its RNG file
    assert set(run.two_record[1]["writes"]) <= {f"checkpoint-{step}" for step in checkpoints}


@pytest.mark.slow
def test_two_ranks_pretrain_on_the_single_rank_batches_in_the_same_order(pretraining):
    micro_batches_match(pretraining)


@pytest.mark.slow
def test_pretraining_losses_agree_step_by_step(pretraining):
    losses_agree(pretraining)


@pytest.mark.slow
def test_exact_eval_counts_every_block_once_when_the_ranks_split_it_unevenly(pretraining, corpus):
    one, _ = exact_eval_agrees(pretraining)
    tokenizer = AutoTokenizer.from_pretrained(pretraining.one)
    validation = tokenize_documents(load_local_file(str(corpus / "valid.txt")), tokenizer, "text")
    blocks = len(pack_blocks(validation, BLOCK))
    assert blocks % 2 == 1  # the last eval batch is 1 block + a duplicate that gather_for_metrics must drop
    assert one["eval_tokens"] == blocks * (BLOCK - 1)


@pytest.mark.slow
def test_zero_shot_scores_of_two_ranks_are_the_single_ranks(pretraining):
    """Each rank scores its share of the batches and the scores are gathered: the single rank's numbers."""
    one = json.loads((pretraining.one / "metrics.json").read_text())["zero_shot"]
    two = json.loads((pretraining.two / "metrics.json").read_text())["zero_shot"]
    assert one.keys() == two.keys() == {"choices", "shakespeare_last_word"}
    for name, metrics in one.items():
        assert two[name] == pytest.approx(metrics, rel=1e-5)


@pytest.mark.slow
def test_only_rank_zero_writes_the_pretraining_run(pretraining):
    only_rank_zero_writes(pretraining, checkpoints=[2, STEPS])
    assert {"metrics.json", "loss.png", "recipe.yaml"} <= set(pretraining.two_record[0]["writes"])
    for step in (2, STEPS):  # each manifest is written once rank 1's RNG state is on disk, and records it whole
        checkpoint = pretraining.two / f"checkpoint-{step}"
        recorded = json.loads((checkpoint / "lmpipe-manifest.json").read_text())["files"]["rng_state_1.pth"]
        assert recorded["sha256"] == hashlib.sha256((checkpoint / "rng_state_1.pth").read_bytes()).hexdigest()
    assert "runs/events" in files(pretraining.two)


@pytest.mark.slow
def test_every_rank_leaves_the_process_group_before_it_exits(pretraining, finetuning):
    """A rank exiting with the gloo group alive can abort in interpreter shutdown after a finished run."""
    for run in (pretraining, finetuning):
        assert [run.two_record[rank]["group_at_exit"] for rank in range(2)] == [False, False]


@pytest.mark.slow
def test_the_saved_models_give_the_same_logits(pretraining):
    tokenizer = AutoTokenizer.from_pretrained(pretraining.two)
    ids = torch.as_tensor(tokenizer(pydoc_documents()[41][:400])["input_ids"][:BLOCK])[None]
    with torch.no_grad():
        one = AutoModelForCausalLM.from_pretrained(pretraining.one).eval()(ids).logits
        two = AutoModelForCausalLM.from_pretrained(pretraining.two).eval()(ids).logits
    assert torch.allclose(one, two, atol=1e-4)


@pytest.mark.slow
def test_qa_finetuning_on_two_ranks_is_the_single_rank_run(finetuning):
    micro_batches_match(finetuning)
    positions_one = 8 * sum(finetuning.one_record[0]["widths"])
    positions_two = 2 * sum(sum(finetuning.two_record[rank]["widths"]) for rank in (0, 1))
    assert positions_two < positions_one  # padded per micro-batch of 2, not per batch of 8: the padding differs
    losses_agree(finetuning)
    one, two = exact_eval_agrees(finetuning)
    assert (one["exact_match"], one["f1"]) == (two["exact_match"], two["f1"])
    only_rank_zero_writes(finetuning, checkpoints=[STEPS])
    assert "predictions.jsonl" in finetuning.two_record[0]["writes"]
    for run in (finetuning.one, finetuning.two):  # both trained with Muon: its momentum is in their checkpoints
        state = torch.load(run / f"checkpoint-{STEPS}" / "optimizer.pt", weights_only=True)["state"]
        assert any("momentum_buffer" in tensors for tensors in state.values())


@pytest.mark.slow
def test_dpo_evaluation_of_two_ranks_is_the_single_ranks(preference):
    """Every eval statistic is a mean over the 5 held-out pairs, each once: TRL's means of batch means would count
    the 3 pairs accelerate repeats on 2 ranks (and weigh the batches, not the pairs)."""
    one, two = (json.loads((run / "metrics.json").read_text()) for run in (preference.one, preference.two))
    assert one["validation_pairs"] == two["validation_pairs"] == 5
    assert one["train_steps"] == two["train_steps"] == STEPS
    assert one["eval_reward_margin"] != 0  # the policy moved away from its reference
    for key in [key for key in one if key.startswith("eval_")]:
        assert two[key] == pytest.approx(one[key], rel=1e-4, abs=1e-5), key
    history = {run: [row for row in json.loads((run / f"checkpoint-{STEPS}" / "trainer_state.json").read_text())[
        "log_history"] if "eval_entropy" in row] for run in (preference.one, preference.two)}
    assert [len(rows) for rows in history.values()] == [1, 1]  # TRL's token statistics: weighted by answer tokens
    (first,), (second,) = history.values()
    assert second["eval_entropy"] == pytest.approx(first["eval_entropy"], rel=1e-5)


@pytest.mark.slow
def test_streamed_blocks_are_split_across_ranks_without_overlap_or_loss(tmp_path):
    """One pass over a streamed file by 2 ranks trains on exactly the blocks packed in memory, in order."""
    (tmp_path / "small.txt").write_text("\n\n".join(pydoc_documents()[1:5]), encoding="utf-8")
    held_out, per_device, steps = 20, 16, 7  # 223 train blocks: 7 global batches of 32, the last one short by 1
    record = launch_two_ranks(
        ["pretrain", "--train_file", str(tmp_path / "small.txt"), "--streaming", "true",
         "--streaming_validation_documents", str(held_out), *MODEL, *TRAINING, "--max_steps", str(steps),
         "--save_strategy", "no", "--report_to", "none", "--per_device_train_batch_size", str(per_device)],
        tmp_path / "out",
    )
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "out")
    paragraphs = load_local_file(str(tmp_path / "small.txt"))
    train = paragraphs.select(range(held_out, len(paragraphs)))
    blocks = blocks_as_array(pack_blocks(tokenize_documents(train, tokenizer, "text"), BLOCK)).tolist()
    rank0, rank1 = record[0]["batches"], record[1]["batches"]
    assert all(len(batch) == per_device for batch in rank0 + rank1)
    seen = [row for step in range(steps) for row in rank0[step] + rank1[step]]
    assert (steps - 1) * 2 * per_device < len(blocks) < len(seen)  # the run passed the end of the stream
    assert seen[: len(blocks)] == blocks
    # accelerate's even_batches completes the last global batch with the stream's first block, as for map-style data
    assert seen[len(blocks)] == blocks[0]


def test_processes_the_trainer_does_not_see_are_refused(monkeypatch):
    """What `accelerate launch --num_processes 2` without use_cpu gives on a machine with no GPU: world size 1."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(LmpipeError, match=r"2 processes were launched but the Trainer sees 1 .* --use_cpu true"):
        check_launch(SimpleNamespace(world_size=1, device=torch.device("cpu")))
    check_launch(SimpleNamespace(world_size=2, device=torch.device("cpu")))
    monkeypatch.delenv("WORLD_SIZE")
    check_launch(SimpleNamespace(world_size=1, device=torch.device("cpu")))


def test_a_rank_cut_off_from_another_is_one_line_and_none_under_lmpipe_launch(monkeypatch):
    """gloo's error when a peer died (as a survivor got it from a SIGKILLed rank; tests/test_launch_signals.py kills
    one for real): one line instead of the transport's traceback; under `lmpipe launch`, which names the dead
    rank itself, nothing. Other errors pass through."""
    from lmpipe.run.distributed import RankLost, a_lost_rank_is_one_line
    from lmpipe.run.launch import LAUNCHER_NAMES_THE_LOST_RANK

    gloo = RuntimeError(
        "[/__w/pytorch/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:537] Read error [127.0.0.1]:43747:"
        " Connection reset by peer. This is typically caused by a remote worker hanging or failing."
    )
    training = SimpleNamespace(world_size=2, process_index=0)
    monkeypatch.delenv(LAUNCHER_NAMES_THE_LOST_RANK, raising=False)
    with pytest.raises(RankLost) as lost, a_lost_rank_is_one_line(training):
        raise gloo
    assert str(lost.value) == (
        "rank 0 of 2 lost its connection to another rank (Read error [127.0.0.1]:43747: Connection reset by peer),"
        " which died or was stopped: its launcher's log names it; rerun the same command to resume from the newest"
        " complete checkpoint"
    )
    assert lost.value.exit_code == 4
    monkeypatch.setenv(LAUNCHER_NAMES_THE_LOST_RANK, "1")
    with pytest.raises(RankLost, match="^$"), a_lost_rank_is_one_line(training):
        raise gloo
    with pytest.raises(RuntimeError, match="a bug"), a_lost_rank_is_one_line(training):
        raise RuntimeError("a bug")


def test_more_processes_than_gpus_are_refused_by_the_launcher(monkeypatch, capsys):
    """`lmpipe launch --num_processes 2` starts two processes (through torchrun; Accelerate alone starts one on a
    machine with fewer than two GPUs); with one GPU the second would fail on cuda:1 once loaded, so it is refused
    before anything starts. (tests/test_launch_signals.py starts two CPU processes this way.)"""
    from lmpipe.cli import main

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert main(["launch", "--num_processes", "2", "pretrain", "--n_layer", "-1"]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "error: --num_processes 2: this machine has 1 GPU(s), one for each process; launch at most 1 a machine, or"
        " CPU processes with --cpu (and --use_cpu true for the run)"
    )


def test_fsdp_without_an_accelerator_is_refused_before_any_data(monkeypatch):
    """Accelerate's FSDP plugin raises only at Trainer construction when no GPU is found (tried on this machine)."""
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    with pytest.raises(LmpipeError, match="asks for FSDP, which needs GPUs"):
        check_launch(SimpleNamespace(world_size=1, device=torch.device("cpu")))
    check_launch(SimpleNamespace(world_size=1, device=torch.device("cuda", 0)))


def test_a_single_cpu_process_gets_back_the_cores_accelerate_launch_took(monkeypatch):
    """`accelerate launch` without a GPU sets OMP_NUM_THREADS=1; one process then uses every core again."""
    from lmpipe.run.distributed import restore_cpu_threads

    cores = len(os.sched_getaffinity(0))
    threads = torch.get_num_threads()
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    try:
        torch.set_num_threads(1)
        restore_cpu_threads(SimpleNamespace(world_size=1))  # not launched by accelerate: left as given
        assert torch.get_num_threads() == 1
        monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "no")
        restore_cpu_threads(SimpleNamespace(world_size=2))  # two ranks share the cores
        assert torch.get_num_threads() == 1
        restore_cpu_threads(SimpleNamespace(world_size=1))
        assert torch.get_num_threads() == cores
    finally:
        torch.set_num_threads(threads)


@pytest.mark.slow
def test_a_streamed_mixture_counts_the_blocks_of_both_ranks(tmp_path):
    """Rank 0 reads the mixed stream for both ranks; the shares in metrics.json count the documents of every block
    either rank trained on (Shakespeare lines 3 : NQ-open questions 1, rebuilt by hand)."""
    from conftest import count_by_source, mixed_stream_by_hand, shakespeare_lines, write_lines

    plays = write_lines(tmp_path / "plays.jsonl", shakespeare_lines(300))
    questions = str(tmp_path / "questions.jsonl")
    Path(questions).write_text("".join((DATA / "nq_open_efficientqa_dev.jsonl").read_text().splitlines(True)[:300]))
    sources = [{"path": plays, "weight": 3}, {"path": questions, "weight": 1, "text_column": "question"}]
    record = launch_two_ranks(
        ["pretrain", "--datasets", *map(json.dumps, sources), "--streaming", "true",
         "--streaming_validation_documents", "10", *MODEL, *TRAINING, "--save_strategy", "no", "--report_to", "none",
         *TWO_RANKS],
        tmp_path / "out",
    )
    seen = [row for both in zip(record[0]["batches"], record[1]["batches"]) for batch in both for row in batch]
    assert len(seen) == STEPS * 8  # 2 ranks x 2 rows x 2 micro-batches a step
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "out")
    tokens, ids = mixed_stream_by_hand([(plays, "text"), (questions, "question")], (3, 1), 10, 3, tokenizer)
    assert sum(seen, []) == ids[: len(seen) * BLOCK]
    documents, counted = count_by_source(tokens[: len(seen) * BLOCK])
    shares = json.loads((tmp_path / "out" / "metrics.json").read_text())["mixture"]
    assert {name: (s["examples"], s["learned_tokens"]) for name, s in shares.items()} == {
        name: (documents[name], counted[name]) for name in (plays, questions)}
