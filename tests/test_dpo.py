"""DPO: pairs tokenised apart at an exact boundary, the check-loss DPO mode against TRL on real batches, and a tiny
`lmpipe dpo` run that survives SIGTERM and resumes to the uninterrupted run's weights."""

import itertools
import json
import os
import signal
from types import SimpleNamespace

import pytest
import torch
from accelerate.data_loader import BatchSamplerShard
from datasets import Dataset
from safetensors.torch import load_file
from torch.utils.data import BatchSampler, SequentialSampler
from transformers import TrainerCallback
from trl.data_utils import common_prefix_length
from trl.trainer.dpo_trainer import DataCollatorForPreference

import lmpipe.dpo
from lmpipe.cli import main
from lmpipe.config.arguments import DPO_GROUPS, ModelArguments, PreferenceArguments
from lmpipe.config.recipe import parse_recipe
from lmpipe.data.chat import DEFAULT_CHAT_TEMPLATE, chat_format
from lmpipe.data.preference import prepare_preference_data, tokenize_pairs
from lmpipe.errors import LmpipeError
from lmpipe.loss.install import ChunkedLogProbOutput
from lmpipe.loss_check import (
    LossCheckArguments,
    check_preferences,
    run_preference_check,
    sequence_log_prob,
)
from lmpipe.model.build import build_model
from lmpipe.training.pair_eval import first_pairs, real_pairs

from conftest import DATA

NQ_OPEN = DATA / "nq_open_efficientqa_dev.jsonl"


def nq_pairs(count: int) -> list[dict]:
    """Real NQ-open questions: the first accepted answer chosen, the next question's answer rejected."""
    rows = [json.loads(line) for line in NQ_OPEN.read_text(encoding="utf-8").splitlines()[: count + 1]]
    return [
        {"prompt": f"Question: {row['question']}\nAnswer:", "chosen": " " + row["answer"][0],
         "rejected": " " + following["answer"][0]}
        for row, following in zip(rows, rows[1:])
    ]


def write_jsonl(path, rows) -> str:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return str(path)


@pytest.fixture(scope="module")
def policy(gpt2_tokenizer, tmp_path_factory):
    """A saved tiny GPT-2 with the real GPT-2 tokenizer, as a fine-tuned run directory holds one."""
    torch.manual_seed(0)
    directory = tmp_path_factory.mktemp("dpo") / "policy"
    model = build_model(ModelArguments(n_layer=1, n_embd=32, n_head=2, n_positions=64), gpt2_tokenizer, 64)
    model.save_pretrained(directory)
    gpt2_tokenizer.save_pretrained(directory)
    return directory


def test_text_pairs_are_prompt_then_each_answer_tokenised_apart(gpt2_tokenizer):
    # " 19" + "88": alone the prompt ends in " 19"; joined, " 1988" is one token. TRL's common-prefix rule would
    # cut the prompt there and score " 1988" as the answer; tokenised apart, the answer is "88" + EOS.
    rows = Dataset.from_list([{"prompt": "The year was 19", "chosen": "88", "rejected": "45 or so"}])
    pairs, counts = tokenize_pairs(rows, gpt2_tokenizer, PreferenceArguments(), None, "pairs.jsonl")
    encode = gpt2_tokenizer.encode
    eos = gpt2_tokenizer.eos_token_id
    assert pairs[0] == {
        "prompt_ids": encode("The year was 19"), "chosen_ids": encode("88") + [eos],
        "rejected_ids": encode("45 or so") + [eos],
    }
    joined = encode("The year was 1988")
    assert common_prefix_length(encode("The year was 19"), joined) < len(encode("The year was 19"))  # a real merge
    assert (counts.kept, counts.truncated, counts.dropped) == (1, 0, 0)


def test_a_long_prompt_loses_tokens_from_its_left_and_a_long_answer_drops_the_pair(gpt2_tokenizer):
    eos = gpt2_tokenizer.eos_token_id
    long_prompt = "Question: " + "very " * 20 + "long?\nAnswer:"
    rows = Dataset.from_list([
        {"prompt": long_prompt, "chosen": " yes", "rejected": " no, not at all"},
        {"prompt": "Q:", "chosen": " word " * 30, "rejected": " no"},  # the answer + EOS leaves no room: dropped
        {"prompt": "Q:", "chosen": " a", "rejected": " b"},
    ])
    args = PreferenceArguments(max_length=12, max_dropped_share=0.5)
    pairs, counts = tokenize_pairs(rows, gpt2_tokenizer, args, None, "pairs.jsonl")
    assert (counts.kept, counts.truncated, counts.dropped) == (1, 1, 1)
    rejected = gpt2_tokenizer.encode(" no, not at all") + [eos]  # never cut: its EOS is what teaches stopping
    assert pairs[0]["rejected_ids"] == rejected
    assert pairs[0]["prompt_ids"] == gpt2_tokenizer.encode(long_prompt)[-(12 - len(rejected)):]
    with pytest.raises(LmpipeError, match=r"^pairs.jsonl: 1 of 3 pairs \(33.3%\) leave no room for the prompt"):
        tokenize_pairs(rows, gpt2_tokenizer, PreferenceArguments(max_length=12), None, "pairs.jsonl")


def test_conversation_pairs_score_the_answer_and_its_end_marker_and_cut_whole_turns(gpt2_tokenizer):
    fmt = chat_format(gpt2_tokenizer, DEFAULT_CHAT_TEMPLATE)
    prompt = [
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "Tell me a long story " * 3},
        {"role": "assistant", "content": "Once."}, {"role": "user", "content": "Capital of France?"},
    ]
    row = {"prompt": prompt, "chosen": [{"role": "assistant", "content": "Paris"}],
           "rejected": [{"role": "assistant", "content": "Rome"}]}
    encode, eos = gpt2_tokenizer.encode, gpt2_tokenizer.eos_token_id
    whole, _ = tokenize_pairs(Dataset.from_list([row]), gpt2_tokenizer, PreferenceArguments(), fmt, "chat.jsonl")
    rendered = gpt2_tokenizer.apply_chat_template(prompt, chat_template=DEFAULT_CHAT_TEMPLATE, tokenize=False,
                                                  add_generation_prompt=True)
    assert gpt2_tokenizer.decode(whole[0]["prompt_ids"]) == rendered
    assert whole[0]["chosen_ids"] == encode("Paris") + [eos]
    system = encode("System:\n") + encode("Be brief.") + encode("\n\n")  # header, content, end: each apart
    last = encode("User:\n") + encode("Capital of France?") + encode("\n\n") + encode("Assistant:\n")
    answer = max(len(whole[0]["chosen_ids"]), len(whole[0]["rejected_ids"]))
    args = PreferenceArguments(max_length=len(system) + len(last) + answer)  # the system turn and the last user one
    cut, counts = tokenize_pairs(Dataset.from_list([row]), gpt2_tokenizer, args, fmt, "chat.jsonl")
    assert cut[0]["prompt_ids"] == system + last and counts.truncated == 1


def test_a_bad_row_is_one_line_naming_file_and_row(gpt2_tokenizer, tmp_path):
    good = {"prompt": "Q:", "chosen": " a", "rejected": " b"}
    empty = Dataset.from_list([good, {**good, "chosen": " "}])
    with pytest.raises(LmpipeError, match="^pairs.jsonl row 2: column 'chosen' is empty$"):
        tokenize_pairs(empty, gpt2_tokenizer, PreferenceArguments(), None, "pairs.jsonl")
    turn = [{"role": "assistant", "content": "a"}]
    two_turns = Dataset.from_list([{"prompt": [{"role": "user", "content": "Q?"}], "chosen": turn * 2,
                                    "rejected": turn}])
    fmt = chat_format(gpt2_tokenizer, DEFAULT_CHAT_TEMPLATE)
    with pytest.raises(LmpipeError, match=r"^chat.jsonl row 1: column 'chosen' must be one assistant turn"):
        tokenize_pairs(two_turns, gpt2_tokenizer, PreferenceArguments(), fmt, "chat.jsonl")
    missing = write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": "Q:", "chosen": " a"}])
    with pytest.raises(LmpipeError, match=r"pairs.jsonl \(train\): no column 'rejected'; columns are prompt, chosen$"):
        prepare_preference_data(PreferenceArguments(train_file=missing), gpt2_tokenizer, None, 0)


def test_a_mixture_of_pair_files_is_weighted_and_each_source_keeps_its_columns(gpt2_tokenizer, tmp_path):
    first = write_jsonl(tmp_path / "a.jsonl", nq_pairs(10))
    renamed = [{"question": r["prompt"], "good": r["chosen"], "bad": r["rejected"]} for r in nq_pairs(20)[10:]]
    second = write_jsonl(tmp_path / "b.jsonl", renamed)
    sources = [{"path": first, "weight": 2}, {"path": second, "weight": 0.5, "prompt_column": "question",
                                              "chosen_column": "good", "rejected_column": "bad"}]
    data = prepare_preference_data(PreferenceArguments(datasets=sources), gpt2_tokenizer, None, 0)
    # each source holds out its last 10 % (1 pair), then 9 pairs x 2 and a seeded half of 9 (round(4.5) = 4)
    assert data.train["source"].count(first) == 18 and data.train["source"].count(second) == 4
    assert len(data.validation) == 2
    held_out = gpt2_tokenizer.encode(renamed[-1]["question"])
    assert data.validation[1]["prompt_ids"] == held_out
    assert data.mixture[first]["weight"] == 2 and data.mixture[second]["examples"] == 4


def test_dpo_keys_are_recipe_keys_with_help_and_ranges(capsys):
    recipe = parse_recipe(["--output_dir", "x", "--beta", "0.25", "--loss_type", "sigmoid", "hinge"], DPO_GROUPS)
    assert (recipe.training.beta, recipe.training.loss_type, recipe.training.max_length) == (0.25, ["sigmoid", "hinge"],
                                                                                              None)
    assert recipe.data.max_length == 128  # the data's, not DPOConfig's
    for flags, message in (
        (["--beta", "0"], "beta must be > 0, got 0.0"),
        (["--loss_type", "sigmod"], "loss_type must be a non-empty list of"),
        (["--max_length", "1"], "max_length must be >= 2, got 1"),
    ):
        with pytest.raises(LmpipeError, match="^" + message):
            parse_recipe(["--output_dir", "x", *flags], DPO_GROUPS)
    assert main(["dpo", "--help"]) == 0
    shown = capsys.readouterr().out
    for key in ("--beta", "--loss_type", "--precompute_ref_log_probs", "--prompt_column"):
        assert key in shown
    assert shown.count("--max_length ") == 1


def check_recipe(policy, train_file, *flags):
    groups = {**DPO_GROUPS, "loss_check": LossCheckArguments}
    return parse_recipe([
        "--model_name_or_path", str(policy), "--train_file", train_file, "--max_length", "24", "--output_dir", "x",
        "--per_device_train_batch_size", "3", "--batches", "2", "--use_cpu", "true", "--report_to", "none",
        "--max_steps", "1", "--disable_tqdm", "true", *flags,
    ], groups)


def odd_pairs(tmp_path) -> str:
    """Odd lengths, a prompt cut from the left (max_length 24), answers of different lengths (padded with EOS),
    and a prompt that tokenises differently alone than joined with its answer."""
    rows = nq_pairs(5)
    rows[1]["prompt"] = "Question: " + "which of the many " * 6 + rows[1]["prompt"][10:]
    rows.append({"prompt": "The year was 19", "chosen": "88", "rejected": "45 or so, give or take"})
    return write_jsonl(tmp_path / "pairs.jsonl", rows)


def perturb(model, seed=1):
    """Move the policy away from its reference so that the rewards are not all zero."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.requires_grad:
                parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.05)


@pytest.mark.parametrize("flags", [
    [], ["--use_lora", "true"], ["--precompute_ref_log_probs", "true", "--reference_model_name_or_path", "POLICY"],
    ["--chunked_loss", "false"],
], ids=["full", "lora", "precomputed", "trl-fused-head"])
def test_check_loss_agrees_with_trl_on_real_batches(flags, policy, tmp_path, monkeypatch):
    """Full: the reference is TRL's frozen copy; LoRA: the adapters disabled; precomputed: TRL's reference
    log-probs computed before training (from a reference model: the policy is moved away after); the log-probs
    from lmpipe's chunked loss, or from TRL's own fused LM head."""
    recipe = check_recipe(policy, odd_pairs(tmp_path), *[str(policy) if f == "POLICY" else f for f in flags])
    build = lmpipe.dpo.build_dpo_trainer

    def build_perturbed(*args, **kwargs):
        trainer, data = build(*args, **kwargs)
        perturb(trainer.model)
        assert data.counts["train"].truncated == 1
        return trainer, data

    monkeypatch.setattr(lmpipe.dpo, "build_dpo_trainer", build_perturbed)
    check = run_preference_check(recipe)
    assert check.first_disagreement() is None
    assert [row.pairs for row in check.rows] == [3, 2]  # 5 train pairs after the 10 % held out
    assert any(abs(row.manual["reward_margin"]) > 1e-3 for row in check.rows)


def test_check_loss_names_a_collator_that_masks_eos_by_id(policy, tmp_path, monkeypatch):
    """pad = EOS: a completion mask made by token id (TRL #1284's kind of bug) drops each answer's own EOS."""
    recipe = check_recipe(policy, odd_pairs(tmp_path))
    build = lmpipe.dpo.build_dpo_trainer

    def build_masking_eos(*args, **kwargs):
        trainer, data = build(*args, **kwargs)
        collate = trainer.data_collator

        def masking_eos(examples):
            batch = collate(examples)
            batch["completion_mask"][batch["input_ids"] == trainer.processing_class.eos_token_id] = 0
            return batch

        trainer.data_collator = masking_eos
        return trainer, data

    monkeypatch.setattr(lmpipe.dpo, "build_dpo_trainer", build_masking_eos)
    assert "logps_chosen" in run_preference_check(recipe).first_disagreement()


def test_the_check_compares_with_the_values_trl_logs(policy, tmp_path, monkeypatch):
    """A TRL that reported other rewards than it trained on would be caught: the check reads TRL's own log."""
    recipe = check_recipe(policy, odd_pairs(tmp_path))
    trainer, _ = lmpipe.dpo.build_dpo_trainer(recipe, recipe.training, str(policy))
    perturb(trainer.model)
    pairs = [trainer.train_dataset[i] for i in range(3)]
    assert check_preferences(trainer, pairs, 3).first_disagreement() is None
    original = trainer._compute_loss

    def doubled_rewards(model, inputs, return_outputs):
        loss = original(model, inputs, return_outputs)
        trainer._metrics["train"]["rewards/chosen"][-1] *= 2
        return loss

    monkeypatch.setattr(trainer, "_compute_loss", doubled_rewards)
    assert check_preferences(trainer, pairs, 3).first_disagreement().startswith("batch 1: TRL's reward_chosen")


class SendSignalAt(TrainerCallback):
    def __init__(self, signal_number, step):
        self.signal_number, self.step = signal_number, step

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            os.kill(os.getpid(), self.signal_number)


def dpo_command(policy, train_file, output, *flags):
    return ["dpo", "--model_name_or_path", str(policy), "--train_file", train_file, "--output_dir", str(output),
            "--max_length", "48", "--max_steps", "4", "--per_device_train_batch_size", "4", "--learning_rate", "0.01",
            "--lr_scheduler_type", "constant", "--save_steps", "2", "--logging_steps", "1", "--use_cpu", "true",
            "--report_to", "none", "--disable_tqdm", "true", "--eval_strategy", "steps", "--eval_steps", "2", *flags]


@pytest.mark.slow
def test_dpo_run_survives_sigterm_and_resumes_to_the_uninterrupted_weights(policy, tmp_path, monkeypatch, capsys):
    train_file = write_jsonl(tmp_path / "pairs.jsonl", nq_pairs(40))
    straight = tmp_path / "straight"
    assert main(dpo_command(policy, train_file, straight)) == 0
    metrics = json.loads((straight / "metrics.json").read_text())
    assert metrics["train_steps"] == 4 and metrics["train_pairs"] == 36 and metrics["validation_pairs"] == 4
    evaluation = [row for row in json.loads((straight / "checkpoint-4" / "trainer_state.json").read_text())[
        "log_history"] if "eval_loss" in row][-1]  # the final evaluation is the one logged at the last step
    assert (metrics["eval_reward_accuracy"], metrics["eval_reward_margin"]) == (
        evaluation["eval_rewards/accuracies"], evaluation["eval_rewards/margins"])
    assert {"loss.png", "README.md", "recipe.yaml", "model.safetensors"} <= {p.name for p in straight.iterdir()}
    card = (straight / "README.md").read_text()
    assert f"favours chosen) | {metrics['eval_reward_accuracy']:.4f} |" in card
    history = json.loads((straight / "checkpoint-4" / "trainer_state.json").read_text())["log_history"]
    assert {"rewards/margins", "rewards/accuracies"} <= set(history[0])

    stopped = tmp_path / "stopped"
    build = lmpipe.dpo.build_dpo_trainer

    def build_signalled(*args, **kwargs):
        trainer, data = build(*args, **kwargs)
        trainer.add_callback(SendSignalAt(signal.SIGTERM, step=2))  # during step 3, not a save step
        return trainer, data

    monkeypatch.setattr(lmpipe.dpo, "build_dpo_trainer", build_signalled)
    assert main(dpo_command(policy, train_file, stopped)) == 128 + signal.SIGTERM
    assert "saved " + str(stopped / "checkpoint-3") in capsys.readouterr().err
    assert not (stopped / "metrics.json").exists()
    monkeypatch.undo()
    assert main(dpo_command(policy, train_file, stopped)) == 0
    resumed = json.loads((stopped / "metrics.json").read_text())
    assert resumed["resumed_from"].endswith("checkpoint-3")
    weights, reference = load_file(stopped / "model.safetensors"), load_file(straight / "model.safetensors")
    assert max((weights[k] - reference[k]).abs().max().item() for k in reference) <= 1e-6
    assert resumed["eval_loss"] == pytest.approx(metrics["eval_loss"], abs=1e-6)
    assert main(dpo_command(policy, train_file, stopped)) == 0  # finished: nothing is trained again
    assert "nothing to train" in capsys.readouterr().err


def test_chunked_log_probs_give_trls_loss_metrics_and_gradients(policy, tmp_path):
    """The same DPO step through lmpipe's chunked log-probs and through TRL's fused LM head: one loss, one set of
    logged metrics (entropy, mean logits, token accuracy included), one gradient."""
    train_file = odd_pairs(tmp_path)
    results = {}
    for chunked in ("true", "false"):
        recipe = check_recipe(policy, train_file, "--chunked_loss", chunked)
        trainer, _ = lmpipe.dpo.build_dpo_trainer(recipe, recipe.training, str(policy))
        perturb(trainer.model)
        inputs = trainer._prepare_inputs(trainer.data_collator([trainer.train_dataset[i] for i in range(3)]))
        outputs = trainer.model(input_ids=inputs["input_ids"], labels=inputs["input_ids"], fused_lm_head=True)
        assert isinstance(outputs, ChunkedLogProbOutput) == (chunked == "true")
        trainer.model.train()
        loss = trainer.compute_loss(trainer.model, inputs)
        loss.backward()
        gradients = {name: p.grad.clone() for name, p in trainer.model.named_parameters() if p.grad is not None}
        results[chunked] = loss.item(), {k: v[-1] for k, v in trainer._metrics["train"].items()}, gradients
    (loss, logged, gradients), (trl_loss, trl_logged, trl_gradients) = results["true"], results["false"]
    assert loss == pytest.approx(trl_loss, rel=1e-5)
    assert logged.keys() == trl_logged.keys()
    for key in logged:
        assert logged[key] == pytest.approx(trl_logged[key], rel=1e-4, abs=1e-6), key
    assert gradients.keys() == trl_gradients.keys()
    for name in gradients:
        scale = trl_gradients[name].abs().max().item()
        assert (gradients[name] - trl_gradients[name]).abs().max().item() <= 1e-5 * max(scale, 1e-6), name


def test_a_lora_runs_adapter_trains_on_against_its_frozen_copy(policy, gpt2_tokenizer, tmp_path):
    """A LoRA SFT run's directory (an adapter) is the policy; its reference is the same adapter frozen (TRL's `ref`
    copy), not the base model: at the start every reward is exactly 0 although the adapter is not zero."""
    from transformers import AutoModelForCausalLM

    from lmpipe.config.arguments import LoraArguments
    from lmpipe.model.lora import wrap_lora

    adapter = wrap_lora(AutoModelForCausalLM.from_pretrained(policy), LoraArguments(use_lora=True, lora_dropout=0.0))
    perturb(adapter)
    adapter.save_pretrained(tmp_path / "adapter")
    gpt2_tokenizer.save_pretrained(tmp_path / "adapter")
    recipe = check_recipe(tmp_path / "adapter", odd_pairs(tmp_path))
    check = run_preference_check(recipe)
    assert check.first_disagreement() is None
    assert all(row.manual["reward_chosen"] == 0 == row.manual["reward_rejected"] for row in check.rows)


def test_the_evaluation_weighs_every_held_out_pair_once(policy, tmp_path):
    """5 held-out pairs in eval batches of 2, 2 and 1: every reported statistic is the mean over the pairs of the
    values computed by hand, not TRL's mean of the three batch means (the last pair would weigh as much as two)."""
    held_out = write_jsonl(tmp_path / "held_out.jsonl", nq_pairs(14)[8:13])
    recipe = check_recipe(policy, odd_pairs(tmp_path), "--validation_file", held_out,
                          "--per_device_eval_batch_size", "2")
    trainer, data = lmpipe.dpo.build_dpo_trainer(recipe, recipe.training, str(policy))
    perturb(trainer.model, seed=3)
    evaluation = trainer.evaluate()
    beta = recipe.training.beta
    with torch.no_grad():
        hand = torch.tensor([
            [sequence_log_prob(model, pair["prompt_ids"], pair[answer])
             for model in (trainer.model, trainer.ref_model) for answer in ("chosen_ids", "rejected_ids")]
            for pair in data.validation
        ], dtype=torch.float64)
    chosen, rejected = beta * (hand[:, 0] - hand[:, 2]), beta * (hand[:, 1] - hand[:, 3])
    margin = chosen - rejected
    expected = {
        "eval_loss": -torch.nn.functional.logsigmoid(margin), "eval_rewards/accuracies": (margin > 0).double(),
        "eval_rewards/margins": margin, "eval_rewards/chosen": chosen, "eval_rewards/rejected": rejected,
        "eval_logps/chosen": hand[:, 0], "eval_logps/rejected": hand[:, 1],
    }
    assert len(hand) == 5
    for key, values in expected.items():
        assert evaluation[key] == pytest.approx(values.mean().item(), rel=1e-5, abs=1e-6), key
    accuracy = expected["eval_rewards/accuracies"]
    batch_means = [accuracy[start : start + 2].mean().item() for start in (0, 2, 4)]
    assert abs(sum(batch_means) / 3 - accuracy.mean().item()) > 0.05  # TRL's way differs on these pairs
    assert "eval_num_tokens" not in evaluation  # TRL's count of training tokens
    logged = trainer.state.log_history[-1]
    assert {key: logged[key] for key in expected} == {key: evaluation[key] for key in expected}


def test_each_held_out_pair_is_scored_on_exactly_one_rank():
    """Against accelerate's own sharding of eval batches (on the last step every rank's batch is filled up with
    pairs from the start): the pairs each rank keeps (`real_pairs` of its batch, from the front) are every pair
    once, on 1, 2 and 3 ranks."""
    for ranks, size, batch_size in itertools.product((1, 2, 3), range(1, 12), (1, 2, 3)):
        sampler = BatchSampler(SequentialSampler(range(size)), batch_size, drop_last=False)
        shards = [list(BatchSamplerShard(sampler, ranks, rank, even_batches=True)) for rank in range(ranks)]
        kept = []
        for step in range(len(shards[0])):
            for rank, batches in enumerate(shards):
                state = SimpleNamespace(end_of_dataloader=step == len(batches) - 1,
                                        remainder=size % (batch_size * ranks))
                kept += batches[step][: real_pairs(len(batches[step]), SimpleNamespace(gradient_state=state,
                                                                                        process_index=rank))]
        assert sorted(kept) == list(range(size)), (ranks, size, batch_size)


def test_a_batch_cut_to_its_first_pairs_is_the_batch_of_those_pairs():
    """TRL's collator puts the chosen rows first, then the rejected ones; precomputed reference values are one per
    pair. Cut to 2 pairs, a batch of 3 is the batch of the first 2 (with its wider padding)."""
    pairs = [{"prompt_ids": [1] * n, "chosen_ids": [2] * (n + 1), "rejected_ids": [3] * (5 - n),
              "ref_chosen_logps": -float(n), "ref_rejected_logps": -10.0 * n} for n in (1, 2, 3)]
    collate = DataCollatorForPreference(pad_token_id=0)
    cut, alone = first_pairs(collate(pairs), 2), collate(pairs[:2])
    assert cut.keys() == alone.keys()
    for key, value in alone.items():
        padding = (0, cut[key].shape[-1] - value.shape[-1]) if value.dim() == 2 else (0, 0)
        expected = torch.nn.functional.pad(value, padding)
        assert torch.equal(cut[key], expected), key
